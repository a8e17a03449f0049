"""SMoALinear against float64 NumPy references written from SPEC §1.

Every reference builds the dense update from the layer's own A_k, B_k and orders:
`ΔW[rows_k, cols_k] = (alpha / rank) * (B_k A_k) ⊙ W0[rows_k, cols_k]`, zero elsewhere,
with `rows_k`, `cols_k` the `np.array_split` chunks of the orders.
"""

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from smoa_mlx.layer import SMoALinear

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def np64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def blocks(layer, k):
    return (
        np.array_split(np.array(layer.row_order, dtype=np.int64), k),
        np.array_split(np.array(layer.col_order, dtype=np.int64), k),
    )


def reference_delta(layer, w0, rank, alpha, k):
    """Dense float64 ΔW from the layer's own A/B (SPEC §1 'Update')."""
    w0 = np.asarray(w0, np.float64)
    delta = np.zeros_like(w0)
    rows, cols = blocks(layer, k)
    for r, c, a, b in zip(rows, cols, layer.smoa_a, layer.smoa_b):
        assert a.shape[1] == len(c) and b.shape[0] == len(r) and a.shape[0] == b.shape[1]
        delta[np.ix_(r, c)] = (alpha / rank) * (np64(b) @ np64(a)) * w0[np.ix_(r, c)]
    return delta


def randomize_b(layer, seed, std=1.0):
    mx.random.seed(seed)
    layer.smoa_b = [std * mx.random.normal(b.shape) for b in layer.smoa_b]
    mx.eval(layer.parameters())


def make_layer(d_out, d_in, k, rank, bias=True, branch_ranks=None, alpha=8.0, seed=0, dropout=0.0):
    mx.random.seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    layer = SMoALinear.from_base(
        base, rank=rank, num_blocks=k, alpha=alpha, branch_ranks=branch_ranks, dropout=dropout
    )
    randomize_b(layer, seed + 1)
    return base, layer


def reference_forward(x, w, delta, bias):
    y = np64(x) @ (w + delta).T
    return y + np64(bias) if bias is not None else y


CASES = [  # (d_out, d_in, K, rank, bias, branch_ranks)
    (16, 16, 1, 4, True, None),
    (16, 16, 2, 8, False, None),
    (17, 13, 3, 5, True, None),
    (13, 17, 3, 7, False, None),
    (23, 10, 4, 6, True, None),
    (17, 13, 3, 6, True, [0, 4, 2]),
    (12, 20, 2, 5, False, [5, 0]),
]


@pytest.mark.parametrize("d_out,d_in,k,rank,bias,branch_ranks", CASES)
def test_forward_and_delta_match_numpy(d_out, d_in, k, rank, bias, branch_ranks):
    base, layer = make_layer(d_out, d_in, k, rank, bias, branch_ranks, alpha=6.0)
    w = np64(base.weight)
    delta = reference_delta(layer, w, rank, 6.0, k)
    rows, cols = blocks(layer, k)
    on_block = np.zeros(delta.shape, bool)
    for r, c in zip(rows, cols):
        on_block[np.ix_(r, c)] = True
    assert np.abs(delta[on_block]).max() > 0.0
    default_ranks = [len(c) for c in np.array_split(np.arange(rank), k)]
    assert [a.shape[0] for a in layer.smoa_a] == (branch_ranks or default_ranks)

    got_delta = np64(layer.delta_weight())
    assert got_delta.shape == (d_out, d_in)
    assert np.all(got_delta[~on_block] == 0.0)
    np.testing.assert_allclose(got_delta, delta, rtol=1e-5, atol=1e-6 * np.abs(delta).max())

    x = mx.random.normal((2, 3, d_in))
    want = reference_forward(x, w, delta, base.bias if bias else None)
    np.testing.assert_allclose(np64(layer(x)), want, **F32_TOL)
    fused = layer.fuse()
    assert type(fused) is nn.Linear and ("bias" in fused) == bias
    np.testing.assert_allclose(np64(fused(x)), np64(layer(x)), **F32_TOL)


