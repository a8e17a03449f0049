"""scripts/quality (the study behind docs/RESULTS.md): its statistics and the rendered report,
on synthetic run records."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from quality import protocol, report, stats  # noqa: E402
from quality.datasets import Dataset  # noqa: E402


def _run(method, lr, seed, val, test, iters=200):
    return {"dataset": "wikisql", "method": method, "iters": iters, "lr": lr, "seed": seed,
            "diverged": False, "val_loss": val, "test_loss": test, "accuracy": None,
            "trainable": 100, "seconds_per_step": 0.1, "rank_1pct": 8.0, "entropy_rank": 6.0,
            "rank_by_type": {"all": {"rank_1pct": 8, "entropy_rank": 6, "cap": 64},
                             "self_attn.q_proj": {"rank_1pct": 8, "entropy_rank": 6, "cap": 64}},
            "curve": [[0, 5.0], [100, val + 0.1], [200, val]]}


@pytest.fixture
def results():
    smoa, lora = "SMoA r=8 K=2", "LoRA r=8"
    d_smoa, d_lora = protocol.DEFAULT_RATE[smoa], protocol.DEFAULT_RATE[lora]
    assert d_smoa == 3e-2 and d_lora == 2e-4
    runs = [_run(smoa, 1e-2, 0, 2.5, 2.6), _run(smoa, 1e-1, 0, 2.9, 3.0)]
    runs += [_run(smoa, 3e-2, s, 2.0, t) for s, t in enumerate((2.00, 2.02, 2.04))]  # best = default
    runs += [_run(lora, 3e-2, s, 1.9, t) for s, t in enumerate((2.10, 2.12, 2.14))]
    runs += [_run(lora, 1e-2, 0, 2.2, 2.3), _run(lora, 1e-1, 0, 4.0, 4.1), _run(lora, d_lora, 0, 4.5, 4.6)]
    return {"runs": runs, "best": {(200, "wikisql", smoa): 3e-2, (200, "wikisql", lora): 3e-2},
            "baseline": {"wikisql": {"test_loss": 5.9, "accuracy": None}}}


def test_comparisons_use_the_seed_spread(results):
    c = stats.compare(results, 200, "wikisql", "SMoA r=8 K=2", "LoRA r=8")
    assert c["gap"] == pytest.approx(2.02 - 2.12) and c["stds"] == pytest.approx(0.1 / 0.02)
    assert stats.clear(c) and "lower (better)" in stats.verdict(c)
    assert stats.default_cost(results, 200, "wikisql", "SMoA r=8 K=2") == pytest.approx(0.0)
    # LoRA's default (one seed, 4.6) against its best (mean 2.12).
    assert stats.default_cost(results, 200, "wikisql", "LoRA r=8") == pytest.approx(100 * (4.6 / 2.12 - 1))
    assert protocol.extension([1e-2, 3e-2, 1e-1], 1e-1) == 3e-1
    assert protocol.extension([1e-2, 3e-2, 1e-1], 3e-2) is None


def test_the_report_renders_every_section(results, tiny_model_dir, tmp_path):
    ds = Dataset("wikisql", tmp_path, False, "test data", {"train": 3, "valid": 1, "test": 1})
    meta = {"quick": False, "iters": [200], "seeds": [0, 1, 2], "datasets": ["wikisql"],
            "methods": ["LoRA r=8", "SMoA r=8 K=2"], "wall_seconds": 60, "jobs": 1,
            "model_name": "tiny", "command": "python scripts/reproduce_quality.py",
            "machine": {k: "x" for k in ("cpu", "platform", "python", "mlx", "device", "mlx-lm",
                                          "numpy", "blas")}}
    out = tmp_path / "RESULTS.md"
    report.write_report(out, results, [ds], meta, tiny_model_dir)
    text = out.read_text()
    assert "$" not in text.replace("$(", "")  # every placeholder filled
    assert "| wikisql | SMoA r=8 K=2 | 100 | 3e-2 → 2.020 ± 0.020 | 1e-2/3e-2/1e-1 → **3e-2** |" in text
    assert "| +0.0% |" in text and "| +117.0% |" in text
    assert "clearly lower held-out loss on 1 of 1" in text and "the 2% target is met" in text
    assert "self_attn.q_proj" in text and "step scale 1/rms" in text
    # The embedded record is what --quick compares against.
    quick = {"runs": [r for r in results["runs"] if r["lr"] == 3e-2 and r["seed"] == 0]}
    assert report.check_against(out, quick)
    unrecorded = {**quick["runs"][0], "method": "HiRA r=8"}  # a method the record left out
    assert report.check_against(out, {"runs": quick["runs"] + [unrecorded]})
    assert not report.check_against(out, {"runs": [unrecorded]})  # nothing compared: no verdict
    quick["runs"][0] = {**quick["runs"][0], "val_loss": 9.0}
    assert not report.check_against(out, quick)
