"""SMoASwitchLinear against a float64 NumPy reference of SPEC §1 applied per expert."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from smoa_mlx.layer import base_weight
from smoa_mlx.plan import make_plan
from smoa_mlx.switch import SMoASwitchLinear

E, D_IN, D_OUT = 4, 40, 27  # not divisible by K = 3: unequal blocks


def make(rank=5, k=3, quantized=False, bias=False, branch_ranks=None, seed=0):
    mx.random.seed(seed)
    base = SwitchLinear(D_IN if not quantized else 64, D_OUT, E, bias=bias)
    if bias:
        base.bias = mx.random.normal(base.bias.shape)
    if quantized:
        base = base.to_quantized(group_size=32, bits=4)
    layer = SMoASwitchLinear.from_base(base, rank=rank, num_blocks=k, alpha=2.0 * rank,
                                       branch_ranks=branch_ranks)
    layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    return layer


def reference_delta(layer) -> np.ndarray:
    """ΔW_e = scale * (B_full A_full) ⊙ W0_e, factors embedded on expert e's blocks."""
    w0 = np.array(base_weight(layer.linear), np.float64)
    k, rank = layer.num_blocks, layer.rank
    out = np.zeros_like(w0)
    for e in range(w0.shape[0]):
        a_full, b_full = np.zeros((rank, w0.shape[2])), np.zeros((w0.shape[1], rank))
        rows = np.array_split(np.array(layer.row_order[e]), k)
        cols = np.array_split(np.array(layer.col_order[e]), k)
        start = 0
        for r, c, a, b in zip(rows, cols, layer.smoa_a, layer.smoa_b):
            span = slice(start, start + a.shape[1])
            a_full[span, c] = np.array(a[e], np.float64)
            b_full[r, span] = np.array(b[e], np.float64)
            start = span.stop
        out[e] = layer.scale * (b_full @ a_full) * w0[e]
    return out


def reference_output(layer, x, indices) -> np.ndarray:
    """y[..., m, :] = x W'_e^T (+ b_e) for the expert e of each slot (x broadcast over slots)."""
    w = np.array(base_weight(layer.linear), np.float64) + reference_delta(layer)
    idx = np.array(indices)
    xb = np.broadcast_to(np.array(x, np.float64), idx.shape + x.shape[-2:])
    y = np.einsum("...mi,...oi->...mo", xb, w[idx])
    if "bias" in layer.linear:
        y = y + np.array(layer.linear.bias, np.float64)[idx][..., None, :]
    return y


def test_plans_are_per_expert():
    layer = make()
    w0 = np.array(layer.linear.weight)
    for e in range(E):
        plan = make_plan(w0[e], 3)
        assert np.array_equal(np.array(layer.row_order[e]), plan.row_order)
        assert np.array_equal(np.array(layer.col_order[e]), plan.col_order)
    assert not np.array_equal(np.array(layer.row_order[0]), np.array(layer.row_order[1]))
    assert layer.shape == (E, D_OUT, D_IN)
    assert [a.shape for a in layer.smoa_a] == [(E, 2, 14), (E, 2, 13), (E, 1, 13)]
    assert [b.shape for b in layer.smoa_b] == [(E, 9, 2), (E, 9, 2), (E, 9, 1)]


@pytest.mark.parametrize("quantized,bias", [(False, False), (False, True), (True, False)])
def test_forward_matches_reference(quantized, bias):
    layer = make(quantized=quantized, bias=bias)
    d_in = layer.shape[2]
    x = mx.random.normal((2, 3, 1, 1, d_in))  # SwitchGLU's unsorted layout
    idx = mx.array(np.random.default_rng(0).integers(0, E, (2, 3, 2)))
    np.testing.assert_allclose(np.array(layer(x, idx)), reference_output(layer, x, idx), rtol=1e-4, atol=1e-4)
    xs = mx.random.normal((10, 1, d_in))  # the sorted layout
    ids = mx.sort(mx.array(np.random.default_rng(1).integers(0, E, (10,))))
    np.testing.assert_allclose(np.array(layer(xs, ids, sorted_indices=True)),
                               reference_output(layer, xs, ids), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(layer.delta_weight()), reference_delta(layer), rtol=1e-4, atol=1e-5)
    for shape, idx in (((1, 1, 1, 1, d_in), [[[2, 0]]]), ((4, 1, d_in), [3, 0, 0, 1])):  # decoding
        x, idx = mx.random.normal(shape), mx.array(idx)
        assert layer._path(x, idx) == "folded"
        np.testing.assert_allclose(np.array(layer(x, idx)), reference_output(layer, x, idx), rtol=1e-4, atol=1e-4)


