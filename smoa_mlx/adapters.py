"""SMoA adapter directories (SPEC §2): `adapter_config.json` + `adapters.safetensors`.

The orders are saved, so loading never plans. Each adapted base weight is
fingerprinted by a fixed sample of 64 of its entries; a base whose sample is not
nearly parallel to the saved one (cosine < 0.8) is a different model. Unrelated
weights give cosines around 0 +- 0.125; measured on stories260K, quantized copies of
the same base give >= 0.993 (4-bit), >= 0.968 (3-bit) and >= 0.88 (2-bit), and
float16/bfloat16 casts > 0.99999, so every mlx-lm quantization is accepted.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .archs import adaptable
from .errors import AdapterError, ConfigError, MissingFileError
from .files import load_safetensors, read_config, save_safetensors, write_json
from .layer import base_weight
from .layouts.fields import Fields
from .layouts.tensors import check_tensors
from .patch import apply_smoa, smoa_layers
from .plan import split_rank

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
# mlx-lm's fine-tune types (an absent one is "lora", as mlx-lm reads it) and ours.
FINE_TUNE_TYPES = ("smoa", "lora", "dora", "full")
FINGERPRINT_SIZE = 64
MIN_SIMILARITY = 0.8


def fingerprint(weight: mx.array) -> list[float]:
    """A fixed pseudo-random sample of entries, positions seeded by the shape (MoE experts:
    of the (E * d_out, d_in) stack)."""
    weight = weight.reshape(-1, weight.shape[-1])
    d_out, d_in = weight.shape
    rng = np.random.default_rng([d_out, d_in])
    rows = mx.array(rng.integers(0, d_out, FINGERPRINT_SIZE).astype(np.uint32))
    cols = mx.array(rng.integers(0, d_in, FINGERPRINT_SIZE).astype(np.uint32))
    return np.array(weight[rows, cols].astype(mx.float32), dtype=np.float64).tolist()


def similarity(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    """Everything an adapter file holds: per-block A/B and the orders of every SMoA layer."""
    out = {}
    for path, layer in smoa_layers(model).items():
        for name, value in tree_flatten(layer.trainable_parameters()):
            out[f"{path}.{name}"] = value
        out[f"{path}.row_order"] = layer.row_order
        out[f"{path}.col_order"] = layer.col_order
    return out


def smoa_config(model: nn.Module, base_model: str | None = None, **extra) -> dict:
    """The adapter config describing the SMoA layers of `model` (extra keys are kept)."""
    layers = smoa_layers(model)
    if not layers:
        raise AdapterError("model has no SMoA layers to save")
    first = next(iter(layers.values()))
    params = {
        "rank": first.rank,
        "num_blocks": first.num_blocks,
        "branch_ranks": first.branch_ranks,
        "alpha": first.alpha,
        "dropout": first.dropout_p,
    }
    return {
        **extra,
        "fine_tune_type": "smoa",
        "model": base_model,
        "smoa_parameters": params,
        "modules": list(layers),
        "fingerprints": {p: fingerprint(base_weight(m.linear)) for p, m in layers.items()},
    }


def save_adapter(model: nn.Module, adapter_path, config: dict | None = None, weights_file=WEIGHTS):
    """Write the adapter directory atomically, file by file (weights first)."""
    adapter_path = Path(adapter_path)
    config = config if config is not None else smoa_config(model)
    save_safetensors(adapter_path / weights_file, adapter_tensors(model))
    write_json(adapter_path / CONFIG, config)
    return adapter_path


def _check_base(model: nn.Module, config: dict, weights: dict, where: Path, file: Path) -> dict:
    """Refuse a base the adapter was not trained on; return the saved orders, validated."""
    if smoa_layers(model):
        raise AdapterError(f"{where}: model already has SMoA layers; load a fresh base model")
    modules = dict(model.named_modules())
    orders = {}
    for path in config["modules"]:
        if path not in modules or not adaptable(modules[path]):
            raise AdapterError(f"{where}: adapter module {path} is not a linear layer of this model")
        w = base_weight(modules[path])
        saved = config.get("fingerprints", {}).get(path)
        if saved is not None:
            sim = similarity(fingerprint(w), saved) if len(saved) == FINGERPRINT_SIZE else 0.0
            if sim < MIN_SIMILARITY:
                raise AdapterError(
                    f"{where}: adapter was trained on a different base model "
                    f"(trained on {config.get('model')!r}): module {path} does not match "
                    f"(weight similarity {sim:.3f} < {MIN_SIMILARITY})"
                )
        orders[path] = tuple(
            _order(weights, f"{path}.{name}", w.shape[:-2] + (n,), file)
            for name, n in (("row_order", w.shape[-2]), ("col_order", w.shape[-1]))
        )
    return orders


def _order(weights: dict, key: str, shape: tuple, file: Path) -> np.ndarray:
    """A saved order: one permutation of shape[-1] indices (one per expert: shape (E, n))."""
    if key not in weights:
        raise AdapterError(f"{file}: missing tensor {key}")
    order, n = np.array(weights[key]), shape[-1]
    if order.shape != shape or not (np.sort(order, axis=-1) == np.arange(n)).all():
        raise AdapterError(
            f"{file}: tensor {key} must be a permutation of {n} indices (shape {order.shape})"
        )
    return order


def read_adapter_config(adapter_path) -> dict:
    """`adapter_config.json`, checked so that loading cannot fail deep inside MLX or mlx-lm:
    a wrong type, a missing or unknown field is one line naming the file and the key."""
    path = Path(adapter_path) / CONFIG
    config = read_config(path)
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise ConfigError(f"{path}: fine_tune_type {kind!r} is not one of {', '.join(FINE_TUNE_TYPES)}")
    fields = Fields(config, path)
    if kind == "smoa":
        fields.names("modules")
        params = fields.section("smoa_parameters")
        params.require("rank", "num_blocks", "alpha")
        rank = params.number("rank", None, int, minimum=1)
        num_blocks = params.number("num_blocks", None, int, minimum=1)
        params.number("alpha", None, float)
        params.number("dropout", 0.0, float, minimum=0)
        try:
            split_rank(rank, num_blocks, params.ints("branch_ranks"))
        except ValueError as e:
            raise ConfigError(f"{path}: smoa_parameters: {e}") from None
        prints = config.get("fingerprints", {})
        if not isinstance(prints, dict) or not all(
                isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in prints.values()):
            raise ConfigError(f"{path}: fingerprints must map module paths to lists of numbers")
    elif kind != "full":
        if "fine_tune_type" not in config and "lora_parameters" not in config:
            raise ConfigError(f"{path}: fine_tune_type is missing (and the config is no mlx-lm LoRA "
                              "adapter either: no lora_parameters)")
        fields.require("num_layers")
        fields.number("num_layers", None, int)
        params = fields.section("lora_parameters")
        params.require("rank", "scale")
        params.number("rank", None, int, minimum=1)
        params.number("scale", None, float)
        params.number("dropout", 0.0, float, minimum=0)
        params.names("keys", optional=True)
    return config


def load_adapter(model: nn.Module, adapter_path, weights_file=WEIGHTS) -> dict:
    """Patch `model` with the SMoA adapter in `adapter_path`; returns its config.

    A bad adapter raises a one-line SMoAError naming the file, key, module or
    tensor at fault and leaves the model's layers as they were. mlx-lm
    LoRA/DoRA/full adapter directories are delegated to mlx-lm's own loader.
    """
    adapter_path = Path(adapter_path)
    config = read_adapter_config(adapter_path)
    file = adapter_path / weights_file
    if config.get("fine_tune_type", "lora") != "smoa":
        return _load_mlx_lm(model, adapter_path, config)
    weights = load_safetensors(file)
    paths, p = config["modules"], config["smoa_parameters"]
    params = {k: p.get(k) for k in ("rank", "num_blocks", "alpha", "dropout", "branch_ranks")}
    params["dropout"] = params["dropout"] or 0.0
    orders = _check_base(model, config, weights, adapter_path, file)
    originals = dict(model.named_modules())
    try:
        apply_smoa(model, keys=paths, orders=orders, **params)
        expected = adapter_tensors(model)
        check_tensors(weights, {k: v.shape for k, v in expected.items()}, file)
    except ValueError as e:
        model.update_modules(tree_unflatten([(q, originals[q]) for q in paths]))
        msg = str(e)
        raise AdapterError(msg if msg.startswith(str(file)) else f"{adapter_path}: {msg}") from None
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def _load_mlx_lm(model: nn.Module, adapter_path: Path, config: dict) -> dict:
    """mlx-lm's loader, its errors made one line: the report of incompatible tensors is cut
    to the first, MLX's complaint about an unreadable file names the file."""
    from mlx_lm.tuner.utils import load_adapters

    file = adapter_path / WEIGHTS
    if not file.is_file():
        raise MissingFileError(f"{file}: file not found")
    try:
        load_adapters(model, str(adapter_path))
    except RuntimeError as e:  # MLX's safetensors parser
        raise AdapterError(f"{file}: not a readable safetensors file ({e})") from None
    except (ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e.args[0] if e.args else e).splitlines() if line.strip()]
        lines = lines or [type(e).__name__]
        raise AdapterError(f"{adapter_path}: {lines[1] if len(lines) > 1 else lines[0]}") from None
    return config
