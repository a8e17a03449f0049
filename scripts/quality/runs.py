"""Training and measuring the runs; one worker task is one (steps, dataset, method)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import redirect_stdout
from pathlib import Path

from .datasets import Dataset
from .protocol import (
    ALPHA, BATCH, DEFAULT_RATE, EVAL_EVERY, GRID, MAX_EXTEND, MAX_SEQ, METHODS, TARGETS,
    extension, fmt_lr,
)


def accuracy(model, tokenizer, ds: Dataset):
    from smoa_mlx.evaluate import evaluate_items

    if not ds.items:
        return None
    summary, _ = evaluate_items(model, tokenizer, ds.task, ds.items, mode="loglik", choices="label")
    return summary["accuracy"]


def held_out(model, tokenizer, ds: Dataset) -> float:
    """The trainer's test loss: token-weighted NLL over every batch of the held-out split."""
    from smoa_mlx.data import Batcher, load_data
    from smoa_mlx.train import evaluate

    test = load_data(ds.data, tokenizer, ds.mask_prompt, splits=("test",))["test"]
    return evaluate(model, Batcher(test, BATCH, MAX_SEQ).eval_batches(-1))


def baseline(model_path: Path, ds: Dataset) -> dict:
    from smoa_mlx import load

    model, tokenizer = load(str(model_path))
    return {"test_loss": held_out(model, tokenizer, ds), "accuracy": accuracy(model, tokenizer, ds)}


def train_one(model_path: Path, ds: Dataset, label: str, lr: float, seed: int, iters: int,
              work: Path) -> dict:
    """Train one adapter (log in <adapter dir>.log); keep its validation curve.

    A finished run's record is kept in <adapter dir>/run.json and reused when the same
    run is asked for again in the same --work-dir (an interrupted sweep continues).
    """
    from smoa_mlx.files import write_json
    from smoa_mlx.train import train

    name = re.sub(r"[^A-Za-z0-9]+", "_", label)
    out = work / "runs" / f"{iters}steps" / ds.name / name / f"lr{lr:g}_seed{seed}"
    args = {
        "model": str(model_path), "data": str(ds.data), **METHODS[label], "alpha": ALPHA,
        "learning_rate": lr, "iters": iters, "batch_size": BATCH, "targets": TARGETS,
        "seed": seed, "max_seq_length": MAX_SEQ, "mask_prompt": ds.mask_prompt,
        "steps_per_eval": EVAL_EVERY, "steps_per_report": EVAL_EVERY, "val_batches": -1,
        "save_every": iters, "adapter_path": str(out),
    }
    saved = out / "run.json"
    if saved.is_file() and json.loads(saved.read_text())["args"] == args:
        return json.loads(saved.read_text())
    record = {"dataset": ds.name, "method": label, "iters": iters, "lr": lr, "seed": seed,
              "adapter": str(out), "args": args}
    out.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log, redirect_stdout(log):
        try:
            result = train(args)
        except ValueError as e:
            if "NaN/inf" not in str(e):
                raise
            result = None
    if result is None:
        record.update(diverged=True, val_loss=math.inf, seconds=time.perf_counter() - tic)
    else:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        record.update(
            diverged=False, val_loss=result["val_loss"], trainable=result["trainable"],
            seconds_per_step=1 / result["iterations_per_second"],
            curve=[[m["step"], m["val_loss"]] for m in metrics if m["type"] == "val"],
            seconds=time.perf_counter() - tic,
        )
    write_json(saved, record)
    return record


