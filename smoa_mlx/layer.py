"""SMoALinear: a frozen linear layer plus K spectrally aligned modulation blocks.

Training never builds the dense (d_out, d_in) update: inputs are gathered into
block order, one batched matmul applies the K stacked blocks
`scale * (B_k A_k) ⊙ M_k`, and a gather with the inverse row order puts the
outputs back (SPEC §1 "efficient evaluation"). Blocks of unequal size are
zero-padded to the largest one; the padded anchor entries are zero, so padding
never leaks into the result.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .plan import make_plan, split_rank, split_sizes


def base_weight(base: nn.Module) -> mx.array:
    """The float weight of a Linear or the de-quantized weight of a QuantizedLinear."""
    if isinstance(base, nn.QuantizedLinear):
        return mx.dequantize(
            base.weight, base.scales, base.get("biases"), group_size=base.group_size,
            bits=base.bits, mode=base.mode,
        )
    if isinstance(base, nn.Linear):
        return base.weight
    raise TypeError(f"SMoA adapts nn.Linear or nn.QuantizedLinear, not {type(base).__name__}")


def _block_positions(order: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Padded gather index into the original axis, and each original index's padded slot."""
    k, width = len(sizes), max(sizes)
    padded = np.zeros((k, width), dtype=np.int64)
    slot = np.empty(len(order), dtype=np.int64)
    start = 0
    for b, n in enumerate(sizes):
        chunk = order[start : start + n]
        padded[b, :n] = chunk
        slot[chunk] = b * width + np.arange(n)
        start += n
    return padded.reshape(-1), slot


class SMoALinear(nn.Module):
    @staticmethod
    def from_base(
        base: nn.Module,
        rank: int = 8,
        num_blocks: int = 2,
        alpha: float = 8.0,
        dropout: float = 0.0,
        branch_ranks=None,
        orders=None,
    ) -> "SMoALinear":
        """Wrap `base`; `orders=(row_order, col_order)` skips the spectral plan (loading)."""
        weight = base_weight(base)
        if orders is None:
            plan = make_plan(np.array(weight.astype(mx.float32)), num_blocks)
            orders = (plan.row_order, plan.col_order)
        return SMoALinear(base, weight, orders, rank, num_blocks, alpha, dropout, branch_ranks)

    def __init__(self, base, weight, orders, rank, num_blocks, alpha, dropout, branch_ranks):
        super().__init__()
        d_out, d_in = weight.shape
        row_order, col_order = (np.asarray(o, dtype=np.int64) for o in orders)
        if sorted(row_order.tolist()) != list(range(d_out)) or sorted(
            col_order.tolist()
        ) != list(range(d_in)):
            raise ValueError(
                f"row_order/col_order must be permutations of {d_out}/{d_in} indices, got "
                f"lengths {len(row_order)}/{len(col_order)}"
            )
        if num_blocks > min(d_out, d_in):
            raise ValueError(f"num_blocks={num_blocks} exceeds min(d_out, d_in) of {weight.shape}")
        self.linear = base
        self.rank, self.num_blocks, self.alpha = int(rank), int(num_blocks), float(alpha)
        self.branch_ranks = split_rank(self.rank, self.num_blocks, branch_ranks)
        self.scale = self.alpha / self.rank
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.row_order = mx.array(row_order.astype(np.int32))
        self.col_order = mx.array(col_order.astype(np.int32))

        self.out_sizes = split_sizes(d_out, self.num_blocks)
        self.in_sizes = split_sizes(d_in, self.num_blocks)
        rows_pad, row_slot = _block_positions(row_order, self.out_sizes)
        cols_pad, col_slot = _block_positions(col_order, self.in_sizes)
        self._col_index = mx.array(cols_pad.astype(np.uint32))
        self._row_index = mx.array(row_slot.astype(np.uint32))
        self._col_slot = mx.array(col_slot.astype(np.uint32))
        # Anchors M_k, zero in padded slots: (K, out_max, in_max), in the model's dtype.
        out_max, in_max = max(self.out_sizes), max(self.in_sizes)
        mask = np.zeros((self.num_blocks, out_max, in_max), dtype=bool)
        for k, (o, i) in enumerate(zip(self.out_sizes, self.in_sizes)):
            mask[k, :o, :i] = True
        rows = mx.array(rows_pad.reshape(self.num_blocks, out_max, 1).astype(np.uint32))
        cols = mx.array(cols_pad.reshape(self.num_blocks, 1, in_max).astype(np.uint32))
        self._anchors = mx.where(mx.array(mask), weight[rows, cols], 0).astype(weight.dtype)

        self.smoa_a = [
            mx.random.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), (r, i))
            for r, i in zip(self.branch_ranks, self.in_sizes)
        ]
        self.smoa_b = [mx.zeros((o, r)) for r, o in zip(self.branch_ranks, self.out_sizes)]
        self.linear.freeze()
        self.freeze(keys=["row_order", "col_order"], recurse=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self.out_sizes), sum(self.in_sizes))

    def _stacked(self, mats, rows: int, cols: int) -> mx.array:
        return mx.stack(
            [mx.pad(m, [(0, rows - m.shape[0]), (0, cols - m.shape[1])]) for m in mats]
        )

    def block_weights(self) -> mx.array:
        """`scale * (B_k A_k) ⊙ M_k` for all k, stacked and padded: (K, out_max, in_max)."""
        r_max = max(self.branch_ranks)
        a = self._stacked(self.smoa_a, r_max, self._anchors.shape[2])
        b = self._stacked(self.smoa_b, self._anchors.shape[1], r_max)
        return (b @ a) * (self.scale * self._anchors)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self.dropout is not None:
            x = self.dropout(x)
        k, out_max, in_max = self._anchors.shape
        lead = x.shape[:-1]
        xb = mx.take(x, self._col_index, axis=-1).reshape(-1, k, in_max).swapaxes(0, 1)
        w = self.block_weights().astype(x.dtype)
        z = (xb @ w.swapaxes(1, 2)).swapaxes(0, 1).reshape(*lead, k * out_max)
        return y + mx.take(z, self._row_index, axis=-1).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The dense scaled update in original coordinates, (d_out, d_in)."""
        k, out_max, in_max = self._anchors.shape
        # Put each padded block on the diagonal of a (K*out_max, K*in_max) matrix, then
        # gather rows and columns back to the original coordinates.
        blocks = self.block_weights()
        eye = mx.eye(k, dtype=blocks.dtype)
        diag = (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(k * out_max, k * in_max)
        return diag[self._row_index][:, self._col_slot]

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer with `W0 + ΔW`; re-quantized like the base unless `dequantize`."""
        base = self.linear
        weight = base_weight(base)
        has_bias = "bias" in base
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
        fused.weight = (weight + self.delta_weight()).astype(weight.dtype)
        if has_bias:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            fused = nn.QuantizedLinear.from_linear(
                fused, base.group_size, base.bits, mode=base.mode
            )
        return fused