def test_zero_b_gives_the_base_output():
    """Bitwise for a float base on the training path (the same matmul with W0 + 0).
    Decoding's one matmul with 1 + R rows, and a quantized base's training path (the
    de-quantized weight), may use other kernels than the base and round differently."""
    mx.random.seed(4)
    for base in (nn.Linear(13, 17), nn.QuantizedLinear.from_linear(nn.Linear(64, 20), 32, 4)):
        layer = SMoALinear.from_base(base, rank=6, num_blocks=3)
        assert all(not mx.any(b).item() for b in layer.smoa_b)
        assert not mx.any(layer.delta_weight()).item()
        x = mx.random.normal((2, 5, layer.shape[1]))
        if isinstance(base, nn.Linear):
            assert layer._path(x) == "merged" and mx.array_equal(layer(x), base(x)).item()
        for x in (x, mx.random.normal((1, layer.shape[1]))):
            np.testing.assert_allclose(np64(layer(x)), np64(base(x)), rtol=1e-6, atol=1e-6)


def test_k1_is_hira():
    """K = 1: ΔW = scale * (B' A') ⊙ W0 with B rows / A columns put back in original order."""
    base, layer = make_layer(14, 11, 1, 4, alpha=5.0)
    row_order, col_order = np.array(layer.row_order), np.array(layer.col_order)
    a, b = np64(layer.smoa_a[0]), np64(layer.smoa_b[0])
    a_orig, b_orig = np.empty_like(a), np.empty_like(b)
    a_orig[:, col_order] = a
    b_orig[row_order] = b
    w = np64(base.weight)
    hira = (5.0 / 4) * (b_orig @ a_orig) * w
    np.testing.assert_allclose(np64(layer.delta_weight()), hira, rtol=1e-5, atol=1e-7)
    x = mx.random.normal((3, 11))
    np.testing.assert_allclose(np64(layer(x)), reference_forward(x, w, hira, base.bias), **F32_TOL)


def numpy_dequantize(q: nn.QuantizedLinear) -> np.ndarray:
    """Affine de-quantization in float64 from the packed uint32 words."""
    words = np.array(q.weight).astype(np.uint64)
    per_word, mask = 32 // q.bits, (1 << q.bits) - 1
    fields = [(words >> (q.bits * i)) & mask for i in range(per_word)]
    values = np.stack(fields, axis=-1).reshape(words.shape[0], -1).astype(np.float64)
    return values * group_expand(q.scales, q) + group_expand(q.biases, q)


def group_expand(per_group, q):
    return np.repeat(np.array(per_group, np.float64), q.group_size, axis=1)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_quantized_base(bits, group_size):
    mx.random.seed(5)
    base = nn.QuantizedLinear.from_linear(nn.Linear(128, 21), group_size, bits)
    k, rank = 2, 8
    layer = SMoALinear.from_base(base, rank=rank, num_blocks=k, alpha=8.0)
    randomize_b(layer, 6, std=4.0)  # ΔW of the size of W0: far above the quantization step
    w = numpy_dequantize(base)

    # Anchors are the de-quantized weight: the update equals the reference built on it.
    delta = reference_delta(layer, w, rank, 8.0, k)
    np.testing.assert_allclose(np64(layer.delta_weight()), delta, rtol=1e-5, atol=1e-6 * np.abs(delta).max())
    x = mx.random.normal((2, 3, 128))
    y = np64(layer(x))
    np.testing.assert_allclose(y, reference_forward(x, w, delta, base.bias), **F32_TOL)

    # Merged without re-quantizing: exactly W_deq + ΔW.
    plain = layer.fuse(dequantize=True)
    assert type(plain) is nn.Linear
    np.testing.assert_allclose(np64(plain.weight), w + delta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np64(plain(x)), y, **F32_TOL)

    # Re-quantized like the base: every weight within one quantization step of the target
    # (MLX's affine rounding makes one edge of a group exact, the other is off by < 1 step).
    fused = layer.fuse()
    assert isinstance(fused, nn.QuantizedLinear)
    assert (fused.bits, fused.group_size) == (bits, group_size)
    step = np.abs(group_expand(fused.scales, fused)) * (1 + 1e-3) + 1e-7
    assert np.all(np.abs(numpy_dequantize(fused) - (w + delta)) <= step)
    assert not np.all(np.abs(w - (w + delta)) <= step)  # the bound can fail
    bound = np.abs(np64(x)) @ step.T
    assert np.all(np.abs(np64(fused(x)) - y) <= bound + 1e-5)