def measure(model_path: Path, ds: Dataset, run: dict) -> None:
    """Held-out loss, accuracy and effective rank of a trained adapter (added to `run`)."""
    from smoa_mlx import load
    from smoa_mlx.files import write_json
    from smoa_mlx.rank import rank_report

    if run["diverged"] or "test_loss" in run:
        return
    tic = time.perf_counter()
    model, tokenizer = load(str(model_path), run["adapter"])
    report = rank_report(model)
    run.update(
        test_loss=held_out(model, tokenizer, ds), accuracy=accuracy(model, tokenizer, ds),
        rank_1pct=report["summary"]["all"]["rank_1pct"]["mean"],
        entropy_rank=report["summary"]["all"]["entropy_rank"]["mean"],
        rank_by_type={k: {"rank_1pct": v["rank_1pct"]["mean"], "entropy_rank": v["entropy_rank"]["mean"],
                          "cap": v["max_rank"]} for k, v in report["summary"].items()},
    )
    run["seconds"] += time.perf_counter() - tic
    write_json(Path(run["adapter"]) / "run.json", run)


def summary_line(r: dict) -> str:
    head = f"{r['iters']} steps {r['dataset']} {r['method']} lr {fmt_lr(r['lr'])} seed {r['seed']}: "
    if r["diverged"]:
        return head + "diverged"
    line = head + f"val {r['val_loss']:.3f}"
    if "test_loss" in r:
        acc = "" if r["accuracy"] is None else f", accuracy {r['accuracy']:.3f}"
        line += (f", held-out {r['test_loss']:.3f}{acc}, rank>1% {r['rank_1pct']:.1f}, "
                 f"entropy rank {r['entropy_rank']:.1f}")
    return line + f" ({r['seconds']:.0f}s)"


def method_runs(model_path, ds, label, iters, seeds, quick, work) -> tuple[list[dict], float]:
    """One method on one dataset at one length: the learning-rate sweep with the first
    seed, starting at the default rate and its neighbours and extended while the best
    is at an end; then the other seeds at the best rate and at the default rate. Only
    runs at those two rates are measured on held-out data. Returns (runs, best rate).
    `quick`: the default rate with the first seed only."""
    runs = []

    def go(lr, seed, measured):
        run = train_one(model_path, ds, label, lr, seed, iters, work)
        if measured:
            measure(model_path, ds, run)
        runs.append(run)
        print("  " + summary_line(run), flush=True)
        return run

    default = DEFAULT_RATE[label]
    grid = [default] if quick else list(GRID[label])
    sweep = [go(lr, seeds[0], measured=lr == default) for lr in grid]
    for _ in range(0 if quick else MAX_EXTEND):
        lr = extension(grid, min(sweep, key=lambda r: r["val_loss"])["lr"])
        if lr is None:
            break
        grid.append(lr)
        sweep.append(go(lr, seeds[0], measured=False))
    best = min(sweep, key=lambda r: r["val_loss"])
    if "test_loss" not in best and not best["diverged"]:
        measure(model_path, ds, best)
        print("  best rate; measured: " + summary_line(best), flush=True)
    if default not in grid:
        go(default, seeds[0], measured=True)
    # More seeds at the default rate only where it competes (inside the rates tried).
    contender = min(grid) <= default <= max(grid)
    for lr in sorted({best["lr"], default} if contender else {best["lr"]}):
        for seed in seeds[1:]:
            go(lr, seed, measured=True)
    return runs, best["lr"]


def run_all(model_path, datasets, iters_list, labels, seeds, quick, work, jobs) -> dict:
    """Every (steps, dataset, method) in `jobs` worker processes, longest first; the
    results do not depend on `jobs` (each run is fixed by its seed), only the order of
    the progress lines does. With more than one job each process gets one BLAS thread:
    on these small matrices a second thread buys nothing, so two processes do twice the work."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    results = {"runs": [], "best": {}, "baseline": {}}
    tasks = [(it, ds, label) for it in sorted(iters_list, reverse=True) for ds in datasets
             for label in labels]
    if jobs > 1:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # read by the workers' BLAS at start
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        base = {ds.name: pool.submit(baseline, model_path, ds) for ds in datasets}
        done = {(it, ds.name, label): pool.submit(method_runs, model_path, ds, label, it, seeds,
                                                  quick, work)
                for it, ds, label in tasks}
        for name, future in base.items():
            results["baseline"][name] = future.result()
        for key, future in done.items():
            runs, results["best"][key] = future.result()
            results["runs"] += runs
    return results
