"""The authors' SMoA layout (SPEC §2.1), framework-neutral: keys, parsing, orders.

PEFT-style keys `lora_A.<k>.weight` / `lora_B.<k>.weight`; their files carry no
row/column orders, which their loader recomputes from the base weight (float32
SVD, argsort). `plan_orders` does the same with `make_plan` and reports the
smallest score gaps, because a near-tie that the two computations break
differently changes which coordinates an A column or B row multiplies. Our
exports add the orders in `smoa_orders.safetensors`, which readers prefer.
Both `convert/` (MLX) and `torch/` (PyTorch) read adapters through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..plan import split_rank, split_sizes
from ..plan_cache import cached_plan
from ..errors import AdapterError, ConfigError
from .names import peft_key
from .peft_io import PeftDir
from .tensors import check_tensors, read_tensors

PEFT_TYPE = "SMOA"
ORDERS = "smoa_orders.safetensors"
# Float32 SVD scores (the authors' loader) differ from float64 ones by up to ~6e-7 * q
# (measured on stories260K, q = min(d_out, d_in)); gaps below NEAR_TIE * q may flip.
NEAR_TIE = 2e-6


@dataclass
class SMoAAdapter:
    """A parsed authors'-layout adapter: per module, per block A (r_k, in_k) and B (out_k, r_k)."""

    rank: int
    num_blocks: int
    branch_ranks: list[int]
    alpha: float
    dropout: float
    blocks: dict[str, tuple[list[np.ndarray], list[np.ndarray]]]
    orders: dict[str, tuple[np.ndarray, np.ndarray]] | None  # from ORDERS, when present


def block_key(path: str, side: str, k: int, model_type: str | None) -> str:
    return peft_key(path, f"lora_{side}.{k}.weight", model_type)


def read_smoa(peft: PeftDir, shapes: dict[str, tuple[int, int]]) -> SMoAAdapter:
    """Validate an authors'-layout adapter against the base's linear `shapes` and parse it."""
    cfg = peft.config
    cfg.refuse({"fan_in_fan_out": (None,), "bias": ("none", None), "modules_to_save": (None,)})
    rank, num_blocks, mt = cfg.r, cfg.num_blocks, cfg.model_type
    try:
        ranks = split_rank(rank, num_blocks, cfg.branch_ranks)
    except ValueError as e:
        raise ConfigError(f"{cfg.path}: {e}") from None
    sizes = {}  # path -> [(r_k, out_k, in_k)]
    for path in cfg.targets(list(shapes)):
        d_out, d_in = shapes[path]
        if num_blocks > min(d_out, d_in):
            raise ConfigError(f"{cfg.path}: num_blocks={num_blocks} exceeds the dimensions of {path} {shapes[path]}")
        sizes[path] = list(zip(ranks, split_sizes(d_out, num_blocks), split_sizes(d_in, num_blocks)))
    expected, why = {}, {}
    for path, per_block in sizes.items():
        for k, (r, o, i) in enumerate(per_block):
            if r:  # the authors' layer has no parameters for a rank-0 block
                a, b = block_key(path, "A", k, mt), block_key(path, "B", k, mt)
                expected[a], expected[b] = (r, i), (o, r)
                why[a] = why[b] = f"block {k} of {path} {shapes[path]} with r_{k}={r}"
    peft.check(expected, why)
    get = peft.tensors.get
    blocks = {
        path: ([get(block_key(path, "A", k, mt), np.zeros((0, i), np.float32)) for k, (r, o, i) in enumerate(b)],
               [get(block_key(path, "B", k, mt), np.zeros((o, 0), np.float32)) for k, (r, o, i) in enumerate(b)])
        for path, b in sizes.items()
    }
    orders_file = peft.path / ORDERS
    orders = _read_orders(orders_file, list(sizes), shapes, mt) if orders_file.is_file() else None
    return SMoAAdapter(rank, num_blocks, ranks, cfg.lora_alpha, cfg.dropout, blocks, orders)


def _read_orders(path, paths, shapes, model_type) -> dict:
    tensors, _ = read_tensors(path)
    keys = {p: (peft_key(p, "row_order", model_type), peft_key(p, "col_order", model_type)) for p in paths}
    expected, why = {}, {}
    for p, (rows, cols) in keys.items():
        expected[rows], expected[cols] = (shapes[p][0],), (shapes[p][1],)
        why[rows], why[cols] = f"d_out of {p}", f"d_in of {p}"
    check_tensors(tensors, expected, path, why)
    for key in expected:
        t = tensors[key]
        if t.dtype.kind != "i" or not np.array_equal(np.sort(t), np.arange(len(t))):
            raise AdapterError(f"{path}: {key} is not a permutation of integer indices")
    return {p: (tensors[rows], tensors[cols]) for p, (rows, cols) in keys.items()}


def plan_orders(weights: dict[str, np.ndarray], num_blocks: int) -> tuple[dict, dict]:
    """`make_plan` of each float32 base weight (through the plan cache): the orders, the
    smallest gaps with their module, and the modules with a gap under the float32
    precision of the authors' scores (`at_risk`)."""
    orders = {}
    gaps = {"boundary_gap": (np.inf, None), "order_gap": (np.inf, None), "at_risk": []}
    for path, w in weights.items():
        plan = cached_plan(w, num_blocks)  # `make_plan`'s, instant if training planned it
        orders[path] = (plan.row_order, plan.col_order)
        for name in ("boundary_gap", "order_gap"):
            if getattr(plan, name) < gaps[name][0]:
                gaps[name] = (getattr(plan, name), path)
        if min(plan.boundary_gap, plan.order_gap) < NEAR_TIE * min(w.shape):
            gaps["at_risk"].append(path)
    return orders, gaps


def describe_gaps(gaps: dict, total: int) -> str:
    (b, bp), (o, op) = gaps["boundary_gap"], gaps["order_gap"]
    text = f"smallest boundary gap {b:.3g}" + (f" ({bp})" if bp else "")
    text += f", smallest within-order gap {o:.3g} ({op})"
    if gaps["at_risk"]:
        text += (f"; warning: {len(gaps['at_risk'])}/{total} modules have a score gap below the "
                 f"float32 precision of the authors' SVD (~{NEAR_TIE:g} * min(d_out, d_in)), so their "
                 "loader may order those coordinates differently, which moves A columns or B rows "
                 f"between coordinates (an MLX export's {ORDERS} avoids this)")
    return text


