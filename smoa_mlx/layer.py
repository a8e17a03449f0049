"""SMoALinear: a frozen linear layer plus K spectrally aligned modulation blocks.

In the weight's own coordinates SMoA is HiRA with block-diagonal factors: with
`B_o` (d_out, R) and `A_o` (R, d_in) holding B_k and A_k on block k's rows and
columns (R = sum of the block ranks), `ΔW = scale * W0 ⊙ (B_o A_o)`, exactly zero
off the blocks (SPEC §1). Each call picks one of three exact evaluations: blocked
while dropout is active, otherwise the cheaper of folded and merged for its number
of rows (docs/PERFORMANCE.md has the FLOP counts and measurements):

- folded, for few input rows (decoding): `ΔW x = scale * sum_r B_o[:, r] ⊙ W0 (A_o[r] ⊙ x)`,
  so one matmul of W0 (quantized or not) with 1 + R rows gives base and update in one
  read of the weight;
- merged, for many rows (training, prefill): one matmul with `W0 + ΔW`, formed on the
  fly, one layer at a time; a custom VJP takes dA, dB from the per-block
  `dW_k = g_k^T x_k` (1/K of a dense matmul) instead of the dense `g^T x` autodiff
  would form, and rebuilds `W0 + ΔW` in the backward pass rather than keeping it
  alive. This departs from SPEC §1's "never build the dense ΔW during training" on
  purpose: the dense transient costs less time than the per-block forward and input
  gradient it replaces (docs/ARCHITECTURE.md, "Departures from the SPEC");
- blocked, when dropout is active (the update sees another input than the base):
  per-block matmuls with `W_k = scale * (B_k A_k) ⊙ M_k`, M_k the block of W0.

Nothing beyond A and B is stored: W0 + ΔW and the anchors M_k are rebuilt from the
(frozen, possibly quantized) base weight when needed. Inference may `prepare` a layer
once (A and B fixed): a float base then holds `W0 + ΔW`; a quantized base keeps W0
(re-quantizing `W0 + ΔW` at the base's bits would round the update away: fuse_check) and
adds its update in whichever of `PREPARED_FORMATS` decodes fastest on this device.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .errors import AdapterError, ConfigError
from .layouts.names import natural_key
from .plan import split_rank, split_sizes
from .plan_cache import cached_plan

# Inputs with at most this many rows times (1 + R) take the folded path: its matmul
# has 1 + R rows per input row, so it only wins while reading W0 dominates (decoding).
FOLDED_MAX_ROWS = 64
# How a prepared quantized layer adds its update to W0's quantized matmul, in order of the
# memory they add: the folded path (nothing stored; one quantized matmul of 1 + R rows, as
# cheap as one row where quantized matmuls are memory-bound), each block's ΔW_k quantized
# at DELTA_BITS in groups of DELTA_GROUP (8 bits keep the update's effect on SmolLM2's
# logits within 0.5%; 4 bits 7%), or ΔW_k in float32 (exact; on a CPU, whose float matmul
# outruns its quantized kernel, SmolLM2's layers decode at 0.93x the base's against 8 bits'
# 0.65x and folding's 0.11x). Each kind of layer takes the fastest, measured once on this
# device (`SMoALinear._fastest`), unless a format adding less memory costs at most
# FORMAT_MARGIN of the base layer's time more; FORMAT_ENV pins one (docs/PERFORMANCE.md).
PREPARED_FORMATS = ("folded", "8bit", "float32")
DELTA_BITS, DELTA_GROUP = 8, 32
FORMAT_MARGIN = 0.1
FORMAT_ENV = "SMOA_MLX_PREPARED_FORMAT"
_FASTEST: dict = {}  # layer kind -> format, for the process (serve re-prepares on switches)


@dataclass(frozen=True)
class Blocks:
    """Where the K blocks sit: each block's original row and column indices, and each
    original index's slot in block order. K = 1 works in the weight's own coordinates
    (A's columns and B's rows are permuted instead), so it has `rows = cols = [None]`
    and no slots."""

    rows: list
    cols: list
    row_slot: mx.array | None
    col_slot: mx.array | None


WHOLE = Blocks([None], [None], None, None)


def adapter_layers(model: nn.Module, kind=None) -> dict:
    """Every adapter layer of `model` by module path, layers in numeric order: the one
    definition of one, a module that can `fuse` into a plain layer, as SMoA's and all of
    mlx-lm's (LoRA, DoRA, switch, embedding) can. `kind`: only instances of it."""
    found = {p: m for p, m in model.named_modules()
             if callable(getattr(type(m), "fuse", None)) and (kind is None or isinstance(m, kind))}
    return {p: found[p] for p in sorted(found, key=natural_key)}


