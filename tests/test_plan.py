"""The spectral plan against an independent float64 NumPy implementation of SPEC §1.

The reference takes a full SVD (`np.linalg.svd`), scores rows and columns by their
energy-weighted mean spectral index, sorts, and cuts with `np.array_split`; the code
under test uses the Gram eigen-decomposition instead, so agreement is meaningful.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import smoa_mlx
from smoa_mlx.layer import SMoALinear
from smoa_mlx.plan import make_plan, split_rank, split_sizes

EPS32 = float(np.finfo(np.float32).eps)


def reference_scores(weight):
    """SPEC §1 steps 1-2 with a full float64 SVD: (score_row, score_col)."""
    w = np.asarray(weight, dtype=np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    j = np.arange(len(s), dtype=np.float64)
    scores = []
    for vecs in (u, vt.T):
        energy = (s**2)[None, :] * vecs**2
        scores.append((energy * j).sum(axis=1) / np.maximum(energy.sum(axis=1), EPS32))
    return scores


def reference_plan(weight, k, scores=None):
    """Orders, blocks (np.array_split of each order) and the sorted scores."""
    out = []
    for score in scores or reference_scores(weight):
        order = np.argsort(score, kind="stable")
        out.append((order, np.array_split(order, k), score[order]))
    return out


def boundary_gap(sorted_scores, k):
    cuts = np.cumsum([len(c) for c in np.array_split(sorted_scores, k)])[:-1]
    return min((sorted_scores[c] - sorted_scores[c - 1] for c in cuts), default=np.inf)


def assert_plan_matches(weight, k, scores=None):
    plan = make_plan(weight, k)
    (rows, row_blocks, row_sorted), (cols, col_blocks, col_sorted) = reference_plan(weight, k, scores)
    d_out, d_in = np.shape(weight)
    assert plan.num_blocks == k
    assert plan.row_order.shape == (d_out,) and plan.col_order.shape == (d_in,)
    # Block membership is what the adapter depends on: it must always agree.
    for got, want in zip(plan.row_blocks + plan.col_blocks, row_blocks + col_blocks):
        assert sorted(got.tolist()) == sorted(want.tolist())
    ref_gap = min(boundary_gap(row_sorted, k), boundary_gap(col_sorted, k))
    if np.isinf(ref_gap):
        assert k == 1 and np.isinf(plan.boundary_gap)
    else:
        assert plan.boundary_gap == pytest.approx(ref_gap, rel=1e-6, abs=1e-9)
    ref_order_gap = min(np.diff(row_sorted).min(initial=np.inf), np.diff(col_sorted).min(initial=np.inf))
    assert plan.order_gap == pytest.approx(ref_order_gap, rel=1e-6, abs=1e-9)
    # The full orders agree too wherever no two scores are within rounding of each other.
    if ref_order_gap > 1e-9:
        np.testing.assert_array_equal(plan.row_order, rows)
        np.testing.assert_array_equal(plan.col_order, cols)
    return plan


def decaying(rng, d_out, d_in, power=0.5):
    """U diag(j^-power) V^T: a spectrum shaped like a trained weight's."""
    q = min(d_out, d_in)
    u, _ = np.linalg.qr(rng.standard_normal((d_out, q)))
    v, _ = np.linalg.qr(rng.standard_normal((d_in, q)))
    return ((u * np.arange(1, q + 1) ** -power) @ v.T).astype(np.float32)


