"""Training and measuring the runs; one worker task is one (steps, dataset, method).

`proto` is the study's protocol module (`protocol` for stories260K, `smollm2`): its
METHODS, GRID, DEFAULT_RATE, ALPHA, BATCH, MAX_SEQ, EVAL_EVERY, TARGETS, MAX_EXTEND.
A study with a RECORD file (smollm2) appends every finished run to it and reads it back
(`Record`), so the runs outlive the work directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from contextlib import redirect_stdout
from pathlib import Path

from .datasets import Dataset
from .protocol import extension, fmt_lr


def accuracy(model, tokenizer, ds: Dataset):
    """Accuracy by log-likelihood of the label replies: one number (`ds.items`), a dict by
    task (`ds.tasks`), or None."""
    from smoa_mlx.evaluate import evaluate_items

    def score(task, items):
        summary, _ = evaluate_items(model, tokenizer, task, items, mode="loglik", choices="label")
        return summary["accuracy"]

    if ds.tasks:
        return {task: score(task, items) for task, items in ds.tasks.items()}
    return score(ds.task, ds.items) if ds.items else None


def held_out(model, tokenizer, ds: Dataset, proto) -> float:
    """The trainer's test loss: token-weighted NLL over every batch of the held-out split."""
    from smoa_mlx.data import Batcher, load_data
    from smoa_mlx.train import evaluate

    test = load_data(ds.data, tokenizer, ds.mask_prompt, splits=("test",))["test"]
    return evaluate(model, Batcher(test, proto.BATCH, proto.MAX_SEQ).eval_batches(-1))