@contextmanager
def adapters_off(model: nn.Module):
    """Inside, `model` is its base: every adapter layer is swapped for the layer it wraps
    (`linear`, or `embedding` for mlx-lm's LoRAEmbedding) and put back on leaving.

    DPO's reference policy, computed in the same step without a second model. Swapping
    the module (rather than zeroing a scale) holds for every kind: a DoRA layer with
    scale 0 still applies its learned magnitude.
    """
    from mlx.utils import tree_unflatten

    layers = adapter_layers(model)
    model.update_modules(tree_unflatten(
        [(p, m.linear if "linear" in m else m.embedding) for p, m in layers.items()]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(list(layers.items())))


def base_weight(base: nn.Module, after=None) -> mx.array:
    """The float weight of a Linear or the de-quantized weight of a QuantizedLinear
    (computed only after the array `after` is, if given: see `_merged_matmul`); MoE
    expert layers (`archs.SWITCH_TYPES`) likewise, (E, d_out, d_in)."""
    if isinstance(base, (nn.QuantizedLinear, QuantizedSwitchLinear)):
        parts = [base.weight, base.scales] + ([base.biases] if "biases" in base else [])
        if after is not None:
            parts = _tied(parts, after)
        w, scales, biases = parts[0], parts[1], parts[2] if len(parts) > 2 else None
        kw = dict(group_size=base.group_size, bits=base.bits, mode=base.mode)
        g = getattr(base, "global_scale", None)
        if g is None:
            return mx.dequantize(w, scales, biases, **kw)
        # nvfp4 experts with one global scale each; MLX de-quantizes with a scalar one
        return mx.stack([mx.dequantize(w[e], scales[e], None if biases is None else biases[e],
                                       global_scale=g[e], **kw) for e in range(g.shape[0])])
    if isinstance(base, (nn.Linear, SwitchLinear)):
        return base.weight if after is None else _tied([base.weight], after)[0]
    raise TypeError(f"SMoA adapts nn.Linear or nn.QuantizedLinear, not {type(base).__name__}")


def _apply_weight(base: nn.Module, x: mx.array) -> mx.array:
    """`x W0^T` without the bias; a quantized base multiplies without de-quantizing."""
    if isinstance(base, nn.QuantizedLinear):
        return mx.quantized_matmul(x, base.weight, scales=base.scales, biases=base.get("biases"),
                                   transpose=True, group_size=base.group_size, bits=base.bits,
                                   mode=base.mode)
    return x @ base.weight.T


def _add_bias(base: nn.Module, y: mx.array) -> mx.array:
    return y + base.bias if "bias" in base else y


def _gather(x: mx.array, index) -> mx.array:
    """`x[..., index]` (None: all of x, in order). `take_along_axis` with a broadcast
    index is ~6x faster than `take` along the last axis on MLX's CPU backend."""
    if index is None:
        return x
    return mx.take_along_axis(x, index.reshape((1,) * (x.ndim - 1) + (-1,)), axis=-1)


def _gather_rows(w: mx.array, index) -> mx.array:
    return w if index is None else mx.take(w, index, axis=0)


def _join(parts: list[mx.array], slot) -> mx.array:
    """Concatenate per-block outputs (block order) and gather them back to original order."""
    return _gather(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1), slot)


