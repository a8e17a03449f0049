"""The authors' SMoA layout (SPEC §2.1) <-> MLX SMoA adapters.

Import recomputes the orders when the files carry none (`layouts.smoa`), from the
base weight as stored or, with `plan_dtype`, rounded to bfloat16/float16 first: the
authors' loader loads the base in bfloat16 by default and plans from that rounded
weight, so a float32 checkpoint gets other orders there. Export writes the orders
to `smoa_orders.safetensors`, which that loader never opens, and says whether it,
recomputing from the base loaded in float32 or in bfloat16, would agree.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..adapters import save_adapter, smoa_config
from ..archs import model_type
from ..layouts.names import peft_key
from ..layouts.peft_io import PeftDir, write_peft_dir
from ..layouts.smoa import ORDERS, PEFT_TYPE, block_key, describe_gaps, plan_orders, read_smoa
from ..patch import apply_smoa, smoa_layers
from .base import float32_weights, linear_shapes, peft_target_modules


# The dtypes the authors' loader loads the base in: bfloat16 is its default.
LOADER_DTYPES = ("float32", "bfloat16")


def import_smoa(model, peft: PeftDir, base: str, out_dir, log=print, plan_dtype: str | None = None) -> dict:
    """Patch `model` with the adapter in `peft` and write it as an MLX adapter into `out_dir`.

    `plan_dtype` ("bfloat16", "float16"): recompute the orders from the base weight
    rounded to it, as the authors' loader does when it loads the base in that dtype.
    """
    adapter = read_smoa(peft, linear_shapes(model))
    report = {}
    orders = adapter.orders
    extra = {"plan_dtype": plan_dtype} if plan_dtype and orders is None else {}
    if orders is None:
        weights = float32_weights(model, adapter.blocks, plan_dtype)
        orders, gaps = plan_orders(weights, adapter.num_blocks)
        report.update(boundary_gap=gaps["boundary_gap"][0], order_gap=gaps["order_gap"][0],
                      at_risk=gaps["at_risk"])
        source = f"rounded to {plan_dtype}" if plan_dtype else "as stored"
        log(f"orders recomputed from the base weights {source} (the authors' files carry none): "
            f"{describe_gaps(gaps, len(orders))}")
    else:
        log(f"orders read from {peft.path / ORDERS}"
            + (f" (--plan-dtype {plan_dtype} does not apply)" if plan_dtype else ""))
    apply_smoa(
        model, keys=list(adapter.blocks), rank=adapter.rank, num_blocks=adapter.num_blocks,
        alpha=adapter.alpha, dropout=adapter.dropout, branch_ranks=adapter.branch_ranks,
        orders=orders,
    )
    for path, layer in smoa_layers(model).items():
        a, b = adapter.blocks[path]
        layer.smoa_a = [mx.array(x) for x in a]
        layer.smoa_b = [mx.array(x) for x in b]
    save_adapter(model, out_dir, smoa_config(model, base_model=base, converted_from=str(peft.path), **extra))
    return report


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def export_smoa(model, base: str, out_dir, log=print) -> dict:
    """Write the SMoA layers of `model` in the authors' layout, plus the orders file."""
    layers = smoa_layers(model)
    params = smoa_config(model)["smoa_parameters"]
    tensors, orders, mt = {}, {}, model_type(model)
    for path, m in layers.items():
        for k, (a, b) in enumerate(zip(m.smoa_a, m.smoa_b)):
            if a.shape[0]:
                tensors[block_key(path, "A", k, mt)] = np.array(a.astype(mx.float32))
                tensors[block_key(path, "B", k, mt)] = np.array(b.astype(mx.float32))
        orders[peft_key(path, "row_order", mt)] = np.array(m.row_order).astype(np.int64)
        orders[peft_key(path, "col_order", mt)] = np.array(m.col_order).astype(np.int64)
    config = {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": params["rank"],
        "num_blocks": params["num_blocks"],
        "branch_ranks": params["branch_ranks"],
        "lora_alpha": _number(params["alpha"]),
        "lora_dropout": params["dropout"],
        "target_modules": peft_target_modules(model, layers),
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    write_peft_dir(out_dir, config, tensors, {ORDERS: orders})
    # The authors' loader ignores ORDERS and recomputes from the base in the dtype it loads
    # it in: say, for each, whether it would agree.
    differ, gaps = {}, None
    for dtype in LOADER_DTYPES:
        planned, found = plan_orders(float32_weights(model, layers, dtype), params["num_blocks"])
        gaps = gaps or found  # the float32 plan's gaps
        differ[dtype] = [p for p, m in layers.items()
                         if not (np.array_equal(planned[p][0], np.array(m.row_order))
                                 and np.array_equal(planned[p][1], np.array(m.col_order)))]
    log(f"orders written to {ORDERS} (the authors' loader recomputes them instead): "
        f"{describe_gaps(gaps, len(layers))}")
    agree = [d for d in LOADER_DTYPES if not differ[d]]
    if len(agree) < len(LOADER_DTYPES):
        worst = next(d for d in LOADER_DTYPES if differ[d])
        where = (f"loading the base in {agree[0]} (torch_dtype=torch.{agree[0]}) it recomputes the saved "
                 "orders" if agree else "it recomputes them differently in any dtype (adapter planned "
                 "on another or quantized base?)")
        log(f"warning: the authors' loader (which loads the base in bfloat16 by default) would misplace "
            f"the blocks of {len(differ[worst])}/{len(layers)} modules (e.g. {differ[worst][0]}) when it "
            f"loads the base in {worst}; {where}. Our importer and smoa_mlx.torch use the saved orders")
    return {"boundary_gap": gaps["boundary_gap"][0], "order_gap": gaps["order_gap"][0],
            "at_risk": gaps["at_risk"], "recomputed_orders_differ": differ["float32"],
            "bfloat16_orders_differ": differ["bfloat16"]}
