"""Typed reads of JSON config files, shared by every config the layouts parse."""

from __future__ import annotations

import re

from ..errors import ConfigError


class Fields:
    """Typed reads of one JSON config's keys; each error is one line naming the file and key.

    `default` is returned for an absent (or null) key; `minimum` bounds numbers.
    """

    def __init__(self, raw: dict, path, prefix: str = ""):
        self.raw, self.path, self.prefix = raw, path, prefix

    def _bad(self, key, value, want):
        return ConfigError(f"{self.path}: {self.prefix}{key} must be {want}, got {value!r}")

    def require(self, *keys) -> None:
        for key in keys:
            if self.raw.get(key) is None:
                raise ConfigError(f"{self.path}: {self.prefix}{key} is missing")

    def section(self, key) -> "Fields":
        """The object under `key`, read with its own Fields (errors say `key.field`)."""
        self.require(key)
        value = self.raw[key]
        if not isinstance(value, dict):
            raise self._bad(key, value, "an object")
        return Fields(value, self.path, f"{self.prefix}{key}.")

    def number(self, key, default, kind, minimum=None, value=None):
        value = self.raw.get(key) if value is None else value
        if value is None:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or (minimum is not None and value < minimum):
            raise self._bad(key, value, ("an integer" if kind is int else "a number")
                            + ("" if minimum is None else f" >= {minimum}"))
        return kind(value)

    def ints(self, key):
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._bad(key, value, "a list of integers")
        return value

    def names(self, key, regex_ok=False, optional=False, patterns=False):
        value = self.raw.get(key)
        if value is None and optional:
            return None
        if isinstance(value, str) and regex_ok:
            _regex(value, self.path, key)
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, value, "a list of module names" + (" or a regex" if regex_ok else ""))
        for v in value if patterns else ():
            _regex(v, self.path, key)
        return value

    def pattern(self, key, kind, minimum=None):
        """`rank_pattern` / `alpha_pattern`: regex -> value, every value present and typed."""
        value = self.raw.get(key) or {}
        if not isinstance(value, dict):
            raise self._bad(key, value, "an object mapping module names to values")
        for name, v in value.items():
            _regex(name, self.path, key)
            if v is None:
                raise self._bad(f"{key}[{name!r}]", v, "a number")
        return {name: self.number(f"{key}[{name!r}]", None, kind, minimum, value=v) for name, v in value.items()}


def _regex(text: str, path, key) -> None:
    try:
        re.compile(text)
    except re.error as e:
        raise ConfigError(f"{path}: {key} {text!r} is not a valid regex ({e})") from None
