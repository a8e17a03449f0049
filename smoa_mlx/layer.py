"""SMoALinear: a frozen linear layer plus K spectrally aligned modulation blocks.

Training never builds the dense (d_out, d_in) update (SPEC §1 "efficient
evaluation"): each block gathers its input columns, multiplies by its own
`W_k = scale * (B_k A_k) ⊙ M_k` of shape (out_k, in_k), and one gather with the
inverse row order puts the outputs back. Blocks are kept as K separate arrays, so
unequal sizes need no padding. A custom VJP recomputes W_k in the backward pass
instead of keeping it alive from the forward, and returns the input gradient with
a gather instead of the scatter-add MLX would derive.

Anchors M_k are gathered from the base weight on every call in training mode
(nothing stored beyond what LoRA keeps) and stored while a float layer is in eval
mode (decoding then reads each anchor once per token). With K = 1 the anchor is
the base weight itself: A and B are permuted into its coordinates instead.
docs/PERFORMANCE.md has the measurements behind each choice.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .plan import split_rank, split_sizes

# `make_plan`'s plan through the on-disk score cache: identical result, instant the second time.
from .plan_cache import cached_plan as make_plan

# Inputs of at most this many rows times the largest block rank (decoding) use the
# factored form `sum_r B[:, r] ⊙ ((x ⊙ A[r]) M^T)`: it reads each anchor once instead of
# materialising W_k on every call (measured in docs/PERFORMANCE.md). The choice depends
# on the shape alone, so a layer gives bitwise the same output in train and eval mode.
FACTORED_MAX_ROWS = 64


def base_weight(base: nn.Module, rows=None) -> mx.array:
    """The float weight of a Linear or the de-quantized weight of a QuantizedLinear
    (only the given `rows`, if any: a quantized row de-quantizes on its own)."""
    if isinstance(base, nn.QuantizedLinear):
        pick = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])
        return mx.dequantize(
            pick(base.weight), pick(base.scales), pick(base.get("biases")),
            group_size=base.group_size, bits=base.bits, mode=base.mode,
        )
    if isinstance(base, nn.Linear):
        return base.weight if rows is None else base.weight[rows]
    raise TypeError(f"SMoA adapts nn.Linear or nn.QuantizedLinear, not {type(base).__name__}")


def _gather(x: mx.array, index) -> mx.array:
    """`x[..., index]` (None: all of x, in order). `take_along_axis` with a broadcast
    index is ~6x faster than `take` along the last axis on MLX's CPU backend."""
    if index is None:
        return x
    return mx.take_along_axis(x, index.reshape((1,) * (x.ndim - 1) + (-1,)), axis=-1)


def _join(parts: list[mx.array], slot) -> mx.array:
    """Concatenate per-block outputs (block order) and gather them back to original order."""
    return _gather(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1), slot)


def _block_weight(a: mx.array, b: mx.array, anchor: mx.array, scale: float, dtype=None) -> mx.array:
    """`scale * (B A) ⊙ M` of one block (scale folded into the small B), cast if `dtype`."""
    w = ((scale * b) @ a) * anchor
    return w if dtype is None else w.astype(dtype)


