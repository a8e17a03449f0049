"""rank_report against an independent float64 NumPy rebuild of each ΔW from the adapter's
own tensors (not through delta_weight), and the rank caps: LoRA <= r, SMoA > r."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from smoa_mlx.layer import SMoALinear
from smoa_mlx.rank import delta_weight, effective_rank, format_rank_report, rank_report


class Block(nn.Module):
    def __init__(self, q, v):
        super().__init__()
        self.q_proj, self.v_proj = q, v


class Toy(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layers = blocks


def _linear(d_out, d_in, seed):
    layer = nn.Linear(d_in, d_out, bias=False)
    layer.weight = mx.array(np.random.default_rng(seed).normal(0, 0.1, (d_out, d_in)).astype(np.float32))
    return layer


def _smoa(d_out, d_in, seed, rank=8, num_blocks=2):
    layer = SMoALinear.from_base(_linear(d_out, d_in, seed), rank=rank, num_blocks=num_blocks)
    rng = np.random.default_rng(seed + 100)
    layer.smoa_b = [mx.array(rng.normal(0, 1, b.shape).astype(np.float32)) for b in layer.smoa_b]
    return layer


def _lora(d_out, d_in, seed, r):
    layer = LoRALinear.from_base(_linear(d_out, d_in, seed), r=r, scale=2.0)
    layer.lora_b = mx.array(np.random.default_rng(seed + 100).normal(0, 1, (r, d_out)).astype(np.float32))
    return layer


def _dora(d_out, d_in, seed, r):
    layer = DoRALinear.from_base(_linear(d_out, d_in, seed), r=r, scale=2.0)
    rng = np.random.default_rng(seed + 100)
    layer.lora_b = mx.array(rng.normal(0, 0.1, (r, d_out)).astype(np.float32))
    layer.m = layer.m * mx.array(rng.uniform(0.5, 1.5, d_out).astype(np.float32))
    return layer


def numpy_smoa_delta(layer: SMoALinear) -> np.ndarray:
    """SPEC §1: ΔW[rows_k, cols_k] = scale * (B_k A_k) ⊙ W0[rows_k, cols_k], zero elsewhere."""
    w0 = np.array(layer.linear.weight, dtype=np.float64)
    rows = np.array_split(np.array(layer.row_order), layer.num_blocks)
    cols = np.array_split(np.array(layer.col_order), layer.num_blocks)
    delta = np.zeros_like(w0)
    for r, c, a, b in zip(rows, cols, layer.smoa_a, layer.smoa_b):
        ba = np.array(b, dtype=np.float64) @ np.array(a, dtype=np.float64)
        delta[np.ix_(r, c)] = layer.scale * ba * w0[np.ix_(r, c)]
    return delta


def numpy_lora_delta(layer: LoRALinear) -> np.ndarray:
    a, b = (np.array(t, dtype=np.float64) for t in (layer.lora_a, layer.lora_b))
    return layer.scale * (a @ b).T  # y = x W^T + scale * x A B


def numpy_ranks(delta: np.ndarray) -> tuple[int, float]:
    s = np.linalg.svd(delta, compute_uv=False)
    p = s / s.sum()
    return int(np.sum(s > 0.01 * s.max())), math.exp(-sum(x * math.log(x) for x in p if x > 0))


@pytest.mark.parametrize("make", [lambda: _smoa(48, 40, 0, 8, 3), lambda: _lora(48, 40, 1, 4),
                                  lambda: _dora(48, 40, 2, 4)])
def test_delta_weight_matches_the_forward_pass(make):
    layer = make()
    x = mx.array(np.random.default_rng(7).normal(0, 1, (5, 40)).astype(np.float32))
    delta = np.array(delta_weight(layer))
    diff = np.array(layer(x) - layer.linear(x))
    np.testing.assert_allclose(diff, np.array(x) @ delta.T, rtol=1e-4, atol=1e-5)


def test_report_matches_numpy_and_smoa_is_high_rank():
    smoa = [_smoa(64, 64, seed) for seed in (0, 1)]
    model = Toy([Block(smoa[0], _lora(64, 64, 2, 8)), Block(smoa[1], _lora(64, 64, 3, 8))])
    report = rank_report(model)
    mods = report["modules"]
    assert sorted(mods) == [f"layers.{i}.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]
    for i, layer in enumerate(smoa):
        ref = numpy_smoa_delta(layer)
        np.testing.assert_allclose(np.array(layer.delta_weight()), ref, rtol=1e-4, atol=1e-7)
        rank, entropy = numpy_ranks(ref)
        got = mods[f"layers.{i}.q_proj"]
        assert got["rank_1pct"] == rank
        assert got["entropy_rank"] == pytest.approx(entropy, rel=1e-4)
        assert rank > 8  # the high-rank property: LoRA at r=8 is capped at 8
        assert got["entropy_rank"] > 8
    for i in (0, 1):
        lora = model.layers[i].v_proj
        rank, entropy = numpy_ranks(numpy_lora_delta(lora))
        got = mods[f"layers.{i}.v_proj"]
        assert got["rank_1pct"] == rank <= 8
        assert got["entropy_rank"] == pytest.approx(entropy, rel=1e-4)
        assert got["entropy_rank"] <= 8 + 1e-6

    q = [mods[f"layers.{i}.q_proj"]["rank_1pct"] for i in (0, 1)]
    summary = report["summary"]["q_proj"]
    assert summary["count"] == 2 and summary["shape"] == "64x64" and summary["max_rank"] == 64
    assert summary["rank_1pct"] == {"mean": sum(q) / 2, "min": min(q), "max": max(q)}
    assert report["summary"]["all"]["count"] == 4


@pytest.mark.parametrize("r", [1, 4, 8])
def test_lora_rank_is_capped_by_r(r):
    layer = _lora(64, 48, r, r)
    rank, entropy = effective_rank(np.array(delta_weight(layer)))
    assert rank == r  # random factors: exactly r directions, all well above 1%
    assert 1 <= entropy <= r + 1e-4  # float32 round-off adds a trace


@pytest.mark.parametrize("shape", [(40, 96), (96, 40), (64, 64)])
def test_effective_rank_matches_the_svd_near_the_cut(shape):
    """The Gram-matrix eigenvalues give the SVD's ranks, tall or wide, with singular
    values just above and just below 1% of the largest."""
    rng = np.random.default_rng(sum(shape))
    k = min(shape)
    u = np.linalg.qr(rng.normal(size=(shape[0], k)))[0]
    v = np.linalg.qr(rng.normal(size=(shape[1], k)))[0]
    s = np.logspace(0, -5, k)
    s[[5, 6, 7]] = 0.0102, 0.0098, 0.01005  # 2 of these 3 count
    delta = (u * s) @ v.T
    rank, entropy = effective_rank(delta)
    want_rank, want_entropy = numpy_ranks(delta)
    assert rank == want_rank == int(np.sum(s > 0.01))
    assert entropy == pytest.approx(want_entropy, rel=1e-9)


def test_untrained_adapters_have_rank_zero():
    model = Toy([Block(SMoALinear.from_base(_linear(32, 32, 0)), LoRALinear.from_base(_linear(32, 32, 1)))])
    report = rank_report(model)
    for info in report["modules"].values():
        assert info["rank_1pct"] == 0 and info["entropy_rank"] == 0.0


def test_format_is_one_row_per_module_type():
    model = Toy([Block(_smoa(64, 64, s), _smoa(32, 64, s + 5, 8, 4)) for s in (0, 1)])
    report = rank_report(model)
    text = format_rank_report(report)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[3:]] == ["q_proj", "v_proj", "all"]
    q = report["summary"]["q_proj"]["entropy_rank"]
    assert f"{q['mean']:.1f} / {q['min']:.1f} / {q['max']:.1f}" in lines[3]
    assert "mixed" in lines[5]  # 64x64 and 32x64 modules together


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no SMoA, LoRA or DoRA layers"):
        rank_report(Toy([Block(_linear(8, 8, 0), _linear(8, 8, 1))]))


def test_moe_experts_are_measured_per_expert():
    """Each expert's ranks against its ΔW taken from the fused layer (fused - base weight)."""
    from test_archs import randomize_b, tiny

    from smoa_mlx.fuse import fuse_layers
    from smoa_mlx.patch import apply_smoa

    model = tiny("qwen3_moe")
    path = "model.layers.0.mlp.switch_mlp.up_proj"
    base = np.array(dict(model.named_modules())[path].weight, np.float64)
    apply_smoa(model, rank=4, num_blocks=2, progress=False)
    randomize_b(model)
    info = rank_report(model)["modules"][path]
    fuse_layers(model)
    deltas = np.array(dict(model.named_modules())[path].weight, np.float64) - base
    assert info["shape"] == list(deltas.shape[1:]) and len(info["experts"]) == deltas.shape[0] == 4
    for got, delta in zip(info["experts"], deltas):
        s = np.linalg.svd(delta, compute_uv=False)
        p = s / s.sum()
        assert got["rank_1pct"] == int((s > 0.01 * s[0]).sum()) > 4  # above the rank budget
        assert math.isclose(got["entropy_rank"], math.exp(-(p * np.log(p)).sum()), rel_tol=1e-3)
    assert info["rank_1pct"] == np.mean([e["rank_1pct"] for e in info["experts"]])