def _block_diagonal(parts: list[mx.array]) -> mx.array:
    """The 2-D block-diagonal matrix of `parts`, zeros elsewhere."""
    if len(parts) == 1:
        return parts[0]
    width = sum(p.shape[1] for p in parts)
    offsets = np.cumsum([0] + [p.shape[1] for p in parts])
    return mx.concatenate(
        [mx.pad(p, [(0, 0), (int(o), width - int(o) - p.shape[1])]) for p, o in zip(parts, offsets)]
    )


def _embedded(a_list, b_list, blocks: Blocks) -> tuple[mx.array, mx.array]:
    """(A_o, B_o): the block factors placed on their blocks in the weight's coordinates."""
    return (_gather(_block_diagonal(a_list), blocks.col_slot),
            _gather_rows(_block_diagonal(b_list), blocks.row_slot))


def _delta(w0, a_list, b_list, blocks: Blocks, scale) -> mx.array:
    """The dense `ΔW = scale * W0 ⊙ (B_o A_o)` in original coordinates."""
    a_o, b_o = _embedded(a_list, b_list, blocks)
    return w0 * ((scale * b_o) @ a_o)


def _merged_weight(w0, a_list, b_list, blocks: Blocks, scale, dtype) -> mx.array:
    """`W0 + ΔW`, in `dtype`."""
    return (w0 + _delta(w0, a_list, b_list, blocks, scale)).astype(dtype)


def _block_weight(a: mx.array, b: mx.array, anchor: mx.array, scale: float, dtype) -> mx.array:
    """`scale * (B A) ⊙ M` of one block (scale folded into the small B), in `dtype`."""
    return (((scale * b) @ a) * anchor).astype(dtype)


def _anchors(w0: mx.array, blocks: Blocks) -> list[mx.array]:
    """M_k = W0[rows_k][:, cols_k] (K = 1: W0 itself)."""
    return [_gather(_gather_rows(w0, r), c) for r, c in zip(blocks.rows, blocks.cols)]


def _factor_grads(g, x, a_list, b_list, anchors, blocks: Blocks, scale):
    """dA_k, dB_k (in the parameters' dtypes) from the per-block `dW_k = g_k^T x_k`
    (g, x: 2-D); the anchor turns it into d(B A), and the scale goes on the small ends."""
    da, db = [], []
    for a, b, m, r, c in zip(a_list, b_list, anchors, blocks.rows, blocks.cols):
        d_ba = (_gather(g, r).T @ _gather(x, c)).astype(a.dtype) * m
        da.append((scale * (b.T @ d_ba)).astype(a.dtype))
        db.append((scale * (d_ba @ a.T)).astype(b.dtype))
    return da, db


def _tied(arrays: list[mx.array], after: mx.array) -> list[mx.array]:
    """`arrays`, computed only after `after`: without this tie `mx.compile` merges the
    backward's recomputation with the forward's (or schedules it early), and every
    layer's rebuilt weights stay alive from the forward to the backward pass."""
    return mx.depends(list(arrays), [after])


def _folded_factors(a_list, b_list, blocks: Blocks, scale) -> tuple[mx.array, mx.array]:
    """`[1; A_o]` (1 + R, d_in) and `[1; scale * B_o^T]` (1 + R, d_out): the folded path's
    factors with a row of ones for the base's own row, so that it needs no concatenation."""
    a_o, b_o = _embedded(a_list, b_list, blocks)
    return (mx.concatenate([mx.ones((1, a_o.shape[1]), a_o.dtype), a_o]),
            mx.concatenate([mx.ones((1, b_o.shape[0]), b_o.dtype), (scale * b_o).T]))


def _folded(base, x, a_ext, b_ext) -> mx.array:
    """Base output plus update from one matmul of W0 with `[x, A_o[r] ⊙ x for r]`, i.e.
    `x[None] * a_ext`; four operations (multiply, matmul, multiply, sum) plus the bias."""
    y = _apply_weight(base, x[..., None, :] * a_ext.astype(x.dtype))
    return _add_bias(base, (y * b_ext.astype(y.dtype)).sum(axis=-2))