def test_dropout_applies_to_the_update_input_only():
    mx.random.seed(5)
    base = SwitchLinear(D_IN, D_OUT, E, bias=False)
    layer = SMoASwitchLinear.from_base(base, rank=4, num_blocks=2, dropout=0.5)
    layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    x = mx.random.normal((12, 1, D_IN))
    idx = mx.array(np.random.default_rng(6).integers(0, E, (12,)))
    layer.eval()
    np.testing.assert_allclose(np.array(layer(x, idx)), reference_output(layer, x, idx), rtol=1e-4, atol=1e-4)
    layer.train()
    assert layer._path(x, idx) == "dropout"
    train_out = np.array(layer(x, idx))
    assert not np.allclose(train_out, reference_output(layer, x, idx), atol=1e-3)
    layer.smoa_b = [mx.zeros_like(b) for b in layer.smoa_b]  # dropout never touches the base
    assert mx.array_equal(layer(x, idx), base(x, idx)).item()


def test_zero_b_is_the_base():
    layer = make()
    layer.smoa_b = [mx.zeros_like(b) for b in layer.smoa_b]
    x = mx.random.normal((6, 1, D_IN))
    idx = mx.array([0, 3, 1, 1, 2, 3])
    assert mx.array_equal(layer(x, idx), layer.linear(x, idx)).item()


@pytest.mark.parametrize("path,x_shape,idx_shape", [
    ("merged", (3, 2, 1, 1, D_IN), (3, 2, 2)), ("folded", (2, 1, 1, D_IN), (2, 2))])
def test_gradients_match_finite_differences(path, x_shape, idx_shape):
    layer = make(rank=3, k=2, branch_ranks=[2, 1])
    x = mx.random.normal(x_shape)
    idx = mx.array(np.random.default_rng(2).integers(0, E, idx_shape))
    assert layer._path(x, idx) == path
    probe = mx.random.normal(reference_output(layer, x, idx).shape)

    def loss(a_list, b_list, x):
        layer.smoa_a, layer.smoa_b = a_list, b_list
        return (layer(x, idx) * probe).sum()

    a0, b0 = list(layer.smoa_a), list(layer.smoa_b)
    ga, gb, gx = mx.grad(loss, argnums=(0, 1, 2))(a0, b0, x)
    probe64 = np.array(probe, np.float64)

    def ref_loss(a_list, b_list, x_np):
        layer.smoa_a, layer.smoa_b = [mx.array(a) for a in a_list], [mx.array(b) for b in b_list]
        w = np.array(base_weight(layer.linear), np.float64) + reference_delta(layer)
        xb = np.broadcast_to(x_np, np.array(idx).shape + x_np.shape[-2:])
        return (np.einsum("...mi,...oi->...mo", xb, w[np.array(idx)]) * probe64).sum()

    a_np = [np.array(a, np.float64) for a in a0]
    b_np = [np.array(b, np.float64) for b in b0]
    x_np = np.array(x, np.float64)
    rng, h = np.random.default_rng(3), 1e-3
    for which, grads, arrays in (("a", ga, a_np), ("b", gb, b_np)):
        for blk in range(2):
            for _ in range(4):
                pos = tuple(rng.integers(0, s) for s in arrays[blk].shape)
                plus, minus = [v.copy() for v in arrays], [v.copy() for v in arrays]
                plus[blk][pos] += h
                minus[blk][pos] -= h
                args_p = (plus, b_np, x_np) if which == "a" else (a_np, plus, x_np)
                args_m = (minus, b_np, x_np) if which == "a" else (a_np, minus, x_np)
                fd = (ref_loss(*args_p) - ref_loss(*args_m)) / (2 * h)
                assert np.array(grads[blk])[pos] == pytest.approx(fd, rel=2e-3, abs=2e-3)
    for _ in range(4):
        pos = tuple(rng.integers(0, s) for s in x_np.shape)
        xp, xm = x_np.copy(), x_np.copy()
        xp[pos] += h
        xm[pos] -= h
        fd = (ref_loss(a_np, b_np, xp) - ref_loss(a_np, b_np, xm)) / (2 * h)
        assert np.array(gx)[pos] == pytest.approx(fd, rel=2e-3, abs=2e-3)


