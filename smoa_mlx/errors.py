"""Typed user-facing errors: `cli.run` prints these as one line and exits 1.

Each subclasses ValueError (and MissingFileError also FileNotFoundError), so code and
tests written against the built-in exceptions keep working.
"""

from __future__ import annotations


class SMoAError(ValueError):
    """Bad input from the user, named precisely: printed as one line, never a traceback."""


class ConfigError(SMoAError):
    """An option, a YAML key, or a config file (adapter, PEFT, model) that makes no sense."""


class DataError(SMoAError):
    """A dataset file, line or record that cannot be read or used."""


class AdapterError(SMoAError):
    """An adapter that cannot be read, or belongs to another base model."""


class ModelError(SMoAError):
    """A base model that cannot be loaded, or an architecture without a known layout."""


class MissingFileError(SMoAError, FileNotFoundError):
    """A path the user named does not exist."""
