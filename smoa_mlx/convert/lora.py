"""Hugging Face PEFT LoRA adapters: import as an mlx-lm LoRA, export an SMoA update lossily.

Import writes an mlx-lm LoRA adapter directory (`fine_tune_type: "lora"`), which
`smoa_mlx.load` hands to mlx-lm's own loader, so chat/generate/fuse use it as is.
Its `keys` are full module paths, which mlx-lm matches against the whole model,
so exactly the modules in the PEFT file are adapted (any subset of layers, an
untied lm_head).
mlx-lm has one rank and one scale per adapter: modules of smaller rank
(`rank_pattern`) are zero-padded, and a module's own scale (`alpha_pattern`,
rsLoRA) relative to the adapter's is folded into its B.

Export approximates each SMoA update by its best rank-R factorisation
(truncated SVD, float64) and reports the relative Frobenius error it measures on
the saved float32 factors: SMoA updates are usually of much higher rank than R.

MoE experts cross as PEFT's `target_parameters` (`ParamWrapper`): one LoRA per
transformers 3-D parameter, `experts.gate_up_proj` (mlx-lm's gate_proj rows over
its up_proj rows) and `experts.down_proj`, both (E, out, in), rank r per expert,
packed as lora_A (E*r, in) with expert-major rows and lora_B (out, r*E) with
rank-major columns (`get_delta_weight`'s reshapes). Import splits gate_up_proj
onto mlx-lm's LoRASwitchLinear gate_proj / up_proj: the same A, the row halves of B.
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
from ..layouts.names import hf_expert, peft_key, peft_param_key, select_targets, target_modules
from ..layouts.peft_io import PeftDir, factor_shapes, write_peft_dir
from ..layouts.tensors import pad_rank, write_tensors
from ..switch import SMoASwitchLinear
from .base import linear_shapes, peft_target_modules

PEFT_TYPE = "LORA"
UNSUPPORTED = {
    "use_dora": (None,), "bias": ("none", None), "lora_bias": (None,), "fan_in_fan_out": (None,),
    "modules_to_save": (None,), "layer_replication": (None,), "trainable_token_indices": (None,),
}


def peft_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def expert_params(model) -> dict[str, list[tuple[str, int | None]]]:
    """Each transformers expert parameter of `model` -> the mlx-lm expert layers it holds,
    with their half of its rows (`names.hf_expert`), gate before up."""
    params = {}
    for path in linear_shapes(model, experts=True):
        param, half = hf_expert(path)
        params.setdefault(param, []).append((path, half))
    return {k: sorted(v, key=lambda x: x[1] or 0) for k, v in params.items()}


def to_peft_experts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert factors A (E, r, in), B (E, out, r) as PEFT's ParamWrapper lora_A, lora_B."""
    n_exp, d_out, r = b.shape
    return a.reshape(n_exp * r, -1), b.transpose(1, 2, 0).reshape(d_out, r * n_exp)


