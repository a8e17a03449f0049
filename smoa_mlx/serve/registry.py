"""One base model, many adapters: each adapter's layers are built once on the bare base
and swapped in and out of the model in place (no reload); names resolve only inside the
adapter directory. The active adapter is prepared for inference (`inference`): with one
adapter and no adapter directory its float layers are fused for good (no second copy of
the base), otherwise the base is kept and activating an adapter merges its layers again
(docs/PERFORMANCE.md measures that switch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mlx.utils import tree_unflatten

from ..adapters import CONFIG, load_adapter
from ..errors import MissingFileError
from ..generate import PromptCache
from ..inference import prepare, prepare_for_inference, unprepare
from .schema import APIError, bad_request


@dataclass
class Variant:
    """The base with one adapter: the modules that adapter replaces, and its KV cache."""
    name: str
    path: Path | None
    modules: dict = field(default_factory=dict)
    cache: PromptCache | None = None
    load_seconds: float = 0.0


class Adapters:
    """Every servable variant of the one loaded base; `activate` swaps modules in place."""

    def __init__(self, model, default_name: str, default_adapter=None, adapter_dir=None):
        self.model, self.default_name = model, default_name
        self.root = Path(adapter_dir).resolve() if adapter_dir is not None else None
        if self.root is not None and not self.root.is_dir():
            raise MissingFileError(f"{adapter_dir}: adapter directory not found")
        self.base = dict(model.named_modules())
        self.variants: dict[str, Variant] = {}
        self.active: Variant | None = None
        self.switch_seconds = 0.0
        self.default = self._load(Variant(default_name, Path(default_adapter) if default_adapter else None))

    def names(self) -> list[str]:
        """Ids of /v1/models: the default, then each adapter directly under the adapter dir."""
        if self.root is None:
            return [self.default_name]
        found = sorted(p.name for p in self.root.iterdir()
                       if (p / CONFIG).is_file() and p.resolve().parent == self.root)
        return [self.default_name] + [n for n in found if n != self.default_name]

    def resolve(self, name: str | None, param: str = "model") -> Variant:
        """The variant a request names; refuses paths that are not entries of the adapter dir."""
        if name is None or name in (self.default_name, "default_model"):
            return self.default
        if name in self.variants:
            return self.variants[name]
        if self.root is None:
            raise APIError(404, f"model '{name}' not found (this server has '{self.default_name}')",
                           "not_found_error", param)
        p = Path(name)
        if p.is_absolute() or len(p.parts) != 1 or p.name in ("", ".", ".."):
            raise bad_request(f"'{param}' must name an adapter directly under the adapter directory, "
                       f"not the path {name!r}", param)
        path = self.root / p
        if path.resolve().parent != self.root:  # a symlink leading out of the directory
            raise bad_request(f"'{param}': {name!r} leads outside the adapter directory", param)
        if not (path / CONFIG).is_file():
            raise APIError(404, f"model '{name}' not found (available: {', '.join(self.names())})",
                           "not_found_error", param)
        return self._load(Variant(name, path.resolve()))

    def _load(self, variant: Variant) -> Variant:
        """Build the adapter's layers on the bare base and keep the modules it replaced."""
        start = time.perf_counter()
        self._restore()
        if variant.path is not None:
            try:
                load_adapter(self.model, variant.path)
            except (ValueError, FileNotFoundError, KeyError) as e:
                self._restore_all()
                msg = e.args[0] if e.args else str(e)
                raise APIError(400, f"cannot load adapter '{variant.name}': {msg}",
                               param="model") from None
            self.model.eval()
            prepare_for_inference(self.model, keep_base=self.root is not None)
            now = dict(self.model.named_modules())
            changed = [p for p, m in self.base.items() if now.get(p) is not m]
            variant.modules = {p: now[p] for p in changed if _parent(p) not in changed}
            if self.root is None:  # never switched away from: let the replaced base layers go
                self.base = {p: m for p, m in self.base.items() if p not in changed}
        variant.cache = PromptCache(self.model)
        variant.load_seconds = time.perf_counter() - start
        self.variants[variant.name] = self.active = variant
        return variant

    def _restore(self) -> None:
        if self.active is not None and self.active.modules:
            unprepare(self.active.modules.values())
            self.model.update_modules(tree_unflatten([(p, self.base[p]) for p in self.active.modules]))
        self.active = None

    def _restore_all(self) -> None:
        """Put back every base module (after a failed load, whatever it touched)."""
        now = dict(self.model.named_modules())
        changed = [p for p, m in self.base.items() if now.get(p) is not m]
        top = [p for p in changed if _parent(p) not in changed]
        if top:
            self.model.update_modules(tree_unflatten([(p, self.base[p]) for p in top]))

    def activate(self, variant: Variant) -> None:
        """Make the model compute `variant` (the caller holds the model lock)."""
        if self.active is variant:
            return
        start = time.perf_counter()
        self._restore()
        if variant.modules:
            self.model.update_modules(tree_unflatten(list(variant.modules.items())))
            prepare(variant.modules.values())
        self.active = variant
        self.switch_seconds = time.perf_counter() - start


def _parent(path: str) -> str:
    return path.rpartition(".")[0]