def test_init_and_trainable_parameters():
    mx.random.seed(7)
    base = nn.Linear(64, 90, bias=True)
    layer = SMoALinear.from_base(base, rank=7, num_blocks=3)
    in_sizes = [len(c) for c in np.array_split(np.arange(64), 3)]
    out_sizes = [len(c) for c in np.array_split(np.arange(90), 3)]
    ranks = [3, 2, 2]
    for a, b, i, o, r in zip(layer.smoa_a, layer.smoa_b, in_sizes, out_sizes, ranks):
        bound = 1 / math.sqrt(i)
        a = np.array(a)
        assert a.shape == (r, i) and b.shape == (o, r)
        assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.8 * bound
        assert len(np.unique(a)) == a.size  # random, not constant
        assert not mx.any(b).item()
    names = [n for n, _ in tree_flatten(layer.trainable_parameters())]
    assert sorted(names) == sorted([f"smoa_a.{i}" for i in range(3)] + [f"smoa_b.{i}" for i in range(3)])
    count = sum(v.size for _, v in tree_flatten(layer.trainable_parameters()))
    assert count == sum(r * (i + o) for r, i, o in zip(ranks, in_sizes, out_sizes))
    all_names = [n for n, _ in tree_flatten(layer.parameters())]
    assert {"linear.weight", "linear.bias", "row_order", "col_order"} <= set(all_names)


def test_dropout_only_in_training():
    base, layer = make_layer(24, 12, 2, 12, bias=True, dropout=0.5, seed=8)
    x = mx.random.normal((4, 12))
    w = np64(base.weight)
    delta = reference_delta(layer, w, 12, 8.0, 2)
    want = reference_forward(x, w, delta, base.bias)
    layer.train()
    y1, y2 = np64(layer(x)), np64(layer(x))
    assert not np.allclose(y1, y2) and not np.allclose(y1, want)
    # Dropout hits the input of the update once: solve x_d ΔW^T = y - base(x) for x_d;
    # every entry is either dropped (0) or kept and rescaled by 1 / (1 - p).
    x_d = np.linalg.lstsq(delta, (y1 - np64(base(x))).T, rcond=None)[0].T
    xs = np64(x)
    kept = np.isclose(x_d, 2 * xs, atol=1e-3)
    assert np.all(kept | np.isclose(x_d, 0.0, atol=1e-3)) and kept.any() and (~kept).any()
    model = nn.Sequential(layer)
    model.eval()
    assert not layer.training
    np.testing.assert_allclose(np64(model(x)), want, **F32_TOL)
    layer.train()
    layer.eval()
    np.testing.assert_allclose(np64(layer(x)), want, **F32_TOL)


def test_dropout_does_not_touch_the_base_output():
    mx.random.seed(9)
    base = nn.Linear(12, 10)
    layer = SMoALinear.from_base(base, rank=4, num_blocks=2, dropout=0.9)
    layer.train()
    x = mx.random.normal((3, 12))
    assert mx.array_equal(layer(x), base(x)).item()


# --- gradients --------------------------------------------------------------------------

GRAD_CASES = [(17, 13, 3, 5, None), (12, 20, 2, 6, [6, 0]), (9, 9, 1, 3, None)]


def loss_of_output(y, g):
    """Quadratic in y, so quadratic in each of A and B: central differences are exact."""
    return (g * y).sum() + 0.5 * (y * y).sum()


def layer_grads(layer, x, g):
    loss_and_grad = nn.value_and_grad(layer, lambda x: loss_of_output(layer(x), g))
    _, grads = loss_and_grad(x)
    return grads


@pytest.mark.parametrize("d_out,d_in,k,rank,branch_ranks", GRAD_CASES)
def test_grads_match_central_differences(d_out, d_in, k, rank, branch_ranks):
    _, layer = make_layer(d_out, d_in, k, rank, branch_ranks=branch_ranks, seed=10)
    x = mx.random.normal((2, 3, d_in))
    g = mx.random.normal((2, 3, d_out))
    grads = layer_grads(layer, x, g)
    names = [n for n, _ in tree_flatten(grads)]
    assert sorted(names) == sorted(n for n, _ in tree_flatten(layer.trainable_parameters()))
    eps = 0.05
    for name in ("smoa_a", "smoa_b"):
        params = getattr(layer, name)
        for i, p in enumerate(params):
            if p.size == 0:
                assert grads[name][i].shape == p.shape
                continue
            base = np.array(p)
            fd = np.zeros(base.shape, np.float64)
            for idx in np.ndindex(base.shape):
                vals = []
                for sign in (1, -1):
                    q = base.copy()
                    q[idx] += sign * eps
                    params[i] = mx.array(q)
                    vals.append(loss_of_output(layer(x), g).item())
                fd[idx] = (vals[0] - vals[1]) / (2 * eps)
            params[i] = mx.array(base)
            got = np64(grads[name][i])
            assert np.abs(got).max() > 1e-2
            np.testing.assert_allclose(
                got, fd, rtol=2e-3, atol=2e-3 * np.abs(fd).max(), err_msg=f"{name}[{i}]"
            )