@dataclass(frozen=True)
class Folded:
    """A quantized base's prepared folded update: `_folded_factors`, computed once."""

    a_ext: mx.array
    b_ext: mx.array

    @property
    def arrays(self) -> tuple:
        return (self.a_ext, self.b_ext)


@dataclass(frozen=True)
class Prepared:
    """A quantized base's prepared update (`_prepared`): the K blocks' ΔW_k zero-padded
    to one size and stacked, (K, out_max, in_max), so that a call is one gather of x,
    one batched matmul and one gather back, whatever K (per-block matmuls, concatenated,
    cost a third more at decoding on a CPU: MLX's per-operation overhead)."""

    weights: tuple  # (stacked,) in float, or its (weight, scales, biases) at DELTA_BITS
    cols: mx.array | None  # (K * in_max,) x's columns in block order (padding: column 0)
    slots: mx.array | None  # (d_out,) each output's place among the K * out_max block outputs
    experts: mx.array  # arange(K): the 8-bit matmul's index of each block

    @property
    def arrays(self) -> tuple:
        return self.weights


def _prepared(w0, a_list, b_list, blocks: Blocks, scale, dtype, fmt: str) -> Prepared:
    """`Prepared` in `fmt`: "float32", or "8bit" (blocks' widths a multiple of
    DELTA_GROUP; scales in `dtype`). Padding is exact: padded rows are never gathered
    back, and padded columns (only where the blocks' widths differ: float32) meet zero
    weights."""
    ws = [_block_weight(a, b, m, scale, mx.float32) for a, b, m in zip(a_list, b_list, _anchors(w0, blocks))]
    out_max, in_max = max(w.shape[0] for w in ws), max(w.shape[1] for w in ws)
    stacked = mx.stack([mx.pad(w, [(0, out_max - w.shape[0]), (0, in_max - w.shape[1])]) for w in ws])
    if fmt == "float32":
        weights = (stacked,)
    else:
        q, s, z = mx.quantize(stacked, group_size=DELTA_GROUP, bits=DELTA_BITS)
        weights = (q, s.astype(dtype), z.astype(dtype))
    if blocks.cols[0] is None:  # K = 1: the weight's own coordinates
        return Prepared(weights, None, None, mx.arange(1))
    pad = [mx.concatenate([c, mx.zeros((in_max - c.size,), c.dtype)]) for c in blocks.cols]
    place = np.concatenate([k * out_max + np.arange(r.size) for k, r in enumerate(blocks.rows)])
    slots = place[np.argsort(np.concatenate([np.array(r) for r in blocks.rows]))]
    return Prepared(weights, mx.concatenate(pad), mx.array(slots.astype(np.uint32)), mx.arange(len(ws)))


def _prepared_update(x, p: Prepared) -> mx.array:
    """`x ΔW^T` from `_prepared`."""
    xk = _gather(x, p.cols).reshape(*x.shape[:-1], p.experts.size, 1, -1)
    if len(p.weights) == 1:
        z = xk @ p.weights[0].swapaxes(-1, -2)
    else:
        z = mx.gather_qmm(xk, *p.weights, rhs_indices=p.experts, transpose=True,
                          group_size=DELTA_GROUP, bits=DELTA_BITS)
    return _gather(z.reshape(*x.shape[:-1], -1), p.slots)


def _merged_matmul(base, x, a_list, b_list, blocks: Blocks, scale):
    """`x (W0 + ΔW)^T` (no bias) with the custom VJP described in the module docstring;
    computed in the dtype `x W0^T` has, as the base layer would."""
    k = len(a_list)

    @mx.custom_function
    def merged(x, a_list, b_list):
        w0 = base_weight(base)
        w = _merged_weight(w0, a_list, b_list, blocks, scale, mx.result_type(x, w0))
        return x @ w.T

    @merged.vjp
    def merged_vjp(primals, cotangent, output):
        x, a_list, b_list = primals
        w0 = base_weight(base, after=cotangent)
        late = _tied(list(a_list) + list(b_list), cotangent)
        w = _merged_weight(w0, late[:k], late[k:], blocks, scale, mx.result_type(x, w0))
        g2, x2 = cotangent.reshape(-1, cotangent.shape[-1]), x.reshape(-1, x.shape[-1])
        da, db = _factor_grads(g2, x2, a_list, b_list, _anchors(w0, blocks), blocks, scale)
        return (cotangent @ w).astype(x.dtype), da, db

    return merged(x, a_list, b_list)


