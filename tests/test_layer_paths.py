"""SMoALinear's three evaluation paths (folded, merged, blocked), against the float64
references of test_layer.py.

The layer picks the folded path for few input rows (decoding), the merged path with its
custom VJP for many, and the blocked path while dropout is active; each is forced here on
the same layers, so each is checked on equal and unequal blocks, zero-rank branches,
K = 1 and quantized bases.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_layer import (
    CASES,
    F32_TOL,
    assert_grads_match_dense,
    make_layer,
    np64,
    numpy_dequantize,
    randomize_b,
    reference_delta,
    reference_forward,
)

import smoa_mlx.layer as layer_mod
from smoa_mlx.layer import SMoALinear

PATHS = ("folded", "merged", "blocked")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setattr(SMoALinear, "_path", lambda self, x: request.param)
    return request.param


@pytest.mark.parametrize("d_out,d_in,k,rank,bias,branch_ranks", CASES)
def test_forward_matches_numpy_on_every_path(path, d_out, d_in, k, rank, bias, branch_ranks):
    base, layer = make_layer(d_out, d_in, k, rank, bias, branch_ranks, alpha=6.0)
    w = np64(base.weight)
    want = reference_forward(x := mx.random.normal((2, 3, d_in)), w,
                             reference_delta(layer, w, rank, 6.0, k), base.bias if bias else None)
    np.testing.assert_allclose(np64(layer(x)), want, **F32_TOL)


@pytest.mark.parametrize("d_out,d_in,k,rank,branch_ranks",
                         [(17, 13, 3, 5, None), (12, 20, 2, 6, [6, 0]), (9, 9, 1, 3, None), (16, 24, 4, 8, None)])
def test_grads_match_dense_formula_on_every_path(path, d_out, d_in, k, rank, branch_ranks):
    base, layer = make_layer(d_out, d_in, k, rank, branch_ranks=branch_ranks, alpha=3.0, seed=11)
    assert_grads_match_dense(layer, np64(base.weight), base.bias, 3.0 / rank, k, d_in, d_out)


@pytest.mark.parametrize("k", [1, 2])
def test_quantized_grads_on_every_path(path, k):
    mx.random.seed(13)
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 19), 32, 4)
    layer = SMoALinear.from_base(base, rank=6, num_blocks=k, alpha=4.0)
    randomize_b(layer, 14)
    assert_grads_match_dense(layer, numpy_dequantize(base), base.bias, 4.0 / 6, k, 64, 19)


def test_paths_are_chosen_by_shape_and_dropout(monkeypatch):
    _, layer = make_layer(40, 30, 3, 6, seed=3)  # R = 6: 1 + R = 7 rows per input row
    small, large = mx.random.normal((9, 30)), mx.random.normal((3, 40, 30))
    assert (layer._path(small), layer._path(large)) == ("folded", "merged")  # 63 and 840 rows
    assert layer._path(mx.random.normal((10, 30))) == "merged"  # 70 > FOLDED_MAX_ROWS
    monkeypatch.setattr(layer_mod, "FOLDED_MAX_ROWS", 0)
    assert layer._path(small) == "merged"
    _, dropping = make_layer(40, 30, 3, 6, seed=3, dropout=0.5)
    assert dropping.training and dropping._path(small) == "blocked"
    dropping.eval()
    assert dropping._path(small) == "merged"  # dropout is off in eval mode


def test_paths_agree_bitwise_in_train_and_eval_mode():
    """Without dropout the path depends on the shape alone: eval mode changes nothing."""
    base, layer = make_layer(21, 14, 3, 6, seed=4)
    for x in (mx.random.normal((2, 14)), mx.random.normal((4, 30, 14))):
        y_train = layer(x)
        layer.eval()
        assert mx.array_equal(layer(x), y_train).item()
        layer.train()


def test_only_the_factors_are_stored_and_k1_blocks_are_the_permuted_weight():
    mx.random.seed(6)
    hira = SMoALinear.from_base(nn.Linear(12, 10), rank=4, num_blocks=1)
    names = [n for n, _ in tree_flatten(hira.parameters())]
    assert sorted(names) == ["col_order", "linear.bias", "linear.weight", "row_order",
                             "smoa_a.0", "smoa_b.0"]
    # K = 1 computes in the base weight's coordinates; its block is still the permuted weight.
    randomize_b(hira, 7)
    w = np64(hira.linear.weight)
    np.testing.assert_allclose(np64(hira.block_weights()[0]),
                               2.0 * np64(hira.smoa_b[0] @ hira.smoa_a[0])
                               * w[np.array(hira.row_order)][:, np.array(hira.col_order)], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("forced", ["merged", "blocked"])
def test_compiled_training_step_with_a_custom_vjp(forced, monkeypatch):
    """The custom-VJP paths under mx.compile: compiled and eager grads agree."""
    monkeypatch.setattr(SMoALinear, "_path", lambda self, x: forced)
    _, layer = make_layer(48, 40, 2, 8, seed=12)
    x = mx.random.normal((2, 40, 40))
    g = mx.random.normal((2, 40, 48))
    loss_and_grad = nn.value_and_grad(layer, lambda x: (layer(x) * g).sum() + 0.5 * (layer(x) ** 2).sum())
    (v1, g1), (v2, g2) = mx.compile(loss_and_grad)(x), loss_and_grad(x)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    for (n1, a), (n2, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert n1 == n2
        np.testing.assert_allclose(np64(a), np64(b), rtol=1e-4, atol=1e-5)
