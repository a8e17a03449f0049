"""SMoASwitchLinear: SMoA on MoE experts (mlx-lm `SwitchLinear` / `QuantizedSwitchLinear`).

Each expert e is its own frozen linear layer W0_e, so it gets its own spectral plan
(`make_plan` on W0_e) and its own factors; all of them are stacked along a leading
expert axis: A_k (E, r_k, in_k), B_k (E, out_k, r_k), row_order (E, d_out),
col_order (E, d_in). The update of expert e is SPEC §1's, per expert.

Training never builds a dense (E, d_out, d_in) ΔW. Each token slot's input is
permuted by its expert's column order, so the K aligned blocks are contiguous; block
k then is one gathered expert matmul (`mx.gather_mm`, as the base layer does) with
the stacked block weights `W_k,e = scale * (B_k,e A_k,e) ⊙ M_k,e` in permuted
coordinates (1/K of the expert weights, one layer at a time), and the output is
gathered back with the expert's inverse row order. A custom VJP rebuilds W_k and
the anchors M_k in the backward pass instead of keeping them alive between the two
passes, like `layer._blocked_update`. Quantized experts are de-quantized for the
anchors only; the base output comes from the quantized `gather_qmm`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .layer import _block_diagonal, _tied, base_weight, make_plan
from .plan import split_rank, split_sizes


def _offsets(sizes) -> list[tuple[int, int]]:
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def _take_last(x: mx.array, index: mx.array) -> mx.array:
    """x[..., index[...]] with a per-slot index (..., n) broadcast over x's row axis."""
    return mx.take_along_axis(x, mx.expand_dims(index, -2), axis=-1)