def from_peft_experts(a: np.ndarray, b: np.ndarray, n_exp: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `to_peft_experts`."""
    return a.reshape(n_exp, -1, a.shape[-1]), b.reshape(b.shape[0], -1, n_exp).transpose(2, 0, 1)


def import_lora(model, peft: PeftDir, base: str, out_dir, log=print) -> dict:
    cfg = peft.config
    cfg.refuse(UNSUPPORTED)
    shapes = linear_shapes(model)
    paths = cfg.targets(list(shapes))
    mt = cfg.model_type
    experts, expert_shapes = expert_params(model), linear_shapes(model, experts=True)
    params = select_targets(list(experts), cfg.target_parameters) if cfg.target_parameters else []
    if cfg.target_parameters and not params:
        raise ConfigError(f"{cfg.path}: target_parameters {cfg.target_parameters!r} match no MoE expert "
                          "parameter of the base model")
    ranks = {p: cfg.rank_of(p) for p in paths + params}
    scales = {p: peft_scale(cfg.alpha_of(p), ranks[p], cfg.use_rslora) for p in ranks}
    expected, why = factor_shapes(paths, shapes, ranks, "lora_A.weight", "lora_B.weight", mt)
    for q in params:
        (n_exp, _, d_in), r = expert_shapes[experts[q][0][0]], ranks[q]
        d_out = sum(expert_shapes[p][1] for p, _ in experts[q])
        a, b = (peft_param_key(q, params, leaf) for leaf in ("lora_A.weight", "lora_B.weight"))
        expected[a], expected[b] = (n_exp * r, d_in), (d_out, r * n_exp)
        why[a] = why[b] = f"{q} is {(n_exp, d_out, d_in)} in the base model, r={r}"
    peft.check(expected, why)
    rank, scale = max(ranks.values()), peft_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora)
    if scale == 0:
        raise ConfigError(f"{cfg.path}: lora_alpha is 0, the adapter is a no-op")

    def factors(p, key):  # (A, B) as saved, B carrying the module's scale relative to `scale`
        b = peft.tensors[key(p, "lora_B.weight")]
        return peft.tensors[key(p, "lora_A.weight")], b * np.float32(scales[p] / scale)

    weights, keys = {}, list(paths)
    for p in paths:
        a, b = factors(p, lambda q, leaf: peft_key(q, leaf, mt))
        weights[f"{p}.lora_a"] = pad_rank(a.T, rank, 1)
        weights[f"{p}.lora_b"] = pad_rank(b.T, rank, 0)
    for p in params:
        a, b = from_peft_experts(*factors(p, lambda q, leaf: peft_param_key(q, params, leaf)),
                                 expert_shapes[experts[p][0][0]][0])
        for path, half in experts[p]:
            d_out = expert_shapes[path][1]
            rows = slice(None) if half is None else slice(half * d_out, (half + 1) * d_out)
            weights[f"{path}.lora_a"] = pad_rank(a, rank, -2)
            weights[f"{path}.lora_b"] = pad_rank(b[:, rows], rank, -1)
            keys.append(path)
    config = {
        "fine_tune_type": "lora",
        "model": base,
        "num_layers": len(model.layers),
        "lora_parameters": {
            "rank": rank, "scale": scale, "dropout": cfg.dropout, "keys": keys,
        },
        "converted_from": str(peft.path),
    }
    write_tensors(out_dir / "adapters.safetensors", weights)
    write_json(out_dir / "adapter_config.json", config)
    if len(set(ranks.values())) > 1 or len(set(scales.values())) > 1:
        log(f"rank_pattern/alpha_pattern: modules padded to rank {rank}, scales folded into lora_b")
    return {"rank": rank, "scale": scale}


def low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 factors (B (..., out, R), A (..., R, in)) of the best rank-R approximation of
    `delta`, or of each matrix of a stack of them (MoE experts)."""
    u, s, vt = np.linalg.svd(np.asarray(delta, np.float64), full_matrices=False)
    k = min(rank, s.shape[-1])
    root = np.sqrt(s[..., :k])
    b = pad_rank(u[..., :k] * root[..., None, :], rank, -1)
    a = pad_rank(root[..., None] * vt[..., :k, :], rank, -2)
    return b.astype(np.float32), a.astype(np.float32)


def expert_deltas(model, layers) -> dict[str, np.ndarray]:
    """The SMoA update (float64, (E, out, in)) of every transformers expert parameter holding
    an adapted expert layer; gate_up_proj stacks gate over up, a half not adapted being zero."""
    deltas = {}
    for param, members in expert_params(model).items():
        parts = [np.array(layers[p].delta_weight().astype(mx.float32), np.float64) if p in layers else None
                 for p, _ in members]
        if any(x is not None for x in parts):
            shape = next(x.shape for x in parts if x is not None)
            deltas[param] = np.concatenate([np.zeros(shape) if x is None else x for x in parts], axis=1)
    return deltas


def export_lora(model, base: str, out_dir, rank=None, log=print) -> dict:
    layers = smoa_layers(model)
    params = smoa_config(model)["smoa_parameters"]
    rank = params["rank"] if rank is None else int(rank)
    if rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    dense = {p: np.array(m.delta_weight().astype(mx.float32), np.float64)
             for p, m in layers.items() if not isinstance(m, SMoASwitchLinear)}
    experts = expert_deltas(model, {p: m for p, m in layers.items() if isinstance(m, SMoASwitchLinear)})
    tensors, errors, err_sq, norm_sq, mt = {}, {}, 0.0, 0.0, model_type(model)
    for p, delta in {**dense, **experts}.items():
        b, a = low_rank(delta, rank)
        err = np.linalg.norm(delta - b.astype(np.float64) @ a)
        norm = np.linalg.norm(delta)
        errors[p] = err / norm if norm > 0 else 0.0
        err_sq, norm_sq = err_sq + err**2, norm_sq + norm**2
        if p in dense:
            tensors[peft_key(p, "lora_A.weight", mt)], tensors[peft_key(p, "lora_B.weight", mt)] = a, b
        else:
            a, b = to_peft_experts(a, b)
            tensors[peft_param_key(p, experts, "lora_A.weight")] = a
            tensors[peft_param_key(p, experts, "lora_B.weight")] = b
        log(f"{p}: relative Frobenius error {errors[p]:.3e}")
    overall = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    log(f"rank-{rank} LoRA approximation of the SMoA update: overall relative Frobenius error {overall:.3e}")
    dropout = params["dropout"]
    if experts and dropout:
        dropout = 0.0
        log(f"note: lora_dropout {params['dropout']:g} written as 0: PEFT's LoRA on expert parameters "
            "(ParamWrapper) refuses dropout")
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "lora_dropout": dropout,
        "target_modules": peft_target_modules(model, dense) if dense else None,
        "target_parameters": target_modules(experts, list(expert_params(model)), mt) if experts else None,
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
