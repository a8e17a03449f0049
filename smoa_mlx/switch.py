"""SMoASwitchLinear: SMoA on MoE experts (mlx-lm `SwitchLinear` / `QuantizedSwitchLinear`).

Each expert e is its own frozen linear layer W0_e, so it gets its own spectral plan
(`make_plan` on W0_e) and its own factors; all of them are stacked along a leading
expert axis: A_k (E, r_k, in_k), B_k (E, out_k, r_k), row_order (E, d_out),
col_order (E, d_in). The update of expert e is SPEC §1's, per expert: with A_o, B_o
the factors placed on expert e's blocks in its own coordinates (`SMoALinear`'s
embedding, batched over experts), `ΔW_e = scale * W0_e ⊙ (B_o,e A_o,e)`.

Two exact evaluations, chosen by shape alone (docs/ARCHITECTURE.md has the measurements):
- merged, when more token slots than experts (training, prefill): one gathered expert
  matmul (`mx.gather_mm`, as the base layer does) with `W0 + ΔW`, built for every
  expert one layer at a time; a custom VJP rebuilds it in the backward pass (tied to
  the cotangent, as `layer._merged_matmul`) instead of keeping it alive. With dropout
  active the same matmul runs with ΔW alone on the dropped-out input, next to the base.
  This builds the dense per-expert weight on purpose: the per-block alternative
  (input permuted per slot, K gathered matmuls with `(B_k A_k) ⊙ M_k` in permuted
  coordinates) needs the anchors M_k gathered out of every expert's weight, which
  measured 2.66x the step time of mlx-lm's LoRASwitchLinear against 1.49x for this
  path (1.29x on 4-bit experts; scripts/bench_moe.py);
- folded, when at most as many slots as experts (decoding): the base layer itself
  (quantized or not) on `[x, A_o[r] ⊙ x for r]`, 1 + R rows per slot, so only the
  routed experts are read and nothing is built (`layer._folded`, per slot).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .errors import AdapterError
from .layer import _tied, base_weight, init_adapter
from .plan_cache import cached_plan


def _block_diagonal(parts: list[mx.array]) -> mx.array:
    """Per expert, the block-diagonal matrix of `parts` (E, m_k, n_k): (E, sum m_k, sum n_k)."""
    width = sum(p.shape[-1] for p in parts)
    offsets = np.cumsum([0] + [p.shape[-1] for p in parts])
    return mx.concatenate(
        [mx.pad(p, [(0, 0), (0, 0), (int(o), width - int(o) - p.shape[-1])]) for p, o in zip(parts, offsets)],
        axis=-2,
    )


def _gathered_matmul(base, x, a_o, b_o, indices, sorted_indices, scale, with_base):
    """`x W_e^T` per slot (no bias), W = W0 + ΔW (or ΔW alone), with the custom VJP above."""

    def weight(w0, a_o, b_o, dtype):
        delta = w0 * ((scale * b_o) @ a_o)
        return (w0 + delta if with_base else delta).astype(dtype)

    def gmm(x, w):
        return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)

    @mx.custom_function
    def merged(x, a_o, b_o):
        w0 = base_weight(base)
        return gmm(x, weight(w0, a_o, b_o, mx.result_type(x, w0)).swapaxes(-1, -2))

    @merged.vjp
    def merged_vjp(primals, cotangent, output):
        x, a_o, b_o = primals
        w0 = base_weight(base, after=cotangent)
        a_late, b_late = _tied([a_o, b_o], cotangent)
        w = weight(w0, a_late, b_late, mx.result_type(x, w0))
        # dW_e = sum over expert e's slots of g^T x: the VJP of the gathered matmul.
        _, (dw,) = mx.vjp(lambda wt: [gmm(x, wt)], [w.swapaxes(-1, -2)], [cotangent])
        d_ba = dw.swapaxes(-1, -2).astype(a_o.dtype) * w0
        da = (scale * (b_o.swapaxes(-1, -2) @ d_ba)).astype(a_o.dtype)
        db = (scale * (d_ba @ a_o.swapaxes(-1, -2))).astype(b_o.dtype)
        return gmm(cotangent, w).astype(x.dtype), da, db

    return merged(x, a_o, b_o)


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
        planner=cached_plan,
    ) -> "SMoASwitchLinear":
        """Wrap `base`; `orders=(row_orders, col_orders)`, (E, d_out) and (E, d_in), skips
        planning; otherwise every expert is planned by `planner` (as `SMoALinear.from_base`)
        and `on_plan()` called after each."""
        if orders is None:
            weight = base_weight(base)
            plans = []
            for e in range(weight.shape[0]):
                plans.append(planner(np.array(weight[e].astype(mx.float32)), num_blocks))
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
                raise AdapterError(f"{name} must hold {n_exp} permutations of {n} indices, got shape {order.shape}")
        init_adapter(self, base, row_order, col_order, (d_out, d_in), rank, num_blocks, alpha,
                     dropout, branch_ranks, experts=(n_exp,))
        self._row_slot = mx.array(np.argsort(row_order, axis=-1).astype(np.uint32))
        self._col_slot = mx.array(np.argsort(col_order, axis=-1).astype(np.uint32))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.linear.num_experts, sum(self.out_sizes), sum(self.in_sizes))

    def _embedded(self) -> tuple[mx.array, mx.array]:
        """(A_o, B_o): every expert's factors on its blocks, (E, R, d_in) and (E, d_out, R)."""
        a_o = mx.take_along_axis(_block_diagonal(self.smoa_a), self._col_slot[:, None, :], axis=2)
        b_o = mx.take_along_axis(_block_diagonal(self.smoa_b), self._row_slot[:, :, None], axis=1)
        return a_o, b_o

    def _path(self, x: mx.array, indices: mx.array) -> str:
        """merged or folded (module docstring): by the number of token slots and dropout."""
        if self.dropout is not None and self.training:
            return "dropout"
        slots = math.prod(np.broadcast_shapes(x.shape[:-1], indices.shape + x.shape[-2:-1]))
        return "folded" if slots <= self.linear.num_experts else "merged"

    def __call__(self, x, indices, sorted_indices=False):
        a_o, b_o = self._embedded()
        path = self._path(x, indices)
        if path == "folded":
            return self._folded(x, indices, sorted_indices, a_o, b_o)
        args = (a_o, b_o, indices, sorted_indices, self.scale)
        # broadcast over the slots here, so autodiff sums the input gradient back
        x_b = mx.broadcast_to(x, tuple(np.broadcast_shapes(x.shape[:-2], indices.shape)) + x.shape[-2:])
        if path == "merged":
            y = _gathered_matmul(self.linear, x_b, *args, with_base=True)
            return y + mx.expand_dims(self.linear.bias[indices], -2) if "bias" in self.linear else y
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        z = _gathered_matmul(self.linear, mx.broadcast_to(self.dropout(x), x_b.shape), *args, with_base=False)
        return y + z.astype(y.dtype)

    def _folded(self, x, indices, sorted_indices, a_o, b_o):
        """Base output plus update from one call of the base layer on 1 + R rows per slot."""
        a_slot = mx.take(a_o, indices, axis=0).astype(x.dtype)  # (..., R, d_in)
        rows = mx.concatenate([mx.broadcast_to(x, a_slot.shape[:-2] + x.shape[-2:]), x * a_slot], axis=-2)
        y = self.linear(rows, indices, sorted_indices=sorted_indices)
        u = y[..., 1:, :]
        if "bias" in self.linear:
            u = u - mx.expand_dims(self.linear.bias[indices], -2)
        b_slot = mx.take(b_o, indices, axis=0)  # (..., d_out, R)
        update = (u * (self.scale * b_slot.swapaxes(-1, -2)).astype(u.dtype)).sum(axis=-2, keepdims=True)
        return y[..., :1, :] + update

    def delta_weight(self) -> mx.array:
        """The dense scaled update of every expert in original coordinates, (E, d_out, d_in)."""
        a_o, b_o = self._embedded()
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
            fused = fused.to_quantized(group_size=base.group_size, bits=base.bits, mode=base.mode,
                                       global_scale=getattr(base, "global_scale", None) is not None)
        return fused
