"""An adapter applied for inference at the base's speed (generate, chat, serve).

Training keeps SMoA's layers unmerged (A and B change every step); inference does
not, so every SMoA layer is prepared once when its adapter is loaded for inference
(`SMoALinear.prepare`): a float base computes with `W0 + ΔW`, one plain matmul as
the base's; a quantized base keeps its weight (re-quantizing the merged weight rounds
the update away: fuse_check) and adds its update in the format that decodes fastest on
this device (`layer.PREPARED_FORMATS`: folded, or each block's ΔW_k at 8 bits or float32).

Two ways, by whether the bare base is needed again:
- `keep_base=False` (generate, chat, serve with one adapter): a float layer is
  replaced by its fused plain layer, so W0 is freed and nothing is kept twice;
- `keep_base=True` (serve --adapter-dir, which switches adapters per request): the
  base stays untouched beside the prepared arrays of the active adapter's layers, and
  `unprepare` drops those (switching back prepares again: docs/PERFORMANCE.md has the cost).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .layer import SMoALinear, adapter_layers


def prepare_for_inference(model: nn.Module, keep_base: bool = False) -> int:
    """Prepare every SMoA layer of `model` for inference (module docstring); returns how many."""
    layers = adapter_layers(model, SMoALinear)
    if keep_base:
        prepare(layers.values())
        return len(layers)
    fused = []
    for path, layer in layers.items():
        if isinstance(layer.linear, nn.Linear):
            fused.append((path, layer.fuse()))
        else:
            layer.prepare()
    if fused:
        model.update_modules(tree_unflatten(fused))
        mx.eval([m.parameters() for _, m in fused])
    return len(layers)


def _smoa_in(modules):
    """The SMoA layers among `modules` and their children (unordered: a switch walks them
    on every request, so not `adapter_layers`' sorted walk)."""
    for module in modules:
        if isinstance(module, SMoALinear):  # what apply_smoa replaces: no walk needed
            yield module
        else:
            yield from (m for _, m in module.named_modules() if isinstance(m, SMoALinear))


def prepare(modules) -> None:
    """`prepare_for_inference(..., keep_base=True)` on these modules (and their children)
    only: what switching to an adapter does, without walking the whole model."""
    for layer in _smoa_in(modules):
        layer.prepare()


def unprepare(modules) -> None:
    """Drop what `prepare` made in these modules (and their children): the base alone again."""
    for layer in _smoa_in(modules):
        layer.unprepare()