class Record:
    """A study's finished runs, one JSON line each, keyed by what fixes a run's result (the
    training options without paths, the model's config and the prepared data's digest).
    Appends are single writes of one line (O_APPEND), safe from several workers; the
    last line for a key wins (a run measured after it was first recorded)."""

    def __init__(self, path: Path | None):
        self.path = path

    def key(self, model_path: Path, ds: Dataset, args: dict) -> str:
        model = hashlib.sha256((Path(model_path) / "config.json").read_bytes()).hexdigest()[:16]
        kept = {k: v for k, v in args.items() if k not in ("model", "data", "adapter_path")}
        return json.dumps({"model": model, "data": data_digest(ds), **kept}, sort_keys=True)

    def get(self, key: str) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        found = None
        for line in self.path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                if entry["key"] == key:
                    found = entry["run"]
        return found

    def add(self, key: str, run: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "run": {k: v for k, v in run.items() if k != "adapter"}}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def data_digest(ds: Dataset) -> str:
    """sha256 of every prepared file of a dataset (train/valid/test and scored items)."""
    h = hashlib.sha256()
    for f in sorted(Path(ds.data).rglob("*.jsonl")):
        h.update(str(f.relative_to(ds.data)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _module(proto):
    """Workers get the protocol module by name (modules do not pickle)."""
    import importlib

    return importlib.import_module(proto) if isinstance(proto, str) else proto


def baseline(model_path: Path, ds: Dataset, proto) -> dict:
    from smoa_mlx import load

    proto = _module(proto)
    record = Record(getattr(proto, "RECORD", None))
    key = record.key(model_path, ds, {"baseline": ds.name})
    found = record.get(key)
    if found is not None:
        return found
    model, tokenizer = load(str(model_path))
    result = {"test_loss": held_out(model, tokenizer, ds, proto), "accuracy": accuracy(model, tokenizer, ds)}
    record.add(key, result)
    return result


def run_args(model_path: Path, ds: Dataset, label: str, lr: float, seed: int, iters: int,
             out: Path, proto) -> dict:
    return {
        "model": str(model_path), "data": str(ds.data), **proto.METHODS[label], "alpha": proto.ALPHA,
        "learning_rate": lr, "iters": iters, "batch_size": proto.BATCH, "targets": proto.TARGETS,
        "seed": seed, "max_seq_length": proto.MAX_SEQ, "mask_prompt": ds.mask_prompt,
        "steps_per_eval": proto.EVAL_EVERY, "steps_per_report": proto.EVAL_EVERY, "val_batches": -1,
        "save_every": iters, "adapter_path": str(out),
    }


def train_one(model_path: Path, ds: Dataset, label: str, lr: float, seed: int, iters: int,
              work: Path, proto, force: bool = False) -> dict:
    """Train one adapter (log in <adapter dir>.log); keep its validation curve.

    A finished run's record is kept in <adapter dir>/run.json and reused when the same
    run is asked for again in the same --work-dir (an interrupted sweep continues), and
    in the study's RECORD file when it has one. `force`: train even so (--quick checks).
    """
    from smoa_mlx.files import write_json
    from smoa_mlx.train import train

    name = re.sub(r"[^A-Za-z0-9]+", "_", label)
    out = work / "runs" / f"{iters}steps" / ds.name / name / f"lr{lr:g}_seed{seed}"
    args = run_args(model_path, ds, label, lr, seed, iters, out, proto)
    record = Record(getattr(proto, "RECORD", None))
    key = record.key(model_path, ds, args)
    saved = out / "run.json"
    if not force and saved.is_file() and json.loads(saved.read_text())["args"] == args:
        return json.loads(saved.read_text())
    found = None if force else record.get(key)
    if found is not None:
        return {**found, "adapter": str(out), "args": args, "key": key}
    run = {"dataset": ds.name, "method": label, "iters": iters, "lr": lr, "seed": seed,
           "adapter": str(out), "args": args, "key": key}
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
        run.update(diverged=True, val_loss=math.inf, seconds=time.perf_counter() - tic)
    else:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        run.update(
            diverged=False, val_loss=result["val_loss"], trainable=result["trainable"],
            seconds_per_step=1 / result["iterations_per_second"],
            curve=[[m["step"], m["val_loss"]] for m in metrics if m["type"] == "val"],
            seconds=time.perf_counter() - tic,
        )
    write_json(saved, run)
    if not force:
        record.add(key, run)
    return run


def measure(model_path: Path, ds: Dataset, run: dict, proto, force: bool = False) -> None:
    """Held-out loss, accuracy and effective rank of a trained adapter (added to `run`).
    A run read back from the record without its adapter is trained again first (seeded:
    the same adapter)."""
    from smoa_mlx import load
    from smoa_mlx.files import write_json
    from smoa_mlx.rank import rank_report

    if run["diverged"] or "test_loss" in run:
        return
    if not (Path(run["adapter"]) / "adapters.safetensors").is_file():
        run.update(train_one(model_path, ds, run["method"], run["lr"], run["seed"], run["iters"],
                             Path(run["adapter"]).parents[4], proto, force=True))
    tic = time.perf_counter()
    model, tokenizer = load(str(model_path), run["adapter"])
    report = rank_report(model)
    run.update(
        test_loss=held_out(model, tokenizer, ds, proto), accuracy=accuracy(model, tokenizer, ds),
        rank_1pct=report["summary"]["all"]["rank_1pct"]["mean"],
        entropy_rank=report["summary"]["all"]["entropy_rank"]["mean"],
        rank_by_type={k: {"rank_1pct": v["rank_1pct"]["mean"], "entropy_rank": v["entropy_rank"]["mean"],
                          "cap": v["max_rank"]} for k, v in report["summary"].items()},
    )
    run["seconds"] += time.perf_counter() - tic
    write_json(Path(run["adapter"]) / "run.json", run)
    if not force:
        Record(getattr(proto, "RECORD", None)).add(run["key"], run)


def summary_line(r: dict) -> str:
    head = f"{r['iters']} steps {r['dataset']} {r['method']} lr {fmt_lr(r['lr'])} seed {r['seed']}: "
    if r["diverged"]:
        return head + "diverged"
    line = head + f"val {r['val_loss']:.3f}"
    if "test_loss" in r:
        acc = r["accuracy"]
        if isinstance(acc, dict):
            acc = sum(acc.values()) / len(acc)
        acc = "" if acc is None else f", accuracy {acc:.3f}"
        line += (f", held-out {r['test_loss']:.3f}{acc}, rank>1% {r['rank_1pct']:.1f}, "
                 f"entropy rank {r['entropy_rank']:.1f}")
    return line + f" ({r['seconds']:.0f}s)"


def method_runs(model_path, ds, label, iters, seeds, quick, work, proto) -> tuple[list[dict], float]:
    """One method on one dataset at one length: the learning-rate sweep with the first
    seed, starting at the default rate and its neighbours and extended while the best
    is at an end; then the other seeds at the best rate and at the default rate. Only
    runs at those two rates are measured on held-out data. Returns (runs, best rate).
    `quick`: the default rate with the first seed only (trained again even if recorded)."""
    proto = _module(proto)
    runs = []

    def go(lr, seed, measured):
        run = train_one(model_path, ds, label, lr, seed, iters, work, proto, force=quick)
        if measured:
            measure(model_path, ds, run, proto, force=quick)
        runs.append(run)
        print("  " + summary_line(run), flush=True)
        return run

    default = proto.DEFAULT_RATE[label]
    # A grid rate equal to the default up to rounding is the default (1e-2 vs 0.01000..01).
    default = next((lr for lr in proto.GRID[label] if math.isclose(lr, default, rel_tol=1e-6)), default)
    grid = [default] if quick else list(proto.GRID[label])
    sweep = [go(lr, seeds[0], measured=lr == default) for lr in grid]
    for _ in range(0 if quick else proto.MAX_EXTEND):
        lr = extension(grid, min(sweep, key=lambda r: r["val_loss"])["lr"])
        if lr is None:
            break
        grid.append(lr)
        sweep.append(go(lr, seeds[0], measured=False))
    best = min(sweep, key=lambda r: r["val_loss"])
    if "test_loss" not in best and not best["diverged"]:
        measure(model_path, ds, best, proto)
        print("  best rate; measured: " + summary_line(best), flush=True)
    if default not in grid:
        go(default, seeds[0], measured=True)
    # More seeds at the default rate only where it competes (inside the rates tried).
    contender = min(grid) <= default <= max(grid)
    for lr in sorted({best["lr"], default} if contender else {best["lr"]}):
        for seed in seeds[1:]:
            go(lr, seed, measured=True)
    return runs, best["lr"]


def run_all(model_path, datasets, iters_list, labels, seeds, quick, work, jobs, proto) -> dict:
    """Every (steps, dataset, method) in `jobs` worker processes; the results do not depend
    on `jobs` (each run is fixed by its seed), only the order of the progress lines does.
    Order: longest first (stories260K: balances the workers), or, for a study with a
    record (smollm2, which spans sessions), shortest first in the protocol's order, so
    the first hours give the main comparison. With more than one job each process gets
    one BLAS thread: on these small matrices a second thread buys nothing, so two
    processes do twice the work."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    results = {"runs": [], "best": {}, "baseline": {}}
    lengths = getattr(proto, "lengths", lambda ds_name: iters_list)
    tasks = [(it, ds, label) for it in sorted(iters_list, reverse=not hasattr(proto, "RECORD"))
             for ds in datasets if it in lengths(ds.name) for label in labels]
    if jobs > 1:
        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # read by the workers' BLAS at start
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        name = proto.__name__
        base = {ds.name: pool.submit(baseline, model_path, ds, name) for ds in datasets}
        done = {(it, ds.name, label): pool.submit(method_runs, model_path, ds, label, it, seeds,
                                                  quick, work, name)
                for it, ds, label in tasks}
        for name, future in base.items():
            results["baseline"][name] = future.result()
        for key, future in done.items():
            runs, results["best"][key] = future.result()
            results["runs"] += runs
    return results
