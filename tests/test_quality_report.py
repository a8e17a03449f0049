"""scripts/quality (the study behind docs/RESULTS.md): its statistics and the rendered report,
on synthetic run records."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from quality import protocol, report, report_smollm2, runs, smollm2, stats  # noqa: E402
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


def _smollm2_run(method, lr, seed, val, test, acc=0.5, iters=40, dataset="commonsense"):
    tasks = smollm2.TRAIN_TASKS + smollm2.TRANSFER_TASKS
    return {**_run(method, lr, seed, val, test, iters), "dataset": dataset,
            "accuracy": {t: acc for t in tasks} if dataset == "commonsense" else None}


def test_the_smollm2_record_resumes_and_renders_a_partial_section(tiny_model_dir, tmp_path):
    """Runs go to the record file and come back by key (paths aside, last line wins); the
    SmolLM2 section renders what finished, says PARTIAL, and leaves the rest of the file
    (and a stories260K re-render keeps the section)."""
    data = tmp_path / "data" / "commonsense"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"text": "a"}\n')
    ds = Dataset("commonsense", data, True, "test data", {"train": 1})
    record = runs.Record(tmp_path / "records" / "r.jsonl")
    args = runs.run_args(tiny_model_dir, ds, "LoRA r=8", 3e-3, 0, 40, tmp_path / "out", smollm2)
    key = record.key(tiny_model_dir, ds, args)
    assert record.get(key) is None
    moved = runs.run_args(tiny_model_dir, ds, "LoRA r=8", 3e-3, 0, 40, tmp_path / "elsewhere", smollm2)
    assert record.key(tiny_model_dir, ds, moved) == key  # a fresh work dir finds the same run
    other = runs.run_args(tiny_model_dir, ds, "LoRA r=8", 3e-3, 1, 40, tmp_path / "out", smollm2)
    assert record.key(tiny_model_dir, ds, other) != key
    record.add(key, {"val_loss": 2.0, "adapter": "x"})
    record.add(key, {"val_loss": 2.0, "test_loss": 2.1})
    assert record.get(key) == {"val_loss": 2.0, "test_loss": 2.1}

    lora, smoa = "LoRA r=8", "SMoA r=8 K=2"
    path = tmp_path / "records" / "study.jsonl"
    rec = runs.Record(path)
    entries = [_smollm2_run(lora, lr, 0, v, v + 0.1) for lr, v in ((1e-3, 2.0), (3e-3, 1.5), (1e-2, 1.8))]
    entries += [_smollm2_run(lora, 3e-3, s, 1.5, 1.6 + s / 100, 0.6) for s in (1, 2)]
    entries += [_smollm2_run(smoa, lr, 0, v, v + 0.1, 0.7) for lr, v in ((3e-3, 1.9), (1e-2, 1.4))]
    for e in entries:
        a = runs.run_args(tiny_model_dir, ds, e["method"], e["lr"], e["seed"], 40, tmp_path, smollm2)
        rec.add(rec.key(tiny_model_dir, ds, a), e)
    rec.add(rec.key(tiny_model_dir, ds, {"baseline": "commonsense"}),
            {"test_loss": 4.0, "accuracy": {t: 0.25 for t in smollm2.TRAIN_TASKS + smollm2.TRANSFER_TASKS}})
    results = report_smollm2.as_results(*report_smollm2.read_record(path, [ds], tiny_model_dir))
    assert results["best"][(40, "commonsense", lora)] == 3e-3
    assert report_smollm2.status(results, 40, "commonsense", lora) == "default rate"  # 2e-4 not run
    assert report_smollm2.status(results, 40, "commonsense", smoa) == "rates 2/3"
    out = tmp_path / "RESULTS.md"
    out.write_text("# stories260K study\n\nkept\n")
    report_smollm2.write_section(out, path, [ds], tiny_model_dir)
    text = out.read_text()
    assert text.startswith("# stories260K study\n\nkept\n") and "**PARTIAL: 0 of" in text
    assert "| commonsense | LoRA r=8 | 100 | 2e-4 → — | 1e-3/3e-3/1e-2 → **3e-3** | 1.610 ± 0.010 (n=3) |" in text
    assert "| commonsense | base model | 0 | | | 4.000 | | 0.250 | 0.250 | | |" in text
    assert "| method | self_attn.q_proj (cap 64) |\n|---|---|\n| LoRA r=8 | 8.0 / 6.0 |\n" in text  # ranks
    report_smollm2.write_section(out, path, [ds], tiny_model_dir)  # replaced, not appended
    assert out.read_text() == text
    # --quick: retrained runs against the record's runs of the same key.
    first = dict(entries[1])
    key = rec.key(tiny_model_dir, ds, runs.run_args(tiny_model_dir, ds, lora, 3e-3, 0, 40, tmp_path, smollm2))
    assert report_smollm2.check_quick({"runs": [{**first, "key": key}]}, path)
    assert not report_smollm2.check_quick({"runs": [{**first, "key": key, "test_loss": 1.7}]}, path)
    assert not report_smollm2.check_quick({"runs": [{**first, "key": "unrecorded"}]}, path)  # nothing compared