def _blocked_update(x, a_list, b_list, anchors, rows, cols, row_slot, col_slot, scale):
    """`x ΔW^T` block by block (rows, cols: per-block original indices; *_slot: inverses).

    `anchors(after)` returns the K anchors (stored, or gathered from the base weight after
    the array `after`; None: now). The backward pass recomputes the anchors and W_k from
    inputs tied to the cotangent with `mx.depends`; otherwise `mx.compile` merges the
    recomputation with the forward's (or schedules it early) and every layer's anchors
    and W_k stay alive from the forward to the backward pass (measured: 136 MiB more
    than LoRA on an 8-layer stack of 2048² layers, 40 MiB with the ties).
    """

    @mx.custom_function
    def update(x, a_list, b_list):
        z = [
            _gather(x, c) @ _block_weight(a, b, m, scale, x.dtype).T
            for a, b, m, c in zip(a_list, b_list, anchors(None), cols)
        ]
        return _join(z, row_slot)

    @update.vjp
    def update_vjp(primals, cotangent, output):
        x, a_list, b_list = primals
        g = cotangent.reshape(-1, cotangent.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        later = mx.depends(list(a_list) + list(b_list), [cotangent])
        blocks = zip(a_list, b_list, later[: len(a_list)], later[len(a_list) :], anchors(cotangent), rows, cols)
        dx, da, db = [], [], []
        for a, b, a_late, b_late, m, r, c in blocks:
            g_k = _gather(g, r)
            dx.append(g_k @ _block_weight(a_late, b_late, m, scale, x.dtype))
            # dW_k = g_k^T x_k; the anchor turns it into d(B A), scale goes on the small ends.
            d_ba = (g_k.T @ _gather(x2, c)).astype(a.dtype) * m
            da.append(scale * (b.T @ d_ba))
            db.append(scale * (d_ba @ a.T))
        return _join(dx, col_slot).reshape(x.shape), da, db

    return update(x, a_list, b_list)


def _factored_update(x, a_list, b_list, anchors, cols, row_slot, scale):
    """`x ΔW^T` as `sum_r B[:, r] ⊙ ((x_k ⊙ A_k[r]) M_k^T)`: one read of each anchor."""
    z = []
    for a, b, m, c in zip(a_list, b_list, anchors, cols):
        xa = _gather(x, c)[..., None, :] * a.astype(x.dtype)  # (..., r_k, in_k)
        t = xa @ m.astype(x.dtype).T  # (..., r_k, out_k)
        z.append((t * (scale * b.T).astype(x.dtype)).sum(axis=-2))
    return _join(z, row_slot)


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
        # Per-block original indices, and each original index's position in block order.
        self._rows = [mx.array(r.astype(np.uint32)) for r in np.array_split(row_order, num_blocks)]
        self._cols = [mx.array(c.astype(np.uint32)) for c in np.array_split(col_order, num_blocks)]
        self._row_slot = mx.array(np.argsort(row_order).astype(np.uint32))
        self._col_slot = mx.array(np.argsort(col_order).astype(np.uint32))
        self._anchors = None  # stored only in eval mode, see `_training`

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

    @property
    def _training(self) -> bool:
        return self.__dict__.get("_is_training", True)

    @_training.setter
    def _training(self, mode: bool) -> None:
        """`Module.train()` / `.eval()` set this on every submodule. In eval mode a float
        layer with K > 1 stores its anchors (decoding reads them once per token); in
        training mode they are dropped and gathered from the base weight on each call
        (about 1% of a step, and 1/K of the adapted weight less memory)."""
        object.__setattr__(self, "_is_training", mode)
        if "_rows" not in self:  # still in nn.Module.__init__
            return
        self._anchors = None
        if not mode and self.num_blocks > 1 and not isinstance(self.linear, nn.QuantizedLinear):
            anchors = self._anchor_blocks()
            mx.eval(anchors)
            self._anchors = anchors

    def _anchor_blocks(self, after=None) -> list[mx.array]:
        """M_k = W0[rows_k][:, cols_k] in the base weight's dtype: stored, or gathered now
        (after the array `after`, if given: see `_blocked_update`)."""
        if self._anchors is not None:
            return self._anchors
        rows = self._rows if after is None else mx.depends(list(self._rows), [after])
        return [_gather(base_weight(self.linear, r), c) for r, c in zip(rows, self._cols)]

    def _base_anchor(self, after=None) -> list[mx.array]:
        """K = 1: the whole base weight (de-quantized now, or after `after`, if quantized)."""
        if not isinstance(self.linear, nn.QuantizedLinear):
            return [self.linear.weight]
        if after is None:
            return [base_weight(self.linear)]
        rows = mx.depends([mx.arange(self.shape[0], dtype=mx.uint32)], [after])[0]
        return [base_weight(self.linear, rows)]

    def _operands(self):
        """(A list, B list, anchors(after), rows, cols, row_slot, col_slot) for the update.

        K = 1 works in the base weight's own coordinates: A's columns and B's rows are
        permuted instead of the input, the output and a copy of the weight.
        """
        if self.num_blocks == 1:
            a = [_gather(self.smoa_a[0], self._col_slot)]
            b = [mx.take(self.smoa_b[0], self._row_slot, axis=0)]
            return a, b, self._base_anchor, [None], [None], None, None
        return (self.smoa_a, self.smoa_b, self._anchor_blocks, self._rows, self._cols,
                self._row_slot, self._col_slot)

    def _weights(self) -> list[mx.array]:
        return [
            _block_weight(a, b, m, self.scale)
            for a, b, m in zip(self.smoa_a, self.smoa_b, self._anchor_blocks())
        ]

    def block_weights(self) -> mx.array:
        """`scale * (B_k A_k) ⊙ M_k` for all k, stacked and zero-padded: (K, out_max, in_max)."""
        out_max, in_max = max(self.out_sizes), max(self.in_sizes)
        return mx.stack(
            [mx.pad(w, [(0, out_max - w.shape[0]), (0, in_max - w.shape[1])]) for w in self._weights()]
        )

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self.dropout is not None:
            x = self.dropout(x)
        a, b, anchors, rows, cols, row_slot, col_slot = self._operands()
        if x.size // x.shape[-1] * max(self.branch_ranks) <= FACTORED_MAX_ROWS:
            z = _factored_update(x, a, b, anchors(None), cols, row_slot, self.scale)
        else:
            z = _blocked_update(x, a, b, anchors, rows, cols, row_slot, col_slot, self.scale)
        return y + z.astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The dense scaled update in original coordinates, (d_out, d_in)."""
        # Block-diagonal in block order, then rows and columns gathered back.
        offsets = np.cumsum([0] + self.in_sizes)
        d_in = int(offsets[-1])
        diag = mx.concatenate(
            [
                mx.pad(w, [(0, 0), (int(offsets[k]), d_in - int(offsets[k + 1]))])
                for k, w in enumerate(self._weights())
            ]
        )
        return _gather(diag[self._row_slot], self._col_slot)

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
