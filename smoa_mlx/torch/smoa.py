"""SMoA layers in PyTorch, loaded from the authors' layout that `convert export --format smoa` writes.

Orders come from `smoa_orders.safetensors` when present, else from the same
`make_plan` the MLX side uses, so both frameworks place every block identically.
The forward gathers each block's input columns and scatters its outputs back
with the inverse row order: the dense update is never built.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layouts.names import check_model_type, hf_path, mlx_path
from ..layouts.peft_io import read_peft_dir
from ..layouts.smoa import ORDERS, PEFT_TYPE, plan_orders, read_smoa


def _tensor(x, dtype, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


class SMoALinear(nn.Module):
    """A frozen `nn.Linear` plus the K blocks `scale * (B_k A_k) ⊙ M_k` (SPEC §1)."""

    def __init__(self, base: nn.Linear, row_order, col_order, a, b, alpha: float, rank: int,
                 dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        w = base.weight.detach()
        self.scale = alpha / rank
        self.out_sizes = [x.shape[0] for x in b]
        self.in_sizes = [x.shape[1] for x in a]
        self.register_buffer("row_order", _tensor(row_order, torch.long, w.device))
        self.register_buffer("col_order", _tensor(col_order, torch.long, w.device))
        self.register_buffer("row_inverse", torch.argsort(self.row_order))
        for k, (rows, cols) in enumerate(self._blocks()):
            self.register_buffer(f"anchor_{k}", w[rows][:, cols].clone())
        self.smoa_A = nn.ParameterList([nn.Parameter(_tensor(x, w.dtype, w.device)) for x in a])
        self.smoa_B = nn.ParameterList([nn.Parameter(_tensor(x, w.dtype, w.device)) for x in b])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _blocks(self):
        return zip(self.row_order.split(self.out_sizes), self.col_order.split(self.in_sizes))

    def block_weights(self) -> list[torch.Tensor]:
        return [self.scale * (b @ a) * getattr(self, f"anchor_{k}")
                for k, (a, b) in enumerate(zip(self.smoa_A, self.smoa_B))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        xd = self.dropout(x)
        cols = self.col_order.split(self.in_sizes)
        z = torch.cat([F.linear(xd.index_select(-1, c), w.to(x.dtype))
                       for c, w in zip(cols, self.block_weights())], dim=-1)
        return y + z.index_select(-1, self.row_inverse).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense scaled update in original coordinates, (d_out, d_in)."""
        w = self.base_layer.weight
        delta = torch.zeros_like(w)
        for (rows, cols), block in zip(self._blocks(), self.block_weights()):
            delta[rows[:, None], cols[None, :]] = block.to(w.dtype)
        return delta


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def apply_adapter(model: nn.Module, adapter_dir, plan_dtype: str | None = None) -> dict:
    """Wrap the adapted linear layers of a transformers `model` in place; returns an order report.

    Orders missing from the files are recomputed from the float32 weights, first
    rounded to `plan_dtype` ("bfloat16", "float16") if given.
    """
    mt = getattr(model.config, "model_type", None)
    check_model_type(mt)
    peft = read_peft_dir(adapter_dir, PEFT_TYPE, mt)
    linears = {mlx_path(n, mt): m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    adapter = read_smoa(peft, {p: tuple(m.weight.shape) for p, m in linears.items()})
    report = {"orders": ORDERS}
    orders = adapter.orders
    if orders is None:
        rounded = getattr(torch, plan_dtype) if plan_dtype else torch.float32
        weights = {p: linears[p].weight.detach().to(rounded).float().cpu().numpy() for p in adapter.blocks}
        orders, gaps = plan_orders(weights, adapter.num_blocks)
        report = {"orders": "recomputed", "boundary_gap": gaps["boundary_gap"][0],
                  "order_gap": gaps["order_gap"][0], "at_risk": gaps["at_risk"]}
    for p, (a, b) in adapter.blocks.items():
        layer = SMoALinear(linears[p], *orders[p], a, b, adapter.alpha, adapter.rank, adapter.dropout)
        _replace(model, hf_path(p, mt), layer.train(linears[p].training))
    return report


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every SMoALinear by a plain `nn.Linear` holding `W0 + ΔW`, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SMoALinear):
            base = m.base_layer
            merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                               device=base.weight.device, dtype=base.weight.dtype)
            with torch.no_grad():
                merged.weight.copy_(base.weight + m.delta_weight())
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
            _replace(model, name, merged)
    return model
