"""Put SMoA layers into an mlx-lm model: target discovery, patching, freezing."""

from __future__ import annotations

import re

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import get_total_parameters

from .archs import (
    ALL_LINEAR, LLAMA_TARGETS, SWITCH_TYPES, adaptable, decoder_layers, default_targets, layer_index,
    model_type,
)
from .errors import ConfigError, ModelError
from .layer import SMoALinear, adapter_layers
from .layouts.names import natural_key
from .switch import SMoASwitchLinear

# The authors' default targets (SPEC §1), in Llama's names; `archs.TARGETS` has the others.
DEFAULT_TARGETS = LLAMA_TARGETS
SMOA_TYPES = (SMoALinear, SMoASwitchLinear)
# The first `<name>.<index>.` of a path: the decoder layer in every mlx-lm layout.
_LAYER = re.compile(r"^(?:.*?\.)?\d+\.")


def linear_paths(model: nn.Module) -> list[str]:
    """Module paths of every plain, quantized or MoE-expert linear layer, layers in numeric order."""
    paths = [p for p, m in model.named_modules() if adaptable(m)]
    return sorted(paths, key=natural_key)


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def layer_relative(path: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj` (mlx-lm's key for it; also
    `model.h.3.attn.c_attn` -> `attn.c_attn`); a path outside the decoder layers stays whole."""
    m = _LAYER.match(path)
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
    None: the architecture's defaults (`archs.TARGETS`); `all-linear` (PEFT's): every
    linear layer, MoE experts and routers included, but the output head. Modules
    outside the decoder layers are kept whatever `num_layers` is, as in mlx-lm.
    """
    default = keys is None
    candidates = linear_paths(model)
    if not candidates:
        raise ModelError(f"model type {model_type(model)!r} has no linear layers SMoA can adapt "
                         "(nn.Linear, QuantizedLinear, SwitchLinear)")
    layers = decoder_layers(model)
    keys = default_keys(model, candidates) if default else [keys] if isinstance(keys, str) else list(keys)
    if keys == [ALL_LINEAR]:
        head = {p for p in candidates if layer_index(p, layers) is None and _is_head(model, p)}
        keys = [p for p in candidates if p not in head]
    unknown = [k for k in keys if not any(_matches(p, k) for p in candidates)]
    if unknown:
        raise ConfigError(
            f"unknown target module(s) {unknown}; this model's linear layers are: "
            + ", ".join(_short_names(candidates)) + f" (or {ALL_LINEAR})"
        )
    n_total = len(model.layers)
    first = 0 if num_layers is None or num_layers < 0 else max(n_total - num_layers, 0)
    selected = []
    for p in candidates:
        if not any(_matches(p, k) for k in keys):
            continue
        i = layer_index(p, layers)
        if i is None or i >= first:
            selected.append(p)
    uncovered = sorted(set(range(first, n_total)) - {layer_index(p, layers) for p in selected})
    if default and uncovered:
        raise ModelError(
            f"model type {model_type(model)!r}: the default targets ({' '.join(default_targets(model))}) "
            f"adapt nothing in decoder layer(s) {uncovered[:8]}; pass --targets (this model's linear "
            f"layers are: {', '.join(_short_names(candidates))}) or --targets {ALL_LINEAR}"
        )
    return selected


def default_keys(model: nn.Module, candidates=None) -> list[str]:
    """The architecture's default keys that name a module of this model: one table row serves
    a family (DeepSeek's q_proj or q_a_proj/q_b_proj) and hybrids, whose attention names
    exist only in some layers; target_paths checks that every decoder layer gets one."""
    candidates = linear_paths(model) if candidates is None else candidates
    return [k for k in default_targets(model) if any(_matches(p, k) for p in candidates)]


def _is_head(model: nn.Module, path: str) -> bool:
    """The output head: PEFT's all-linear leaves it out (`lm_head`, gpt_neox `embed_out`,
    internlm2 `output`): the linear layer outside the decoder layers producing the vocabulary."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    return path.endswith("lm_head") or dict(model.named_modules())[path].weight.shape[-2] == vocab


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
    progress: bool = True,
) -> dict:
    """Freeze `model` and replace the selected projections by SMoALinear (SMoASwitchLinear
    on MoE experts), in place.

    `orders` maps module path -> (row_order, col_order) to skip planning (loading).
    `progress`: a bar over the weights to plan (each expert counts), shown on a terminal
    only; a first plan of a 1B model takes minutes, a cached one is instant.
    Returns a summary: trainable and total parameter counts and per-module details.
    """
    if any(isinstance(m, SMOA_TYPES) for _, m in model.named_modules()):
        raise ConfigError("model already has SMoA layers; load a fresh base model")
    paths = target_paths(model, keys, num_layers)
    modules = dict(model.named_modules())
    model.freeze()
    bar = _progress(modules, paths if orders is None and progress else [])
    tick = (lambda n=1: None) if bar is None else bar.update
    common = dict(rank=rank, num_blocks=num_blocks, alpha=alpha, dropout=dropout, branch_ranks=branch_ranks)
    patched = []
    for p in paths:
        known = None if orders is None else orders[p]
        if isinstance(modules[p], SWITCH_TYPES):
            layer = SMoASwitchLinear.from_base(modules[p], orders=known, on_plan=tick, **common)
        else:
            layer = SMoALinear.from_base(modules[p], orders=known, **common)
            tick()
        layer.train(modules[p].training)  # an eval-mode model must not get active dropout
        patched.append((p, layer))
    if bar is not None:
        bar.close()
    model.update_modules(tree_unflatten(patched))
    return summarize(model)


def _progress(modules: dict, paths: list[str]):
    """A tqdm bar (lazily imported) over the weights `paths` hold, or None."""
    if not paths:
        return None
    from tqdm import tqdm

    total = sum(modules[p].num_experts if isinstance(modules[p], SWITCH_TYPES) else 1 for p in paths)
    return tqdm(total=total, desc="planning SMoA", unit="weight", disable=None, leave=False)


def smoa_layers(model: nn.Module) -> dict[str, SMoALinear]:
    return adapter_layers(model, SMOA_TYPES)


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
