"""SMoALinear's two evaluation paths and its anchor storage, against the float64
references of test_layer.py.

The layer picks the factored path for few input rows (decoding) and the blocked path
with its custom VJP otherwise; both are forced here on the same layers, so each is
checked on equal and unequal blocks, zero-rank branches, K = 1 and quantized bases.
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

PATHS = {"blocked": 0, "factored": 10**9}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.setattr(layer_mod, "FACTORED_MAX_ROWS", PATHS[request.param])
    return request.param


@pytest.mark.parametrize("d_out,d_in,k,rank,bias,branch_ranks", CASES)
def test_forward_matches_numpy_on_both_paths(path, d_out, d_in, k, rank, bias, branch_ranks):
    base, layer = make_layer(d_out, d_in, k, rank, bias, branch_ranks, alpha=6.0)
    w = np64(base.weight)
    want = reference_forward(x := mx.random.normal((2, 3, d_in)), w,
                             reference_delta(layer, w, rank, 6.0, k), base.bias if bias else None)
    np.testing.assert_allclose(np64(layer(x)), want, **F32_TOL)


@pytest.mark.parametrize("d_out,d_in,k,rank,branch_ranks",
                         [(17, 13, 3, 5, None), (12, 20, 2, 6, [6, 0]), (9, 9, 1, 3, None), (16, 24, 4, 8, None)])
def test_grads_match_dense_formula_on_both_paths(path, d_out, d_in, k, rank, branch_ranks):
    base, layer = make_layer(d_out, d_in, k, rank, branch_ranks=branch_ranks, alpha=3.0, seed=11)
    assert_grads_match_dense(layer, np64(base.weight), base.bias, 3.0 / rank, k, d_in, d_out)


@pytest.mark.parametrize("k", [1, 2])
def test_quantized_grads_on_both_paths(path, k):
    mx.random.seed(13)
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 19), 32, 4)
    layer = SMoALinear.from_base(base, rank=6, num_blocks=k, alpha=4.0)
    randomize_b(layer, 14)
    assert_grads_match_dense(layer, numpy_dequantize(base), base.bias, 4.0 / 6, k, 64, 19)


def test_paths_agree_and_are_chosen_by_shape(monkeypatch):
    _, layer = make_layer(40, 30, 3, 6, seed=3)  # largest block rank 2
    small, large = mx.random.normal((4, 30)), mx.random.normal((3, 40, 30))
    calls = []
    for name in ("_factored_update", "_blocked_update"):
        real = getattr(layer_mod, name)
        monkeypatch.setattr(layer_mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    outputs = {}
    for rows in (0, 10**9):
        monkeypatch.setattr(layer_mod, "FACTORED_MAX_ROWS", rows)
        outputs[rows] = [np64(layer(small)), np64(layer(large))]
    np.testing.assert_allclose(outputs[0][0], outputs[10**9][0], **F32_TOL)
    np.testing.assert_allclose(outputs[0][1], outputs[10**9][1], **F32_TOL)
    assert calls == ["_blocked_update"] * 2 + ["_factored_update"] * 2
    calls.clear()
    monkeypatch.setattr(layer_mod, "FACTORED_MAX_ROWS", 8)  # 4 rows x rank 2 fits, 120 x 2 not
    layer(small), layer(large)
    assert calls == ["_factored_update", "_blocked_update"]


def test_eval_mode_stores_anchors_and_gives_the_same_output():
    base, layer = make_layer(21, 14, 3, 6, seed=4)
    x = mx.random.normal((5, 14))
    assert layer.training and layer._anchors is None
    y_train = layer(x)
    model = nn.Sequential(layer)
    model.eval()  # reaches the layer through nn.Module.train(False)
    assert not layer.training and len(layer._anchors) == 3
    rows = np.array_split(np.array(layer.row_order), 3)
    cols = np.array_split(np.array(layer.col_order), 3)
    w = np.array(base.weight)
    for m, r, c in zip(layer._anchors, rows, cols):
        np.testing.assert_array_equal(np.array(m), w[np.ix_(r, c)])
    assert mx.array_equal(layer(x), y_train).item()
    names = [n for n, _ in tree_flatten(layer.parameters())]
    assert not any("anchor" in n for n in names)  # never saved or trained
    model.train()
    assert layer.training and layer._anchors is None


def test_quantized_and_k1_layers_never_store_anchors():
    mx.random.seed(6)
    q = SMoALinear.from_base(nn.QuantizedLinear.from_linear(nn.Linear(64, 20), 32, 4), rank=4, num_blocks=2)
    hira = SMoALinear.from_base(nn.Linear(12, 10), rank=4, num_blocks=1)
    for layer in (q, hira):
        layer.eval()
        assert layer._anchors is None
    # K = 1 computes in the base weight's coordinates; its blocks are still the permuted weight.
    randomize_b(hira, 7)
    w = np64(hira.linear.weight)
    np.testing.assert_allclose(np64(hira.block_weights()[0]),
                               2.0 * np64(hira.smoa_b[0] @ hira.smoa_a[0])
                               * w[np.array(hira.row_order)][:, np.array(hira.col_order)], rtol=1e-5, atol=1e-7)


def test_compiled_training_step_on_the_blocked_path():
    """Large enough input for the blocked path; compiled and eager grads agree."""
    _, layer = make_layer(48, 40, 2, 8, seed=12)
    x = mx.random.normal((2, 40, 40))
    g = mx.random.normal((2, 40, 48))
    loss_and_grad = nn.value_and_grad(layer, lambda x: (layer(x) * g).sum() + 0.5 * (layer(x) ** 2).sum())
    (v1, g1), (v2, g2) = mx.compile(loss_and_grad)(x), loss_and_grad(x)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-5)
    for (n1, a), (n2, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert n1 == n2
        np.testing.assert_allclose(np64(a), np64(b), rtol=1e-4, atol=1e-5)
