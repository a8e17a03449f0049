"""Reproduce the SMoA paper's claim in miniature: SMoA vs LoRA vs HiRA on a real
pretrained Llama (stories260K) and real data, on a CPU.

    eval "$(../shared/tools/fast-blas.sh)"     # Linux: MLX's bundled BLAS is ~30x slower
    python scripts/reproduce_quality.py            # full run: writes docs/RESULTS.md + PNG
    python scripts/reproduce_quality.py --quick    # smoke run (a few minutes)

The protocol is in scripts/quality/protocol.py and the same for every method: per
training length, dataset and method, a learning-rate search on a ~x3 ladder starting at
the trainer's default rate (seed 0), then every seed at the best rate and at the default
rate. docs/RESULTS.md is scripts/quality/template.md filled with the numbers.

`--quick` runs the seed-0, default-rate runs of every method on wikisql at 50 steps:
the same runs as in the full sweep, so its numbers must equal those of the record
embedded in docs/RESULTS.md; it checks that.

matplotlib is needed for the plot (a script-only dependency): `pip install -e ".[scripts]"`.

`--study smollm2` runs the SmolLM2-135M-Instruct study instead (scripts/quality/smollm2.py
has the protocol and its sizing): a float32 copy of the model is needed (`--model`,
default /work/cache/smollm2-f32; how to make one: scripts/quality/smollm2.py). Every
finished run is appended to scripts/quality/records/smollm2.jsonl and read back, so the
study resumes where any earlier session stopped (commit that file); the SmolLM2 section
of docs/RESULTS.md is rendered from it (`--report-only` renders without training).
`--study smollm2 --quick` retrains the recorded 40-step commonsense runs of LoRA r=8 and
SMoA r=8 K=2 at their default rates (seed 0) and checks them against the record.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's smoa_mlx, in workers too
from quality import protocol, smollm2  # noqa: E402
from quality.datasets import prepare  # noqa: E402
from quality.protocol import DATASETS, DEFAULT_DATASETS, DEFAULT_MODEL, EVAL_EVERY, ITERS, METHODS, REPO, SEEDS  # noqa: E402
from quality.report import check_against, machine, main_table, plot, require_matplotlib, write_report  # noqa: E402
from quality.runs import run_all  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=("stories260K", "smollm2"), default="stories260K",
                   help="Which study (default stories260K; smollm2: issue 23's).")
    p.add_argument("--report-only", action="store_true", help="smollm2: render the SmolLM2 "
                   "section of docs/RESULTS.md from the record, no training.")
    p.add_argument("--quick", action="store_true", help="Smoke run: wikisql, 50 steps, seed 0, "
                   "each method's default rate; checks docs/RESULTS.md's record.")
    p.add_argument("--model", default=None, help="Base model (default stories260K-hf; "
                   f"smollm2: {smollm2.DEFAULT_MODEL}).")
    p.add_argument("--datasets-dir", default=str(DEFAULT_DATASETS), help="../shared/data/datasets")
    p.add_argument("--datasets", nargs="+", choices=sorted(set(DATASETS) | set(smollm2.DATASETS)), default=None,
                   help="Datasets to run (default: all; wikisql with --quick).")
    p.add_argument("--methods", nargs="+", choices=list({**METHODS, **smollm2.METHODS}), default=None,
                   metavar="LABEL",
                   help=f"Methods to run (default all: {', '.join(METHODS)}).")
    p.add_argument("--iters", type=int, nargs="+", default=None, help="Training lengths in steps "
                   f"(default {' '.join(map(str, ITERS))}; 50 with --quick).")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help=f"Seeds per rate (default {len(SEEDS)}).")
    p.add_argument("--output-dir", default=None, help="Where RESULTS.md and results_loss.png go "
                   "(default docs/; with --quick a temporary directory, so docs/ keeps the full run).")
    p.add_argument("--keep", action="store_true", help="Keep the adapters and logs of every run.")
    p.add_argument("--work-dir", default=None, help="Directory for the runs (default: a new "
                   "temporary one). Runs already finished there are reused, so an interrupted "
                   "run continues; implies --keep.")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 4), help="Worker "
                   "processes (default: the CPU cores, at most 4).")
    p.add_argument("--report-from", default=None, metavar="RESULTS_JSON", help="Only rewrite the "
                   "report and plot from the results.json of an earlier run (no training).")
    return p


def save_results(path: Path, results: dict, meta: dict) -> None:
    from smoa_mlx.files import write_json

    best = [[*k, v] for k, v in results["best"].items()]
    write_json(path, {"meta": meta, "results": {**results, "best": best}})


def load_results(path: Path) -> tuple[dict, dict]:
    from smoa_mlx.files import read_json

    saved = read_json(path)
    results = saved["results"]
    results["best"] = {(it, d, m): lr for it, d, m, lr in results["best"]}
    return results, saved["meta"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.study == "smollm2":
        return run_smollm2(args)
    args.model = args.model or str(DEFAULT_MODEL)
    plt = require_matplotlib()
    from mlx_lm.utils import load

    from smoa_mlx.blas import describe, warn_if_reference

    print(f"BLAS in use by MLX: {describe()}", flush=True)
    if warn_if_reference():
        print("  (in this repo: eval \"$(../shared/tools/fast-blas.sh)\" first)", file=sys.stderr)
    model_path, src = Path(args.model), Path(args.datasets_dir)
    for p in (model_path, src):
        if not p.exists():
            raise SystemExit(f"error: {p} not found")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="smoa_reproduce_"))
    keep = args.keep or args.work_dir is not None
    saved = load_results(Path(args.report_from)) if args.report_from else None
    quick = saved[1]["quick"] if saved else args.quick
    names = saved[1]["datasets"] if saved else args.datasets or (["wikisql"] if quick else list(DATASETS))
    iters = args.iters or ([50] if quick else list(ITERS))
    if min(iters) < EVAL_EVERY:
        raise SystemExit(f"error: --iters must be at least {EVAL_EVERY}")
    out_dir = Path(args.output_dir) if args.output_dir else (work / "report" if quick else REPO / "docs")
    tic = time.perf_counter()
    try:
        _, tokenizer = load(str(model_path))
        datasets = [prepare(n, src, work / "data", tokenizer) for n in names]
        if saved:
            results, meta = saved
            meta["rendered_from"] = True
        else:
            seeds = SEEDS[:1] if quick else tuple(range(args.seeds))
            labels = args.methods or list(METHODS)
            print(f"{len(iters) * len(datasets) * len(labels)} (steps, dataset, method) sweeps in "
                  f"{args.jobs} process(es); a line per finished run:", flush=True)
            results = run_all(model_path, datasets, iters, labels, seeds, quick, work, args.jobs, protocol)
            meta = {
                "quick": quick, "iters": iters, "seeds": seeds, "datasets": names, "methods": labels,
                "machine": machine(), "model_name": model_path.name, "jobs": args.jobs,
                "wall_seconds": time.perf_counter() - tic, "load_average": os.getloadavg()[2],
                "command": shlex.join(["python", "scripts/reproduce_quality.py", *sys.argv[1:]]),
            }
            save_results(work / "results.json", results, meta)
        plot(results, meta["iters"], datasets, meta["methods"], out_dir / "results_loss.png", plt)
        write_report(out_dir / "RESULTS.md", results, datasets, meta, model_path)
    finally:
        shutil.rmtree(work / "data", ignore_errors=True)
        if keep:
            print(f"Runs and results.json kept in {work}")
        else:
            shutil.rmtree(work / "runs", ignore_errors=True)
            if (work / "results.json").is_file():
                print(f"Results kept in {work / 'results.json'} (for --report-from)")
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()
    for it in meta["iters"]:
        print(f"\n{it} steps\n" + main_table(results, it, datasets, meta["methods"]))
    print(f"\nWrote {out_dir / 'RESULTS.md'} and {out_dir / 'results_loss.png'}; "
          f"wall time {meta['wall_seconds'] / 60:.1f} min")
    if quick and not saved:
        return 0 if check_against(REPO / "docs" / "RESULTS.md", results) else 1
    return 0


def run_smollm2(args) -> int:
    """The SmolLM2 study: every run not yet in the record, then the report from the record."""
    from mlx_lm.utils import load

    from quality.report_smollm2 import check_quick, write_section

    model_path, src = Path(args.model or smollm2.DEFAULT_MODEL), Path(args.datasets_dir)
    for p in (model_path, src):
        if not p.exists():
            raise SystemExit(f"error: {p} not found (scripts/quality/smollm2.py says how to make "
                             "the float32 model)")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="smoa_smollm2_"))
    names = args.datasets or ([smollm2.QUICK["dataset"]] if args.quick else list(smollm2.DATASETS))
    labels = args.methods or list(smollm2.QUICK["methods"] if args.quick else smollm2.METHODS)
    iters = args.iters or ([smollm2.QUICK["iters"]] if args.quick else list(smollm2.ITERS))
    _, tokenizer = load(str(model_path))
    # The report covers the whole record, whichever subset this invocation trains (--quick writes none).
    datasets = [smollm2.prepare(n, src, work / "data", tokenizer) for n in (names if args.quick else smollm2.DATASETS)]
    results = None
    if not args.report_only:
        seeds = smollm2.SEEDS[:1] if args.quick else tuple(range(args.seeds))
        print(f"SmolLM2 study: {', '.join(labels)} on {', '.join(names)} at {iters} steps; "
              f"record {smollm2.RECORD}; a line per run (recorded runs are read back):", flush=True)
        results = run_all(model_path, [ds for ds in datasets if ds.name in names], iters, labels, seeds,
                          args.quick, work, args.jobs, smollm2)
    try:
        if args.quick:
            return 0 if check_quick(results, smollm2.RECORD) else 1
        write_section(REPO / "docs" / "RESULTS.md", smollm2.RECORD, datasets, model_path)
        print(f"Wrote the SmolLM2 section of {REPO / 'docs' / 'RESULTS.md'} from {smollm2.RECORD}")
        return 0
    finally:
        if not args.work_dir:  # a temporary one: every finished run is in the record
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from smoa_mlx.cli import run

    run(main)
