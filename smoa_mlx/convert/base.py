"""The MLX base model a conversion works on: loading it, and reading its linear layers."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapters import load_adapter
from ..layer import adapter_layers, base_weight


def local_dir(path_or_repo: str) -> Path:
    """The local directory of a model path or an already downloaded Hugging Face repo."""
    from mlx_lm.utils import hf_repo_to_path

    path = Path(path_or_repo)
    return path if path.exists() else hf_repo_to_path(path_or_repo)


def load_base(model: str, adapter_path=None):
    """(mlx-lm model with the adapter if given, tokenizer, config, local model dir)."""
    from mlx_lm.utils import load

    mlx_model, tokenizer, config = load(model, return_config=True)
    if adapter_path is not None:
        load_adapter(mlx_model, adapter_path)
    mlx_model.eval()
    return mlx_model, tokenizer, config, local_dir(model)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every plain or quantized linear layer, without de-quantizing.

    A layer wrapped by an adapter (SMoA, LoRA: `wrapper.linear`) is listed under the
    wrapper's path, the module path the adapter files use.
    """
    wrapped = {f"{p}.linear": p for p, m in adapter_layers(model).items()}
    shapes = {}
    for path, m in model.named_modules():
        path = wrapped.get(path, path)
        if isinstance(m, nn.QuantizedLinear):
            shapes[path] = (m.weight.shape[0], m.weight.shape[1] * 32 // m.bits)
        elif isinstance(m, nn.Linear):
            shapes[path] = tuple(m.weight.shape)
    return shapes


def float32_weights(model, paths) -> dict[str, np.ndarray]:
    """The frozen base weights at `paths` (unwrapping adapter layers) as float32."""
    modules = dict(model.named_modules())
    return {p: np.array(base_weight(getattr(modules[p], "linear", modules[p])).astype(mx.float32))
            for p in paths}
