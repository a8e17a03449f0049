"""The on-disk score cache: same plans as `make_plan`, hits skip the eigen-decomposition,
keys follow the exact weight, bad files are recomputed, and it can be moved or disabled."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import smoa_mlx.plan_cache as plan_cache
from smoa_mlx.layer import SMoALinear
from smoa_mlx.plan import make_plan, spectral_scores
from smoa_mlx.plan_cache import cache_dir, cached_plan, weight_key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOA_MLX_CACHE", str(tmp_path / "c"))
    return tmp_path / "c"


def no_scoring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("scored although the cache holds this weight")

    monkeypatch.setattr(plan_cache, "spectral_scores", fail)


def assert_same_plan(got, want):
    np.testing.assert_array_equal(got.row_order, want.row_order)
    np.testing.assert_array_equal(got.col_order, want.col_order)
    assert got.num_blocks == want.num_blocks
    assert got.boundary_gap == want.boundary_gap and got.order_gap == want.order_gap


def test_hits_give_make_plans_result_for_every_k(cache, monkeypatch):
    w = np.random.default_rng(0).standard_normal((23, 17)).astype(np.float32)
    assert_same_plan(cached_plan(w, 2), make_plan(w, 2))
    files = list((cache / "plans").iterdir())
    assert [f.name for f in files] == [f"{weight_key(w)}.safetensors"]
    no_scoring(monkeypatch)
    for k in (1, 2, 3, 4):  # scores do not depend on K: one file serves them all
        assert_same_plan(cached_plan(w, k), make_plan(w, k))
    assert len(list((cache / "plans").iterdir())) == 1


def test_key_follows_the_exact_weight(cache):
    w = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    v = w.copy()
    v[3, 2] = np.nextafter(v[3, 2], np.float32(np.inf))  # one ulp
    assert weight_key(v) != weight_key(w)
    assert weight_key(w.reshape(6, 8)) != weight_key(w)  # same bytes, other shape
    assert weight_key(w.astype(np.float64)) == weight_key(w)  # keyed on the float32 weight
    cached_plan(w, 2)
    cached_plan(v, 2)
    assert len(list((cache / "plans").iterdir())) == 2


def test_corrupt_or_mismatched_file_is_recomputed(cache):
    w = np.random.default_rng(2).standard_normal((9, 7)).astype(np.float32)
    want = make_plan(w, 3)
    cached_plan(w, 3)
    path = cache / "plans" / f"{weight_key(w)}.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert_same_plan(cached_plan(w, 3), want)
    assert path.read_bytes() != b"not a safetensors file"  # rewritten
    mx.save_safetensors(str(path), {"row_score": mx.zeros(4, dtype=mx.uint32)})  # wrong content
    assert_same_plan(cached_plan(w, 3), want)


def test_disabled_and_moved(tmp_path, monkeypatch):
    w = np.random.default_rng(3).standard_normal((6, 6)).astype(np.float32)
    for off in ("0", "off", "False"):
        monkeypatch.setenv("SMOA_MLX_CACHE", off)
        assert cache_dir() is None
        assert_same_plan(cached_plan(w, 2), make_plan(w, 2))
    monkeypatch.delenv("SMOA_MLX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "smoa_mlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "smoa_mlx"
    cached_plan(w, 2)
    assert (tmp_path / "home" / ".cache" / "smoa_mlx" / "plans" / f"{weight_key(w)}.safetensors").is_file()


def test_unwritable_cache_warns_once_and_still_plans(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache directory should be
    monkeypatch.setenv("SMOA_MLX_CACHE", str(blocker))
    w = np.random.default_rng(4).standard_normal((7, 5)).astype(np.float32)
    assert_same_plan(cached_plan(w, 2), make_plan(w, 2))
    assert_same_plan(cached_plan(w, 3), make_plan(w, 3))
    assert capsys.readouterr().err.count("cannot write the SMoA plan cache") == 1


def test_from_base_plans_through_the_cache(cache, monkeypatch):
    mx.random.seed(5)
    base = nn.Linear(20, 12)
    first = SMoALinear.from_base(base, rank=4, num_blocks=2)
    no_scoring(monkeypatch)
    again = SMoALinear.from_base(base, rank=4, num_blocks=3)
    want = make_plan(np.array(base.weight), 3)
    np.testing.assert_array_equal(np.array(again.row_order), want.row_order)
    np.testing.assert_array_equal(np.array(again.col_order), want.col_order)
    np.testing.assert_array_equal(np.array(first.row_order), want.row_order)  # orders do not depend on K
    with pytest.raises(ValueError, match="num_blocks"):
        SMoALinear.from_base(base, rank=4, num_blocks=13)


def test_from_base_without_the_cache_touches_no_file(cache):
    """The cache is the caller's choice: `planner=make_plan` plans the same, writing nothing."""
    base = nn.Linear(20, 12)
    layer = SMoALinear.from_base(base, rank=4, num_blocks=2, planner=make_plan)
    assert not cache.exists()
    cached = SMoALinear.from_base(base, rank=4, num_blocks=2)
    assert len(list((cache / "plans").iterdir())) == 1
    np.testing.assert_array_equal(np.array(layer.row_order), np.array(cached.row_order))
    np.testing.assert_array_equal(np.array(layer.col_order), np.array(cached.col_order))


def test_mlx_and_numpy_scoring_give_the_same_plan(monkeypatch):
    """Scores run in MLX on a fast BLAS, else in NumPy: both must decide the same blocks."""
    import smoa_mlx.plan as plan

    rng = np.random.default_rng(6)
    for shape in ((40, 40), (64, 24), (24, 64)):
        w = rng.standard_normal(shape).astype(np.float32)
        by_mlx, by_numpy = spectral_scores(w, use_mlx=True), spectral_scores(w, use_mlx=False)
        for a, b in zip(by_mlx, by_numpy):
            assert a.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        plans = []
        for fast in (True, False):
            monkeypatch.setattr(plan, "_mlx_is_fast", lambda fast=fast: fast)
            plans.append(make_plan(w, 3))
        a, b = plans
        np.testing.assert_array_equal(a.row_order, b.row_order)
        np.testing.assert_array_equal(a.col_order, b.col_order)
        assert a.boundary_gap == pytest.approx(b.boundary_gap, rel=1e-9)