class SMoASwitchLinear(nn.Module):
    @staticmethod
    def from_base(
        base: nn.Module,
        rank: int = 8,
        num_blocks: int = 2,
        alpha: float = 8.0,
        dropout: float = 0.0,
        branch_ranks=None,
        orders=None,
        on_plan=None,
    ) -> "SMoASwitchLinear":
        """Wrap `base`; `orders=(row_orders, col_orders)`, (E, d_out) and (E, d_in), skips
        planning; otherwise every expert is planned and `on_plan()` called after each."""
        if orders is None:
            weight = base_weight(base)
            plans = []
            for e in range(weight.shape[0]):
                plans.append(make_plan(np.array(weight[e].astype(mx.float32)), num_blocks))
                if on_plan is not None:
                    on_plan()
            orders = (np.stack([p.row_order for p in plans]), np.stack([p.col_order for p in plans]))
        return SMoASwitchLinear(base, orders, rank, num_blocks, alpha, dropout, branch_ranks)

    def __init__(self, base, orders, rank, num_blocks, alpha, dropout, branch_ranks):
        super().__init__()
        if not isinstance(base, (SwitchLinear, QuantizedSwitchLinear)):
            raise TypeError(f"SMoASwitchLinear adapts SwitchLinear layers, not {type(base).__name__}")
        n_exp, d_out, d_in = base.num_experts, base.output_dims, base.input_dims
        row_order, col_order = (np.asarray(o, dtype=np.int64) for o in orders)
        for order, n, name in ((row_order, d_out, "row_order"), (col_order, d_in, "col_order")):
            if order.shape != (n_exp, n) or not (np.sort(order, axis=-1) == np.arange(n)).all():
                raise ValueError(f"{name} must hold {n_exp} permutations of {n} indices, got shape {order.shape}")
        if num_blocks > min(d_out, d_in):
            raise ValueError(f"num_blocks={num_blocks} exceeds min(d_out, d_in) of {(d_out, d_in)}")
        self.linear = base
        self.rank, self.num_blocks, self.alpha = int(rank), int(num_blocks), float(alpha)
        self.branch_ranks = split_rank(self.rank, self.num_blocks, branch_ranks)
        self.scale = self.alpha / self.rank
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.row_order = mx.array(row_order.astype(np.int32))
        self.col_order = mx.array(col_order.astype(np.int32))
        self.out_sizes = split_sizes(d_out, self.num_blocks)
        self.in_sizes = split_sizes(d_in, self.num_blocks)
        self._row_slot = mx.array(np.argsort(row_order, axis=-1).astype(np.uint32))
        self._col_order = mx.array(col_order.astype(np.uint32))
        self.smoa_a = [
            mx.random.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), (n_exp, r, i))
            for r, i in zip(self.branch_ranks, self.in_sizes)
        ]
        self.smoa_b = [mx.zeros((n_exp, o, r)) for r, o in zip(self.branch_ranks, self.out_sizes)]
        self.linear.freeze()
        self.freeze(keys=["row_order", "col_order"], recurse=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.linear.num_experts, sum(self.out_sizes), sum(self.in_sizes))

    def _anchors(self, w0: mx.array) -> list[mx.array]:
        """M_k,e = W0_e[rows_k,e][:, cols_k,e], stacked over experts: (E, out_k, in_k)."""
        rows, cols = self.row_order, self.col_order
        out = []
        for (r0, r1), (c0, c1) in zip(_offsets(self.out_sizes), _offsets(self.in_sizes)):
            m = mx.take_along_axis(w0, rows[:, r0:r1, None], axis=1)
            out.append(mx.take_along_axis(m, cols[:, None, c0:c1], axis=2))
        return out

    def _update(self, xp, indices, sorted_indices):
        """The update in permuted coordinates, block by block, with the custom VJP above."""
        k = self.num_blocks
        spans = _offsets(self.in_sizes)
        scale = self.scale

        def weights(a_list, b_list, anchors, dtype):
            return [(((scale * b) @ a) * m).astype(dtype) for a, b, m in zip(a_list, b_list, anchors)]

        def gmm(x, w):
            return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)

        @mx.custom_function
        def update(xp, a_list, b_list):
            ws = weights(a_list, b_list, self._anchors(base_weight(self.linear)), xp.dtype)
            return mx.concatenate([gmm(xp[..., c0:c1], w.swapaxes(-1, -2)) for (c0, c1), w in zip(spans, ws)], -1)

        @update.vjp
        def update_vjp(primals, cotangent, output):
            xp, a_list, b_list = primals
            anchors = self._anchors(base_weight(self.linear, after=cotangent))
            late = _tied(list(a_list) + list(b_list), cotangent)
            ws = weights(late[:k], late[k:], anchors, xp.dtype)
            dx, da, db = [], [], []
            for (r0, r1), (c0, c1), w, a, b, m in zip(
                _offsets(self.out_sizes), spans, ws, a_list, b_list, anchors
            ):
                g, x = cotangent[..., r0:r1], xp[..., c0:c1]
                dx.append(gmm(g, w))
                # dW_k,e = sum over expert e's slots of g^T x: the VJP of the gathered matmul.
                _, (dw,) = mx.vjp(lambda wt: [gmm(x, wt)], [w.swapaxes(-1, -2)], [g])
                d_ba = dw.swapaxes(-1, -2).astype(a.dtype) * m
                da.append((scale * (b.swapaxes(-1, -2) @ d_ba)).astype(a.dtype))
                db.append((scale * (d_ba @ a.swapaxes(-1, -2))).astype(b.dtype))
            return mx.concatenate(dx, -1).astype(xp.dtype), da, db

        return update(xp, self.smoa_a, self.smoa_b)

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        x_in = self.dropout(x) if self.dropout is not None else x
        batch = tuple(np.broadcast_shapes(x.shape[:-2], indices.shape))
        x_in = mx.broadcast_to(x_in, batch + x.shape[-2:])
        xp = _take_last(x_in, mx.take(self._col_order, indices, axis=0))
        z = _take_last(self._update(xp, indices, sorted_indices), mx.take(self._row_slot, indices, axis=0))
        return y + z.astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The dense scaled update of every expert in original coordinates, (E, d_out, d_in)."""
        a_bd = mx.stack([_block_diagonal([a[e] for a in self.smoa_a]) for e in range(self.shape[0])])
        b_bd = mx.stack([_block_diagonal([b[e] for b in self.smoa_b]) for e in range(self.shape[0])])
        col_slot = mx.argsort(self.col_order, axis=-1)
        a_o = mx.take_along_axis(a_bd, col_slot[:, None, :], axis=2)
        b_o = mx.take_along_axis(b_bd, self._row_slot.astype(mx.int32)[:, :, None], axis=1)
        return base_weight(self.linear) * ((self.scale * b_o) @ a_o)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A SwitchLinear with `W0_e + ΔW_e`; re-quantized like the base unless `dequantize`."""
        base = self.linear
        weight = base_weight(base)
        n_exp, d_out, d_in = weight.shape
        fused = SwitchLinear(d_in, d_out, n_exp, bias="bias" in base)
        fused.weight = (weight + self.delta_weight()).astype(weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if isinstance(base, QuantizedSwitchLinear) and not dequantize:
            fused = fused.to_quantized(group_size=base.group_size, bits=base.bits, mode=base.mode)
        return fused
