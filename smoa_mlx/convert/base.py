"""The MLX base model a conversion works on (loaded by `loader.load_base`): its linear layers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from ..archs import model_type
from ..layer import adapter_layers, base_weight
from ..layouts.names import target_modules


def linear_shapes(model: nn.Module, experts: bool = False) -> dict[str, tuple[int, ...]]:
    """(d_out, d_in) of every plain or quantized linear layer, without de-quantizing; with
    `experts`, (E, d_out, d_in) of every MoE expert layer (SwitchLinear) instead.

    A layer wrapped by an adapter (SMoA, LoRA: `wrapper.linear`) is listed under the
    wrapper's path, the module path the adapter files use.
    """
    wrapped = {f"{p}.linear": p for p, m in adapter_layers(model).items()}
    plain, quantized = ((SwitchLinear, QuantizedSwitchLinear) if experts
                        else (nn.Linear, nn.QuantizedLinear))
    shapes = {}
    for path, m in model.named_modules():
        path = wrapped.get(path, path)
        if isinstance(m, quantized):
            shapes[path] = (*m.weight.shape[:-1], m.weight.shape[-1] * 32 // m.bits)
        elif isinstance(m, plain):
            shapes[path] = tuple(m.weight.shape)
    return shapes


def peft_target_modules(model: nn.Module, selected) -> list[str] | str:
    """The PEFT `target_modules` entry of adapted linear layers `selected` of `model`."""
    return target_modules(selected, list(linear_shapes(model)), model_type(model),
                          experts=list(linear_shapes(model, experts=True)))


def float32_weights(model, paths, rounded_to: str | None = None) -> dict[str, np.ndarray]:
    """The frozen base weights at `paths` (unwrapping adapter layers) as float32, first
    rounded to the dtype named `rounded_to` if given ("bfloat16": what a PyTorch loader
    that loads the base in bfloat16 plans from)."""
    modules = dict(model.named_modules())
    out = {}
    for p in paths:
        w = base_weight(getattr(modules[p], "linear", modules[p]))
        if rounded_to is not None:
            w = w.astype(getattr(mx, rounded_to))
        out[p] = np.array(w.astype(mx.float32))
    return out
