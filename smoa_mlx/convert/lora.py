"""Hugging Face PEFT LoRA adapters: import as an mlx-lm LoRA, export an SMoA update lossily.

Import writes an mlx-lm LoRA adapter directory (`fine_tune_type: "lora"`), which
`smoa_mlx.load` hands to mlx-lm's own loader, so chat/generate/fuse use it as is.
Its `keys` are full module paths, which mlx-lm matches against the whole model,
so exactly the modules in the PEFT file are adapted (any subset of layers, an
untied lm_head).
mlx-lm has one rank and one scale per adapter: modules of smaller rank
(`rank_pattern`) are zero-padded, and a module's own scale (`alpha_pattern`,
rsLoRA) relative to the adapter's is folded into its B.

Export approximates each dense SMoA update by its best rank-R factorisation
(truncated SVD, float64) and reports the relative Frobenius error it measures on
the saved float32 factors: SMoA updates are usually of much higher rank than R.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..adapters import smoa_config
from ..archs import model_type
from ..files import write_json
from ..patch import smoa_layers
from ..errors import ConfigError
from ..layouts.names import peft_key, target_modules
from ..layouts.peft_io import PeftDir, factor_shapes, write_peft_dir
from ..layouts.tensors import pad_rank, write_tensors
from .base import linear_shapes

PEFT_TYPE = "LORA"
UNSUPPORTED = {
    "use_dora": (None,), "bias": ("none", None), "lora_bias": (None,), "fan_in_fan_out": (None,),
    "modules_to_save": (None,), "layer_replication": (None,), "trainable_token_indices": (None,),
    "target_parameters": (None,),
}


def peft_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def import_lora(model, peft: PeftDir, base: str, out_dir, log=print) -> dict:
    cfg = peft.config
    cfg.refuse(UNSUPPORTED)
    shapes = linear_shapes(model)
    paths = cfg.targets(list(shapes))
    ranks = {p: cfg.rank_of(p) for p in paths}
    scales = {p: peft_scale(cfg.alpha_of(p), ranks[p], cfg.use_rslora) for p in paths}
    mt = cfg.model_type
    peft.check(*factor_shapes(paths, shapes, ranks, "lora_A.weight", "lora_B.weight", mt))
    rank, scale = max(ranks.values()), peft_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora)
    if scale == 0:
        raise ConfigError(f"{cfg.path}: lora_alpha is 0, the adapter is a no-op")
    weights = {}
    for p in paths:
        a = peft.tensors[peft_key(p, "lora_A.weight", mt)]
        b = peft.tensors[peft_key(p, "lora_B.weight", mt)]
        if scales[p] != scale:
            b = b * np.float32(scales[p] / scale)
        weights[f"{p}.lora_a"] = pad_rank(a.T, rank, 1)
        weights[f"{p}.lora_b"] = pad_rank(b.T, rank, 0)
    config = {
        "fine_tune_type": "lora",
        "model": base,
        "num_layers": len(model.layers),
        "lora_parameters": {
            "rank": rank, "scale": scale, "dropout": cfg.dropout, "keys": paths,
        },
        "converted_from": str(peft.path),
    }
    write_tensors(out_dir / "adapters.safetensors", weights)
    write_json(out_dir / "adapter_config.json", config)
    if len(set(ranks.values())) > 1 or len(set(scales.values())) > 1:
        log(f"rank_pattern/alpha_pattern: modules padded to rank {rank}, scales folded into lora_b")
    return {"rank": rank, "scale": scale}


def low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 factors (B (out, R), A (R, in)) of the best rank-R approximation of `delta`."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    b = pad_rank(u[:, :k] * root, rank, 1)
    a = pad_rank(root[:, None] * vt[:k], rank, 0)
    return b.astype(np.float32), a.astype(np.float32)


def export_lora(model, base: str, out_dir, rank=None, log=print) -> dict:
    layers = smoa_layers(model)
    params = smoa_config(model)["smoa_parameters"]
    rank = params["rank"] if rank is None else int(rank)
    if rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    tensors, errors, err_sq, norm_sq, mt = {}, {}, 0.0, 0.0, model_type(model)
    for p, m in layers.items():
        delta = np.array(m.delta_weight().astype(mx.float32), dtype=np.float64)
        b, a = low_rank(delta, rank)
        err = np.linalg.norm(delta - b.astype(np.float64) @ a)
        norm = np.linalg.norm(delta)
        errors[p] = err / norm if norm > 0 else 0.0
        err_sq, norm_sq = err_sq + err**2, norm_sq + norm**2
        tensors[peft_key(p, "lora_A.weight", mt)] = a
        tensors[peft_key(p, "lora_B.weight", mt)] = b
        log(f"{p}: relative Frobenius error {errors[p]:.3e}")
    overall = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    log(f"rank-{rank} LoRA approximation of the SMoA update: overall relative Frobenius error {overall:.3e}")
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "lora_dropout": params["dropout"],
        "target_modules": target_modules(layers, list(linear_shapes(model)), mt),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    write_peft_dir(out_dir, config, tensors)
    return {"relative_error": overall, "module_errors": errors}
