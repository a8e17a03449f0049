"""Put SMoA layers into an mlx-lm model: target discovery, patching, freezing."""

from __future__ import annotations

import re

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import get_total_parameters

from .layer import SMoALinear, adapter_layers
from .layouts.names import natural_key

# The authors' default targets (SPEC §1).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def linear_paths(model: nn.Module) -> list[str]:
    """Module paths of every plain or quantized linear layer, layers in numeric order."""
    paths = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    return sorted(paths, key=natural_key)


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def layer_relative(path: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj` (mlx-lm's key for it);
    a path outside the decoder layers stays whole."""
    m = _LAYER.search(path)
    return path[m.end() :] if m else path


def _short_names(paths) -> list[str]:
    names = set()
    for p in paths:
        rel = layer_relative(p)
        names.add(rel)
        names.add(rel.rsplit(".", 1)[-1])
    return sorted(names)


def target_paths(model: nn.Module, keys=None, num_layers=None) -> list[str]:
    """The module paths `keys` select, restricted to the last `num_layers` decoder layers.

    A key matches a path equal to it or ending in `.key`, so `q_proj`,
    `self_attn.q_proj` and `model.layers.0.self_attn.q_proj` all work (PEFT style).
    """
    keys = list(DEFAULT_TARGETS if keys is None else keys)
    candidates = linear_paths(model)
    unknown = [k for k in keys if not any(_matches(p, k) for p in candidates)]
    if unknown:
        raise ValueError(
            f"unknown target module(s) {unknown}; this model's linear layers are: "
            + ", ".join(_short_names(candidates))
        )
    n_total = len(model.layers)
    first = 0 if num_layers is None or num_layers < 0 else max(n_total - num_layers, 0)
    selected = []
    for p in candidates:
        if not any(_matches(p, k) for k in keys):
            continue
        m = _LAYER.search(p)
        if m is None or int(m.group(1)) >= first:
            selected.append(p)
    return selected


def apply_smoa(
    model: nn.Module,
    keys=None,
    num_layers=None,
    rank: int = 8,
    num_blocks: int = 2,
    alpha: float = 8.0,
    dropout: float = 0.0,
    branch_ranks=None,
    orders: dict | None = None,
) -> dict:
    """Freeze `model` and replace the selected projections by SMoALinear, in place.

    `orders` maps module path -> (row_order, col_order) to skip planning (loading).
    Returns a summary: trainable and total parameter counts and per-module details.
    """
    if any(isinstance(m, SMoALinear) for _, m in model.named_modules()):
        raise ValueError("model already has SMoA layers; load a fresh base model")
    paths = target_paths(model, keys, num_layers)
    modules = dict(model.named_modules())
    model.freeze()
    patched = []
    for p in paths:
        layer = SMoALinear.from_base(
            modules[p], rank=rank, num_blocks=num_blocks, alpha=alpha, dropout=dropout,
            branch_ranks=branch_ranks, orders=None if orders is None else orders[p],
        )
        layer.train(modules[p].training)  # an eval-mode model must not get active dropout
        patched.append((p, layer))
    model.update_modules(tree_unflatten(patched))
    return summarize(model)


def smoa_layers(model: nn.Module) -> dict[str, SMoALinear]:
    return adapter_layers(model, SMoALinear)


def summarize(model: nn.Module) -> dict:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = get_total_parameters(model)
    modules = {
        p: {
            "shape": list(m.shape),
            "num_blocks": m.num_blocks,
            "branch_ranks": m.branch_ranks,
            "trainable": sum(v.size for v in m.smoa_a + m.smoa_b),
        }
        for p, m in smoa_layers(model).items()
    }
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / max(total, 1),
        "modules": modules,
    }
