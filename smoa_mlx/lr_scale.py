"""Anchor step scale: SMoA's learning rate means what LoRA's does, on any model.

With Adam every parameter moves by about the learning rate per step, whatever its
gradient's size, so one step of B_k changes `ΔW_k = scale * (B_k A_k) ⊙ M_k` by about
`lr * |A_k| * |M_k|`: SMoA's effective rate is LoRA's times the anchor's entry size,
which differs ~13x between the blocks of one model (stories260K: rms 0.03 in v_proj,
0.4 in q_proj) and between models. Multiplying B_k's step by `1 / rms(M_k)` makes the
step of ΔW that of a LoRA with the same rate, for every block. It is the same as
training `B'_k = rms(M_k) B_k` against the unit-rms anchor `M_k / rms(M_k)`, except
that the parameters, the saved adapter and `ΔW = scale * (B_k A_k) ⊙ M_k` stay
exactly SPEC §2's: only the optimizer's steps change (docs/RESULTS.md has the
measurements). A's steps are not scaled: A meets the anchor only through B, whose
size the scale already sets. `--lr-scale row` scales each row of B_k by its own row of
M_k instead (measured: the same best loss), `none` is plain Adam.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map, tree_map_with_path

from .errors import ConfigError
from .layer import base_weight
from .patch import smoa_layers

MODES = ("anchor", "row", "none")
# The default rate with the anchor scale: the best rate measured on stories260K (hidden
# 64, 50 and 200 steps, 3 datasets; docs/RESULTS.md), carried to other widths as
# 1/sqrt(hidden). The best measured on SmolLM2-135M (hidden 576, wikisql, 100 updates;
# issue 23) was 1e-2 of 3.3e-3/1e-2/3e-2, 3x below 64's, not the 9x of a 1/hidden rule
# (its 3.3e-3 cost 5.7%); 1/sqrt(hidden) gives both (docs/RESULTS.md, SmolLM2 section).
REFERENCE_RATE, REFERENCE_WIDTH = 3e-2, 64


def default_rate(model) -> float:
    """SMoA's and HiRA's default learning rate for this mlx-lm model (its hidden size)."""
    hidden = getattr(getattr(model, "args", None), "hidden_size", None)
    if not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"{type(model).__module__}: the model config has no hidden_size to "
                          "set the default learning rate from; pass --learning-rate")
    return float(f"{REFERENCE_RATE * math.sqrt(REFERENCE_WIDTH / hidden):.2g}")


def anchor_rms(layer, per_row: bool = False) -> list:
    """rms of each anchor `M_k = W0[rows_k][:, cols_k]` (SPEC §1 step 4-5), in float64
    (`per_row`: of each row of it, shape (out_k, 1)). For MoE experts (a stacked
    (E, d_out, d_in) weight, one plan per expert) each block's values are stacked to
    (E, 1, 1) or (E, out_k, 1), broadcasting against its B_k of shape (E, out_k, r_k)."""
    w0 = np.array(base_weight(layer.linear).astype(mx.float32), dtype=np.float64)
    rows, cols = np.array(layer.row_order), np.array(layer.col_order)
    if w0.ndim == 2:
        return _block_rms(w0, rows, cols, layer.num_blocks, per_row)
    experts = [_block_rms(w, r, c, layer.num_blocks, per_row) for w, r, c in zip(w0, rows, cols)]
    return [np.array([e[k] for e in experts]).reshape(len(experts), -1, 1)
            for k in range(layer.num_blocks)]


def _block_rms(w0, row_order, col_order, num_blocks: int, per_row: bool) -> list:
    rows, cols = np.array_split(row_order, num_blocks), np.array_split(col_order, num_blocks)
    if per_row:
        return [np.sqrt(np.mean(w0[np.ix_(r, c)] ** 2, axis=1, keepdims=True)) for r, c in zip(rows, cols)]
    return [float(np.sqrt(np.mean(w0[np.ix_(r, c)] ** 2))) for r, c in zip(rows, cols)]


def step_scales(model, mode: str = "anchor") -> dict:
    """The step multiplier of every trainable parameter, as a tree shaped like
    `model.trainable_parameters()`: `1 / rms(M_k)` for each `smoa_b.<k>` (mode "row":
    an (out_k, 1) array, 1 / rms of each row of M_k), 1 elsewhere (A, every LoRA parameter)."""
    def inverse(rms):  # an all-zero anchor (row) keeps ΔW there at 0 whatever B does: 1
        return np.where(rms > 0, 1.0 / np.where(rms > 0, rms, 1.0), 1.0)

    scales = {}
    for path, layer in smoa_layers(model).items():
        for k, rms in enumerate(anchor_rms(layer, per_row=mode == "row")):
            c = inverse(rms)
            scales[f"{path}.smoa_b.{k}"] = float(c) if np.ndim(c) == 0 else mx.array(c, dtype=mx.float32)
    return tree_map_with_path(lambda path, _: scales.get(path, 1.0), model.trainable_parameters())


def scaled(optimizer_class):
    """A subclass of an mlx optimizer class whose steps are scaled by `step_scales`
    (set on the instance): a per-parameter learning-rate multiplier (decoupled weight
    decay is part of the step, so it scales too). Its state is the base class's.

    The step is taken in float32 and rounded to the parameter's dtype once, after the
    scaling, so a bfloat16 parameter's rounding error is not multiplied by the scale."""

    class StepScaled(optimizer_class):
        step_scales = None

        def apply_gradients(self, gradients, parameters):
            old = tree_map(lambda g, p: p.astype(mx.float32), gradients, parameters)
            new = super().apply_gradients(gradients, old)

            def one(n, o, p, c):
                return (n if isinstance(c, float) and c == 1.0 else o + c * (n - o)).astype(p.dtype)

            return tree_map(one, new, old, parameters, self.step_scales)

    StepScaled.__name__ = f"StepScaled{optimizer_class.__name__}"
    return StepScaled