def _blocked_update(base, x, a_list, b_list, blocks: Blocks, scale):
    """`x ΔW^T` block by block, with a custom VJP that recomputes W_k in the backward pass
    and returns the input gradient with a gather instead of MLX's scatter-add."""

    @mx.custom_function
    def update(x, a_list, b_list):
        anchors = _anchors(base_weight(base), blocks)
        z = [_gather(x, c) @ _block_weight(a, b, m, scale, mx.result_type(x, m)).T
             for a, b, m, c in zip(a_list, b_list, anchors, blocks.cols)]
        return _join(z, blocks.row_slot)

    @update.vjp
    def update_vjp(primals, cotangent, output):
        x, a_list, b_list = primals
        k = len(a_list)
        anchors = _anchors(base_weight(base, after=cotangent), blocks)
        late = _tied(list(a_list) + list(b_list), cotangent)
        g2, x2 = cotangent.reshape(-1, cotangent.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = [_gather(g2, r) @ _block_weight(a, b, m, scale, mx.result_type(x, m))
              for a, b, m, r in zip(late[:k], late[k:], anchors, blocks.rows)]
        da, db = _factor_grads(g2, x2, a_list, b_list, anchors, blocks, scale)
        return _join(dx, blocks.col_slot).reshape(x.shape).astype(x.dtype), da, db

    return update(x, a_list, b_list)


def init_adapter(layer: nn.Module, base, row_order, col_order, shape, rank, num_blocks, alpha,
                 dropout, branch_ranks, experts: tuple = ()) -> None:
    """The hyperparameters, orders and factors SMoALinear and SMoASwitchLinear share (SPEC §1:
    rank split, scale = alpha / r, A uniform in ±1/sqrt(in_k), B = 0), with `experts` as a
    leading shape of every factor; freezes the base and the orders."""
    d_out, d_in = shape
    if num_blocks > min(d_out, d_in):
        raise ConfigError(f"num_blocks={num_blocks} exceeds min(d_out, d_in) of {tuple(shape)}")
    layer.linear = base
    layer.rank, layer.num_blocks, layer.alpha = int(rank), int(num_blocks), float(alpha)
    layer.branch_ranks = split_rank(layer.rank, layer.num_blocks, branch_ranks)
    layer.scale = layer.alpha / layer.rank
    layer.dropout_p = float(dropout)
    layer.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
    layer.row_order = mx.array(row_order.astype(np.int32))
    layer.col_order = mx.array(col_order.astype(np.int32))
    layer.out_sizes = split_sizes(d_out, layer.num_blocks)
    layer.in_sizes = split_sizes(d_in, layer.num_blocks)
    layer.smoa_a = [
        mx.random.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), (*experts, r, i))
        for r, i in zip(layer.branch_ranks, layer.in_sizes)
    ]
    layer.smoa_b = [mx.zeros((*experts, o, r)) for r, o in zip(layer.branch_ranks, layer.out_sizes)]
    layer.linear.freeze()
    layer.freeze(keys=["row_order", "col_order"], recurse=False)


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
        planner=cached_plan,
    ) -> "SMoALinear":
        """Wrap `base`; `orders=(row_order, col_order)` skips the spectral plan (loading).

        Otherwise `planner(float32 weight, num_blocks)` plans: by default
        `plan_cache.cached_plan`, which reads and writes the on-disk score cache (the
        same plan as `plan.make_plan`, instant the second time); pass `make_plan` to
        plan without touching the disk.
        """
        weight = base_weight(base)
        if orders is None:
            plan = planner(np.array(weight.astype(mx.float32)), num_blocks)
            orders = (plan.row_order, plan.col_order)
        return SMoALinear(base, weight, orders, rank, num_blocks, alpha, dropout, branch_ranks)

    def __init__(self, base, weight, orders, rank, num_blocks, alpha, dropout, branch_ranks):
        super().__init__()
        d_out, d_in = weight.shape
        row_order, col_order = (np.asarray(o, dtype=np.int64) for o in orders)
        if sorted(row_order.tolist()) != list(range(d_out)) or sorted(
            col_order.tolist()
        ) != list(range(d_in)):
            raise AdapterError(
                f"row_order/col_order must be permutations of {d_out}/{d_in} indices, got "
                f"lengths {len(row_order)}/{len(col_order)}"
            )
        init_adapter(self, base, row_order, col_order, (d_out, d_in), rank, num_blocks, alpha,
                     dropout, branch_ranks)
        self._blocks = Blocks(
            [mx.array(r.astype(np.uint32)) for r in np.array_split(row_order, num_blocks)],
            [mx.array(c.astype(np.uint32)) for c in np.array_split(col_order, num_blocks)],
            mx.array(np.argsort(row_order).astype(np.uint32)),
            mx.array(np.argsort(col_order).astype(np.uint32)),
        )
        self._merged = self._delta = self._format = None

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(self.out_sizes), sum(self.in_sizes))

    def prepare(self, fmt: str | None = None) -> None:
        """For inference: compute once what every call would rebuild, until `unprepare`
        (A and B must not change meanwhile): a float base gets `W0 + ΔW`, one plain
        matmul as the base's; a quantized base adds its update in `fmt`, one of
        PREPARED_FORMATS (default: `SMOA_MLX_PREPARED_FORMAT`, else the fastest here;
        "8bit" on blocks without whole groups of 32 columns: float32). The base layer
        is untouched, so `unprepare` is exact."""
        fmt = fmt or os.environ.get(FORMAT_ENV) or None
        if fmt not in (None, *PREPARED_FORMATS):
            raise ConfigError(f"unknown prepared format {fmt!r} (argument or {FORMAT_ENV}); "
                              f"choose from {', '.join(PREPARED_FORMATS)}")
        if self._merged is not None or self._format is not None and fmt in (None, self._format):
            return
        self.unprepare()
        if isinstance(self.linear, nn.Linear):
            w0 = self.linear.weight
            self._merged = (w0 + self.delta_weight()).astype(w0.dtype)
            mx.eval(self._merged)
            return
        if fmt is not None and fmt not in self._formats():
            fmt = "float32"  # 8 bits without whole groups: the next format up
        self._format, self._delta = (fmt, self._delta_in(fmt)) if fmt else self._fastest()

    def _formats(self) -> tuple[str, ...]:
        """The PREPARED_FORMATS this layer can take (8 bits: whole groups, no padding)."""
        ok = len(set(self.in_sizes)) == 1 and self.in_sizes[0] % DELTA_GROUP == 0
        return tuple(f for f in PREPARED_FORMATS if f != "8bit" or ok)

    def _delta_in(self, fmt: str) -> Folded | Prepared:
        """What `__call__` adds to a quantized base in `fmt`."""
        a, b, blocks = self._factors()
        if fmt == "folded":
            delta = Folded(*_folded_factors(a, b, blocks, self.scale))
            mx.eval(delta.arrays)
            return delta
        w0 = base_weight(self.linear)  # its dtype, not the scales' (uint8 in mxfp4/nvfp4)
        delta = _prepared(w0, a, b, blocks, self.scale, w0.dtype, fmt)
        mx.eval(delta.weights, delta.cols, delta.slots)
        return delta

    def _fastest(self, rounds: int = 5, calls: int = 8) -> tuple[str, Folded | Prepared]:
        """`_formats()`' choice for this kind of layer on this device, and its update (the
        one timed, when this call timed them). Each format's cost is its time over the base
        layer's alone (`calls` one-token calls evaluated together, medians of `rounds`
        interleaved rounds), so that one evaluation's fixed cost, shared by every layer of
        a model, does not hide the differences."""
        base = self.linear
        kind = (self.shape, self.num_blocks, self.rank, type(base).__name__, base.group_size,
                base.bits, base.mode, base.scales.dtype, str(mx.default_device()))
        if kind in _FASTEST:
            return _FASTEST[kind], self._delta_in(_FASTEST[kind])
        x = mx.random.normal((1, self.shape[1]), key=mx.random.key(0)).astype(
            base_weight(base).dtype)
        formats = self._formats()
        variants = {"base": None} | {f: self._delta_in(f) for f in formats}
        times = {v: [] for v in variants}
        try:
            for i in range(rounds + 1):  # the first round warms up
                for v, delta in variants.items():
                    self._delta = delta
                    call = base if v == "base" else self
                    start = time.perf_counter()
                    mx.eval([call(x) for _ in range(calls)])
                    if i:
                        times[v].append(time.perf_counter() - start)
        finally:
            self._delta = None
        median = {v: float(np.median(t)) for v, t in times.items()}
        extra = {f: median[f] - median["base"] for f in formats}
        least = min(extra.values())
        _FASTEST[kind] = next(f for f in formats if extra[f] <= least + FORMAT_MARGIN * median["base"])
        return _FASTEST[kind], variants[_FASTEST[kind]]

    @property
    def prepared_format(self) -> str | None:
        """How `prepare` applies the update: "merged" (a float base), one of
        PREPARED_FORMATS (a quantized base), or None (not prepared)."""
        return "merged" if self._merged is not None else self._format

    @property
    def prepared_nbytes(self) -> int:
        """Memory `prepare` added beside the base and the factors."""
        arrays = [self._merged] if self._merged is not None else self._delta.arrays if self._delta else []
        return sum(a.nbytes for a in arrays)

    def unprepare(self) -> None:
        """Back to computing from A, B and the base on every call (frees `prepare`'s arrays)."""
        self._merged = self._delta = self._format = None

    def _factors(self) -> tuple[list, list, Blocks]:
        """(A list, B list, where the blocks sit) for the evaluations above.

        K = 1 works in the base weight's own coordinates: A's columns and B's rows are
        permuted instead of the input, the output and the weight.
        """
        if self.num_blocks == 1:
            a = [_gather(self.smoa_a[0], self._blocks.col_slot)]
            b = [_gather_rows(self.smoa_b[0], self._blocks.row_slot)]
            return a, b, WHOLE
        return self.smoa_a, self.smoa_b, self._blocks

    def _path(self, x: mx.array) -> str:
        """Which evaluation serves `x`: it depends on the number of rows and on whether
        dropout is active (dropout > 0 in training mode) alone, so a layer without
        dropout gives bitwise the same output in train and eval mode."""
        if self.dropout is not None and self.training:
            return "blocked"
        return "folded" if self._folds(x) else "merged"

    def _folds(self, x: mx.array) -> bool:
        """Few rows take the folded path. One row always does: whatever the rank, that
        reads W0 once and builds nothing."""
        rows = x.size // x.shape[-1]
        return rows == 1 or rows * (1 + self.rank) <= FOLDED_MAX_ROWS

    def __call__(self, x: mx.array) -> mx.array:
        if self._merged is not None:
            return _add_bias(self.linear, x @ self._merged.T)
        if isinstance(self._delta, Prepared):
            y = self.linear(x)
            return y + _prepared_update(x, self._delta).astype(y.dtype)
        folded = self._delta  # a Folded (prepared, for inference: no dropout), or None
        path = ("folded" if self._folds(x) else "merged") if folded else self._path(x)
        a, b, blocks = self._factors()
        if path == "folded":
            return _folded(self.linear, x, *(folded.arrays if folded else _folded_factors(a, b, blocks, self.scale)))
        if path == "merged":
            return _add_bias(self.linear, _merged_matmul(self.linear, x, a, b, blocks, self.scale))
        x_in = x if self.dropout is None else self.dropout(x)
        z = _blocked_update(self.linear, x_in, a, b, blocks, self.scale)
        y = self.linear(x)
        return y + z.astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """The dense scaled update in original coordinates, (d_out, d_in)."""
        a, b, blocks = self._factors()
        return _delta(base_weight(self.linear), a, b, blocks, self.scale)

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
