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
from mlx.utils import tree_flatten, tree_map
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
    _, layer = make_layer(40, 30, 3, 7, seed=3)  # R = 7: 1 + R = 8 rows per input row
    small, large = mx.random.normal((8, 30)), mx.random.normal((3, 40, 30))
    assert (layer._path(small), layer._path(large)) == ("folded", "merged")  # 64 and 960 rows
    assert layer._path(mx.random.normal((9, 30))) == "merged"  # 72 > FOLDED_MAX_ROWS
    monkeypatch.setattr(layer_mod, "FOLDED_MAX_ROWS", 0)
    assert layer._path(small) == "merged"
    assert layer._path(mx.random.normal((1, 1, 30))) == "folded"  # one row always folds
    _, wide = make_layer(40, 30, 2, 64, seed=3)
    assert wide._path(mx.random.normal((1, 30))) == "folded"
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


def test_only_the_factors_are_stored():
    mx.random.seed(6)
    layer = SMoALinear.from_base(nn.Linear(12, 10), rank=4, num_blocks=2)
    layer.eval()
    layer(mx.random.normal((3, 12)))
    names = [n for n, _ in tree_flatten(layer.parameters())]
    assert sorted(names) == ["col_order", "linear.bias", "linear.weight", "row_order",
                             "smoa_a.0", "smoa_a.1", "smoa_b.0", "smoa_b.1"]


def mxfp4_layer(k):
    mx.random.seed(15)
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 19), 32, 4, mode="mxfp4")
    assert "biases" not in base  # the quantization without offsets
    layer = SMoALinear.from_base(base, rank=6, num_blocks=k, alpha=4.0)
    randomize_b(layer, 16)
    w = np64(mx.dequantize(base.weight, base.scales, None, group_size=32, bits=4, mode="mxfp4"))
    return base, layer, w


@pytest.mark.parametrize("k", [1, 3])
def test_mxfp4_base_on_every_path(path, k):
    base, layer, w = mxfp4_layer(k)
    x = mx.random.normal((2, 3, 64))
    want = reference_forward(x, w, reference_delta(layer, w, 6, 4.0, k), base.bias)
    np.testing.assert_allclose(np64(layer(x)), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert_grads_match_dense(layer, w, base.bias, 4.0 / 6, k, 64, 19)


@pytest.mark.parametrize("w_dtype,p_dtype,x_dtype,bias", [
    (mx.float32, mx.bfloat16, mx.float32, True),   # bf16 adapter on a float32 base
    (mx.bfloat16, mx.float32, mx.bfloat16, True),  # float32 adapter on a bf16 base
    (mx.float32, mx.float32, mx.bfloat16, False),  # bf16 input into a float32 base
])
def test_dtypes_follow_the_base_and_the_parameters(path, w_dtype, p_dtype, x_dtype, bias):
    """The output has the base layer's dtype for the same input, and every gradient its
    parameter's (an optimizer would otherwise change the adapter's dtype)."""
    base, layer = make_layer(24, 16, 2, 4, bias=bias, seed=17)
    randomize_b(layer, 18, std=0.1)
    base.set_dtype(w_dtype)
    layer.update(tree_map(lambda p: p.astype(p_dtype), layer.trainable_parameters()))
    x = mx.random.normal((2, 3, 16)).astype(x_dtype)
    y = layer(x)
    assert y.dtype == base(x).dtype
    w = np64(base.weight)
    want = reference_forward(x, w, reference_delta(layer, w, 4, 8.0, 2), base.bias if bias else None)
    np.testing.assert_allclose(np64(y), want, rtol=3e-2, atol=3e-2 * np.abs(want).max())
    grads = nn.value_and_grad(layer, lambda x: layer(x).astype(mx.float32).sum())(x)[1]
    for (_, g), (_, p) in zip(tree_flatten(grads), tree_flatten(layer.trainable_parameters())):
        assert g.dtype == p.dtype
    dx = mx.grad(lambda x: layer(x).astype(mx.float32).sum())(x)
    assert dx.dtype == x.dtype


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
