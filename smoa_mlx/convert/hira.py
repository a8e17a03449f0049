"""Hugging Face PEFT HiRA adapters: SMoA with a single block (SPEC §1, K = 1).

PEFT's HiRA is `ΔW = (B A) ⊙ W0` with no scale, keys `hira_A` (r, in) and
`hira_B` (out, r). Our K = 1 layer keeps A's columns in `col_order` and B's rows
in `row_order`, so export un-permutes them and folds `alpha / r` into B; import
permutes them and sets alpha = r (scale 1). Modules of different rank
(`rank_pattern`) are zero-padded to the largest rank, which leaves ΔW unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..adapters import save_adapter, smoa_config
from ..archs import model_type
from ..patch import apply_smoa, smoa_layers
from ..errors import AdapterError
from ..layouts.names import peft_key
from ..layouts.peft_io import PeftConfig, PeftDir, factor_shapes, write_peft_dir
from ..layouts.tensors import pad_rank
from .base import linear_shapes, peft_target_modules

PEFT_TYPE = "HIRA"


def _rank(hira_a, cfg: PeftConfig, path: str) -> int:
    """The module's rank: `rank_pattern`'s, or `r` as peft 0.21 actually builds (and saves) it.

    peft 0.21's HiRA dispatcher ignores `rank_pattern` when it creates a layer, so the
    files it writes have rank `r` everywhere; a later peft may honour the pattern.
    """
    ranks = (cfg.rank_of(path), cfg.r)
    return hira_a.shape[0] if hira_a is not None and hira_a.shape[0] in ranks else ranks[0]


def import_hira(model, peft: PeftDir, base: str, out_dir, log=print) -> dict:
    cfg = peft.config
    cfg.refuse({"fan_in_fan_out": (None,), "modules_to_save": (None,)})
    shapes = linear_shapes(model)
    paths = cfg.targets(list(shapes))
    mt = cfg.model_type
    ranks = {p: _rank(peft.tensors.get(peft_key(p, "hira_A", mt)), cfg, p) for p in paths}
    peft.check(*factor_shapes(paths, shapes, ranks, "hira_A", "hira_B", mt))
    rank = max(ranks.values())
    apply_smoa(model, keys=paths, rank=rank, num_blocks=1, alpha=rank, dropout=cfg.dropout)
    for p, layer in smoa_layers(model).items():
        rows, cols = np.array(layer.row_order), np.array(layer.col_order)
        a = peft.tensors[peft_key(p, "hira_A", mt)][:, cols]
        b = peft.tensors[peft_key(p, "hira_B", mt)][rows]
        layer.smoa_a = [mx.array(pad_rank(a, rank, 0))]
        layer.smoa_b = [mx.array(pad_rank(b, rank, 1))]
    if len(set(ranks.values())) > 1:
        log(f"rank_pattern: modules zero-padded to rank {rank}")
    save_adapter(model, out_dir, smoa_config(model, base_model=base, converted_from=str(peft.path)))
    return {"rank": rank}


def export_hira(model, base: str, out_dir, log=print) -> dict:
    layers = smoa_layers(model)
    params = smoa_config(model)["smoa_parameters"]
    if params["num_blocks"] != 1:
        raise AdapterError(
            f"HiRA is SMoA with one block; this adapter has num_blocks={params['num_blocks']}, whose "
            "update is block-diagonal and has no HiRA form. Export --format smoa (exact) or "
            "--format lora --rank R (lossy) instead"
        )
    tensors, mt = {}, model_type(model)
    for p, m in layers.items():
        rows, cols = np.array(m.row_order), np.array(m.col_order)
        a = np.array(m.smoa_a[0].astype(mx.float32))
        b = np.array(m.smoa_b[0].astype(mx.float32)) * np.float32(m.scale)
        hira_a, hira_b = np.empty_like(a), np.empty_like(b)
        hira_a[:, cols] = a
        hira_b[rows] = b
        tensors[peft_key(p, "hira_A", mt)] = hira_a
        tensors[peft_key(p, "hira_B", mt)] = hira_b
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": params["rank"],
        "target_modules": peft_target_modules(model, layers),
        "hira_dropout": params["dropout"],
        "fan_in_fan_out": False,
        "init_weights": True,
        "rank_pattern": {},
        "modules_to_save": None,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    write_peft_dir(out_dir, config, tensors)
    scale = params["alpha"] / params["rank"]
    log(f"scale alpha/r = {scale:g} folded into hira_B (PEFT's HiRA has no scale)")
    return {"scale": scale}