def dense_grads(layer, w, bias, x, g, scale, k):
    """mx.grad of the dense float64 formula y = x (W0 + scatter(scale (B_k A_k) ⊙ M_k))^T + b,
    w.r.t. (A_k list, B_k list, x), on the CPU stream (float64 is CPU-only on Apple silicon)."""
    rows, cols = blocks(layer, k)
    d_out, d_in = w.shape
    with mx.stream(mx.cpu):
        f64 = partial(mx.array, dtype=mx.float64)
        # Scatter by one-hot embeddings: E_r (d_out, out_k) @ block @ E_c^T (in_k, d_in).
        emb_r = [f64(np.eye(d_out)[:, r]) for r in rows]
        emb_c = [f64(np.eye(d_in)[:, c]) for c in cols]
        anchors = [f64(w[np.ix_(r, c)]) for r, c in zip(rows, cols)]
        g64, w64 = f64(np64(g)), f64(w)
        b64 = f64(np64(bias)) if bias is not None else 0.0

        def dense_loss(a_list, b_list, x):
            delta = sum(
                er @ (scale * (b @ a) * m) @ ec.T
                for er, ec, m, a, b in zip(emb_r, emb_c, anchors, a_list, b_list)
            )
            return loss_of_output(x @ (w64 + delta).T + b64, g64)

        args = ([f64(np64(a)) for a in layer.smoa_a], [f64(np64(b)) for b in layer.smoa_b], f64(np64(x)))
        grads = mx.grad(dense_loss, argnums=(0, 1, 2))(*args)
        mx.eval(grads)
    return grads


def assert_grads_match_dense(layer, w, bias, scale, k, d_in, d_out):
    x = mx.random.normal((2, 3, d_in))
    g = mx.random.normal((2, 3, d_out))

    def loss(params, x):
        layer.update(params)
        return loss_of_output(layer(x), g)

    got_params, got_x = mx.grad(loss, argnums=(0, 1))(layer.trainable_parameters(), x)
    want_a, want_b, want_x = dense_grads(layer, w, bias, x, g, scale, k)
    pairs = list(zip(got_params["smoa_a"] + got_params["smoa_b"], want_a + want_b)) + [(got_x, want_x)]
    for got, ref in pairs:
        ref = np.array(ref)
        assert got.shape == ref.shape
        if ref.size:
            assert np.abs(ref).max() > 1e-3
            np.testing.assert_allclose(np64(got), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("d_out,d_in,k,rank,branch_ranks", GRAD_CASES)
def test_grads_match_dense_float64_formula(d_out, d_in, k, rank, branch_ranks):
    base, layer = make_layer(d_out, d_in, k, rank, branch_ranks=branch_ranks, alpha=3.0, seed=11)
    assert_grads_match_dense(layer, np64(base.weight), base.bias, 3.0 / rank, k, d_in, d_out)


@pytest.mark.parametrize("bits", [4, 8])
def test_grads_with_quantized_base_match_dense_formula(bits):
    """QLoRA-style: the anchors and the frozen path are the de-quantized weight."""
    mx.random.seed(13)
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 19), 32, bits)
    layer = SMoALinear.from_base(base, rank=6, num_blocks=2, alpha=4.0)
    randomize_b(layer, 14)
    assert_grads_match_dense(layer, numpy_dequantize(base), base.bias, 4.0 / 6, 2, 64, 19)


def test_compiled_forward_and_grad_match():
    _, layer = make_layer(17, 13, 3, 5, seed=12)
    x = mx.random.normal((4, 13))
    g = mx.random.normal((4, 17))
    np.testing.assert_allclose(np64(mx.compile(layer)(x)), np64(layer(x)), rtol=1e-6, atol=1e-6)
    loss_and_grad = nn.value_and_grad(layer, lambda x: loss_of_output(layer(x), g))
    (v1, g1), (v2, g2) = mx.compile(loss_and_grad)(x), loss_and_grad(x)
    assert v1.item() == pytest.approx(v2.item(), rel=1e-6)
    for (n1, a), (n2, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert n1 == n2
        np.testing.assert_allclose(np64(a), np64(b), rtol=1e-5, atol=1e-6)