SHAPES = [(16, 16), (24, 9), (9, 24), (17, 13), (13, 17), (5, 31), (40, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_plan_matches_svd_definition_random(shape, k):
    rng = np.random.default_rng([*shape, k])
    assert_plan_matches(rng.standard_normal(shape).astype(np.float32), k)
    assert_plan_matches(decaying(rng, *shape), k)


def test_plan_is_a_permutation_of_int64():
    plan = make_plan(np.random.default_rng(0).standard_normal((11, 7)), 3)
    assert plan.row_order.dtype == np.int64 and plan.col_order.dtype == np.int64
    assert sorted(plan.row_order.tolist()) == list(range(11))
    assert sorted(plan.col_order.tolist()) == list(range(7))
    assert [len(b) for b in plan.row_blocks] == [4, 4, 3]
    assert [len(b) for b in plan.col_blocks] == [3, 2, 2]


def test_exact_ties_at_a_boundary_are_reported():
    """Zero rows all score 0: a cut between two of them is a tie, reported as gap 0."""
    w = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    w[:6] = 0.0
    plan = make_plan(w, 2)  # rows cut at 5: inside the run of six zero rows
    assert plan.boundary_gap == 0.0 and plan.order_gap == 0.0
    assert sorted(plan.row_order[:6].tolist()) == list(range(6))
    w[:2] = np.random.default_rng(2).standard_normal((2, 6))  # now 4 zero rows: no boundary tie
    plan = make_plan(w, 2)
    assert plan.boundary_gap > 0.0 and plan.order_gap == 0.0


def test_plan_matches_svd_definition_on_stories(stories_dir):
    """Every linear weight of the real pretrained model, K = 1..4."""
    model, _ = smoa_mlx.load(str(stories_dir))
    weights = {p: np.array(m.weight) for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(weights) == 5 * 7
    for path, w in weights.items():
        scores = reference_scores(w)
        for k in (1, 2, 3, 4):
            plan = assert_plan_matches(w, k, scores)
            assert plan.order_gap > 1e-9, f"{path}: near-tie in the order"


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 64)])
def test_quantized_layer_is_planned_on_the_dequantized_weight(bits, group_size):
    mx.random.seed(3)
    base = nn.QuantizedLinear.from_linear(nn.Linear(128, 40), group_size, bits)
    # (test_layer.py checks the de-quantization itself against a NumPy unpacking.)
    w = np.array(mx.dequantize(base.weight, base.scales, base.biases, group_size, bits))
    for k in (1, 2, 3):
        layer = SMoALinear.from_base(base, rank=4, num_blocks=k)
        (rows, _, _), (cols, _, _) = reference_plan(w, k)
        np.testing.assert_array_equal(np.array(layer.row_order), rows)
        np.testing.assert_array_equal(np.array(layer.col_order), cols)


def test_plan_errors():
    w = np.zeros((6, 4), np.float32)
    for bad in (5, 0, -1):
        with pytest.raises(ValueError, match="num_blocks"):
            make_plan(w, bad)
    with pytest.raises(ValueError, match="2-D"):
        make_plan(np.zeros(4), 1)
    with pytest.raises(ValueError, match="num_blocks"):
        SMoALinear.from_base(nn.Linear(4, 6), rank=4, num_blocks=5)


@pytest.mark.parametrize(
    "rank,k,branch_ranks",
    [(8, 2, [3, 3]), (8, 2, [8]), (8, 2, [9, -1]), (8, 3, [4, 4]), (4, 2, [2, 1, 1])],
)
def test_bad_branch_ranks(rank, k, branch_ranks):
    with pytest.raises(ValueError, match="branch_ranks"):
        split_rank(rank, k, branch_ranks)
    with pytest.raises(ValueError, match="branch_ranks"):
        SMoALinear.from_base(nn.Linear(12, 12), rank=rank, num_blocks=k, branch_ranks=branch_ranks)


def test_bad_rank():
    for rank in (0, -2):
        with pytest.raises(ValueError, match="rank"):
            SMoALinear.from_base(nn.Linear(12, 12), rank=rank, num_blocks=2)


def test_split_semantics():
    for n in range(1, 30):
        for k in range(1, n + 1):
            assert split_sizes(n, k) == [len(c) for c in np.array_split(np.arange(n), k)]
    assert split_rank(8, 3) == [3, 3, 2]
    assert split_rank(1, 2) == [1, 0]
    assert split_rank(8, 2, [8, 0]) == [8, 0]