@pytest.mark.parametrize("quantized", [False, True])
def test_fuse_equals_unfused(quantized):
    layer = make(quantized=quantized)
    fused = layer.fuse()
    assert isinstance(fused, QuantizedSwitchLinear if quantized else SwitchLinear)
    x = mx.random.normal((8, 1, layer.shape[2]))
    idx = mx.array([0, 1, 2, 3, 3, 2, 1, 0])
    merged = np.array(base_weight(layer.linear), np.float64) + reference_delta(layer)
    if quantized:  # the merged weight, re-quantized like the base
        q = mx.quantize(mx.array(merged.astype(np.float32)), group_size=32, bits=4)
        want = mx.dequantize(*q, group_size=32, bits=4)
        np.testing.assert_allclose(np.array(base_weight(fused)), np.array(want), rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(np.array(fused(x, idx)), np.array(layer(x, idx)), rtol=1e-4, atol=1e-4)
    plain = layer.fuse(dequantize=True)
    np.testing.assert_allclose(np.array(plain(x, idx)), np.array(layer(x, idx)), rtol=1e-4, atol=1e-4)


def test_nvfp4_experts_with_a_global_scale():
    """mlx-lm's nvfp4 experts may carry one global scale per expert (gather_qmm applies it);
    the anchors, the merged path and fuse must too. Only the merged path runs on a CPU
    (MLX's gather_qmm with a global scale is GPU-only)."""
    mx.random.seed(0)
    float_base = SwitchLinear(64, 32, E, bias=False)
    base = float_base.to_quantized(group_size=16, bits=4, mode="nvfp4", global_scale=True)
    w = np.array(base_weight(base).astype(mx.float32), np.float64)
    true = np.array(float_base.weight, np.float64)
    without = np.array(mx.dequantize(base.weight, base.scales, group_size=16, bits=4, mode="nvfp4")
                       .astype(mx.float32), np.float64)
    rel = [np.linalg.norm(v - true) / np.linalg.norm(true) for v in (w, without)]
    assert rel[0] < 0.15 < 10 < rel[1], rel  # 4-bit rounding only; without the scale, far off
    layer = SMoASwitchLinear.from_base(base, rank=4, num_blocks=2)
    layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
    x = mx.random.normal((12, 1, 1, 64))
    idx = mx.array(np.arange(12 * 2).reshape(12, 2) % E)  # 24 slots > E experts: merged path
    assert layer._path(x, idx) == "merged"
    np.testing.assert_allclose(np.array(layer(x, idx)), reference_output(layer, x, idx), rtol=1e-4, atol=1e-4)
    fused = layer.fuse()
    assert fused.global_scale is not None and fused.mode == "nvfp4"


def test_inside_switch_glu_with_sorting():
    """SwitchGLU sorts 64+ slots by expert (sorted_indices=True): same result as unsorted."""
    glu = SwitchGLU(D_IN, 24, E)
    mx.eval(glu.parameters())
    x = mx.random.normal((1, 40, D_IN))
    idx = mx.array(np.random.default_rng(4).integers(0, E, (1, 40, 2)))
    for name in ("up_proj", "down_proj"):
        layer = SMoASwitchLinear.from_base(getattr(glu, name), rank=4, num_blocks=2)
        layer.smoa_b = [mx.random.normal(b.shape) for b in layer.smoa_b]
        setattr(glu, name, layer)
    sorted_out = glu(x, idx)  # 80 slots: sorted path
    halves = mx.concatenate([glu(x[:, :16], idx[:, :16]), glu(x[:, 16:32], idx[:, 16:32]),
                             glu(x[:, 32:], idx[:, 32:])], axis=1)  # 32/32/16 slots: unsorted
    np.testing.assert_allclose(np.array(sorted_out), np.array(halves), rtol=1e-4, atol=1e-5)


def test_bad_orders_are_refused():
    base = SwitchLinear(8, 6, 2)
    good = (np.tile(np.arange(6), (2, 1)), np.tile(np.arange(8), (2, 1)))
    SMoASwitchLinear.from_base(base, rank=2, num_blocks=2, orders=good)
    with pytest.raises(ValueError, match="row_order must hold 2 permutations of 6"):
        SMoASwitchLinear.from_base(base, rank=2, orders=(np.arange(6), good[1]))
