"""Preference training on SmolLM2 with SMoA r=8 K=2: the cost of an SFT, a DPO and an ORPO
update, and what DPO buys over SFT on the same pairs.

  eval "$(../shared/tools/fast-blas.sh)"    # Linux: MLX's bundled BLAS is ~30x slower
  python scripts/bench_dpo.py --model ~/.cache/smoa-fixtures/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

The model is de-quantized to float32 (MLX's CPU quantized matmuls are several times
slower). Pairs come from LLM-Adapters' multiple-choice sets (scripts/make_preference_data.py:
chosen = the correct reply "the correct answer is answerN: <its words>", rejected = a wrong
option in the same form).

1. Steps: the trainer's compiled step (`trainer.make_step`, AdamW update included) with each
   mode's loss, on the same --batch-size pairs: SFT on their chosen replies (batch rows),
   DPO and ORPO on the pairs (2 x batch rows; DPO adds the reference's forward pass with
   the adapter off). One process, interleaved, medians; memory as in bench_train.py
   (resident after building + the step's transient peak).
2. Study: `python -m smoa_mlx.train`'s own loop from the same start, SFT on the chosen
   replies vs DPO on the pairs, the same pairs in the same order, --iters updates each, the
   trainer's default rate and schedule (`--study SFT DPO@1e-3 ORPO`: other runs). Held-out (the first --held-out test items of each
   task, never trained on): preference accuracy = share of pairs whose chosen reply has the
   higher summed log-probability (`modes.pair_logps`), reward accuracy = share whose
   log-probability margin grew over the base model's (TRL's rewards/accuracies), and
   choice accuracy = LLM-Adapters' log-likelihood protocol (`smoa_mlx.evaluate`, the
   replies "the correct answer is <label>").
The last line is a SUMMARY.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's smoa_mlx

from benchlib import banner, load as load_avg, median, table, time_interleaved
from bench_train import load
from make_preference_data import pairs as make_pairs

from smoa_mlx.adapters import load_adapter
from smoa_mlx.data import Batcher, PairBatcher, load_data, load_split, to_pairs
from smoa_mlx.evaluate import evaluate_items
from smoa_mlx.gguf.model import convert_gguf
from smoa_mlx.loader import load_model
from smoa_mlx.modes import DPO, ORPO, SFT, pair_logps
from smoa_mlx.patch import apply_smoa, target_paths
from smoa_mlx.tasks import load_items
from smoa_mlx.train import train
from smoa_mlx.trainer import make_step, upcast_base

SHARED = Path(os.environ.get("SMOA_MLX_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GGUF = os.environ.get("SMOLLM2_GGUF", str(Path.home() / ".cache" / "smoa-fixtures" / "smollm2-135m-instruct"
                                          / "SmolLM2-135M-Instruct.Q4_1.gguf"))
MODES = {"SFT": SFT(), "DPO": DPO(0.1), "ORPO": ORPO(0.1)}
MAX_SEQ = 512


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_data(work: Path, tasks, per_task: int, held: int, seed: int):
    """Train pairs (tasks mixed, fixed order), the same chosen replies as SFT records, and
    per task the held-out items and their pairs."""
    root = SHARED / "data" / "datasets" / "llm_adapters"
    train_pairs, heldout = [], {}
    for i, task in enumerate(tasks):
        train_pairs += make_pairs(load_items(task, root / task / "train.json", per_task), seed + i, True)
        items = load_items(task, root / task / "test.json", held)
        heldout[task] = (items, make_pairs(items, seed + 100 + i, True))
    order = np.random.default_rng(seed).permutation(len(train_pairs))
    train_pairs = [train_pairs[j] for j in order]
    write_jsonl(work / "pairs" / "train.jsonl", train_pairs)
    write_jsonl(work / "sft" / "train.jsonl",
                [{"prompt": p["prompt"], "completion": p["chosen"]} for p in train_pairs])
    for task, (_, p) in heldout.items():
        write_jsonl(work / "held" / f"{task}.jsonl", p)
    return heldout


# ---------------------------------------------------------------- 1. steps


def step_batches(model_dir: Path, data: Path, batch: int):
    """The same `batch` pairs (of median length) as an SFT batch of their chosen replies
    and as a pair batch."""
    _, tok = load_model(str(model_dir))
    pairs = load_data(data / "pairs", tok, splits=("train",), kind="preference")["train"]
    sft = load_data(data / "sft", tok, splits=("train",), mask_prompt=True)["train"]
    assert [p.chosen for p in pairs] == sft, "SFT records must tokenize as the chosen replies"
    mid = sorted(range(len(pairs)), key=lambda i: len(pairs[i].tokens))[len(pairs) // 2:][:batch]
    chosen = [pairs[i] for i in mid]
    return {"SFT": Batcher([p.chosen for p in chosen], batch, MAX_SEQ).batch(0),
            "pairs": PairBatcher(chosen, batch, MAX_SEQ).batch(0)}


def build(model_dir: Path, mode: str, batch, num_layers: int):
    model = load(model_dir, to_float=True)
    model.freeze()
    apply_smoa(model, keys=target_paths(model, None, num_layers), rank=8, num_blocks=2,
               alpha=8.0, progress=False)
    model.train()
    step, state = make_step(model, optim.AdamW(learning_rate=1e-5), MODES[mode].loss)
    mx.eval(model.parameters())
    return model, lambda: [step(*batch, None, True)[0], state]


def bench_steps(model_dir: Path, data: Path, batch: int, repeats: int, num_layers: int) -> dict:
    batches = step_batches(model_dir, data, batch)
    steps, resident = {}, {}
    for mode in MODES:
        gc.collect()
        before = mx.get_active_memory()
        data_ = batches["SFT" if mode == "SFT" else "pairs"]
        model, step = build(model_dir, mode, data_, num_layers)
        mx.eval(step())  # compiles, and creates the optimizer state
        gc.collect()
        resident[mode] = mx.get_active_memory() - before
        steps[mode] = (model, step, data_)
    transient = {}
    times = time_interleaved({m: s[1] for m, s in steps.items()}, repeats, warmup=0, peaks=transient)
    med = {m: median(t) for m, t in times.items()}
    mem = {m: resident[m] + max(transient[m]) for m in MODES}
    rows = [[m, f"{steps[m][2][0].shape[0]} x {steps[m][2][0].shape[1]}", med[m], med[m] / med["SFT"],
             mem[m] / 2**20, mem[m] / mem["SFT"]] for m in MODES]
    where = "every layer" if num_layers < 0 else f"the last {num_layers} layers"
    print(f"SMoA r=8 K=2 on the default targets of {where}; "
          f"{batch} pairs per update; median of {repeats} interleaved steps; {load_avg()}")
    table(["mode", "rows x tokens", "step s", "vs SFT", "peak MiB", "mem vs SFT"], rows)
    return {"step": med, "mem": mem}


# ---------------------------------------------------------------- 2. study


def measure(model_dir: Path, adapter, work: Path, heldout: dict, base=None) -> dict:
    """Held-out preference and choice accuracy of the base model plus `adapter`; the
    summed reply log-probabilities (for the reward accuracy against `base`'s)."""
    model, tok = load_model(str(model_dir))
    upcast_base(model)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    out = {"tasks": {}, "logps": {}}
    for task, (items, _) in heldout.items():
        pairs = load_split(work / "held" / f"{task}.jsonl", tok, convert=to_pairs)
        c, r = pair_logps(model, PairBatcher(pairs, min(4, len(pairs)), MAX_SEQ).eval_batches())
        choice, records = evaluate_items(model, tok, task, items, mode="loglik", choices="label")
        out["logps"][task] = (c, r)
        picked = Counter(x["prediction"] for x in records).most_common()
        row = {"pref_acc": float(np.mean(c > r)), "margin": float(np.mean(c - r)),
               "choice_acc": choice["accuracy"], "n": len(items), "predictions": picked}
        if base is not None:
            bc, br = base["logps"][task]
            row["reward_acc"] = float(np.mean((c - bc) > (r - br)))
        out["tasks"][task] = row
    n = sum(t["n"] for t in out["tasks"].values())
    for key in ("pref_acc", "margin", "choice_acc", "reward_acc"):
        if all(key in t for t in out["tasks"].values()):
            out[key] = sum(t[key] * t["n"] for t in out["tasks"].values()) / n
    return out


def run_study(model_dir: Path, work: Path, heldout: dict, args) -> dict:
    tic = time.perf_counter()
    results = {"base": measure(model_dir, None, work, heldout)}
    print(f"base model measured in {time.perf_counter() - tic:.0f} s", flush=True)
    for arm in args.study:
        mode, _, rate = arm.partition("@")
        rate = float(rate) if rate else args.learning_rate
        out = work / f"adapter_{arm.lower()}"
        tic = time.perf_counter()
        data = work / ("sft" if mode == "SFT" else "pairs")
        r = train({"model": str(model_dir), "upcast_base": True, "data": str(data),
                   "adapter_path": str(out), "train_mode": mode.lower(), "beta": args.beta,
                   "iters": args.iters, "batch_size": args.batch_size, "warmup": args.iters // 10,
                   "steps_per_report": 10, "max_seq_length": MAX_SEQ, "seed": args.seed,
                   "mask_prompt": True,  # SFT's loss on the reply, the tokens DPO scores
                   "num_layers": args.num_layers, "learning_rate": rate})
        wall = time.perf_counter() - tic
        results[arm] = measure(model_dir, out, work, heldout, base=results["base"])
        print(f"{arm}: {args.iters} updates at lr {rate or 'default'} (peak {r['peak_memory_gb']:.2f} GB) in "
              f"{wall:.0f} s, measured in {time.perf_counter() - tic - wall:.0f} s", flush=True)
    n = sum(len(items) for items, _ in heldout.values())
    print(f"\nHeld-out: {n} items ({', '.join(f'{t} {len(i)}' for t, (i, _) in heldout.items())}); "
          f"{args.iters} updates of {args.batch_size}; {load_avg()}")
    rows = []
    for name, r in results.items():
        rows.append([name, r["pref_acc"], r["margin"], r.get("reward_acc", "-"), r["choice_acc"],
                     *(f"{t['pref_acc']:.2f}/{t['choice_acc']:.2f}" for t in r["tasks"].values())])
    table(["model", "pref acc", "margin", "reward acc", "choice acc",
           *(f"{t} pref/choice" for t in heldout)], rows)
    answers = {t: Counter(i.answer for i in items).most_common() for t, (items, _) in heldout.items()}
    for name, r in [("answers", {"tasks": {t: {"predictions": a} for t, a in answers.items()}}),
                    *results.items()]:
        print(f"{name} (label: count): " + "; ".join(
            f"{t} " + " ".join(f"{k} {v}" for k, v in row["predictions"]) for t, row in r["tasks"].items()))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=GGUF, help="SmolLM2 (a GGUF or an MLX directory); de-quantized to float32.")
    p.add_argument("--work-dir", default="/tmp/smoa_bench_dpo")
    p.add_argument("--tasks", nargs="+", default=["ARC-Easy", "boolq", "openbookqa"])
    p.add_argument("--train-per-task", type=int, default=64)
    p.add_argument("--held-out", type=int, default=33, help="Test items per task.")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=None, help="Default: the trainer's.")
    p.add_argument("--study", nargs="+", default=["SFT", "DPO"], metavar="MODE[@LR]",
                   help="The study's runs: SFT, DPO or ORPO, each at --learning-rate or @LR.")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--num-layers", type=int, default=-1, help="Adapted layers (from the top); -1 all.")
    p.add_argument("--repeats", type=int, default=3, help="Timed steps per mode.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=("steps", "study"), default=None)
    args = p.parse_args(argv)
    banner()
    work = Path(args.work_dir)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        convert_gguf(args.model, model_dir, dequantize=Path(args.model).suffix == ".gguf")
    heldout = make_data(work, args.tasks, args.train_per_task, args.held_out, args.seed)
    summary = []
    if args.skip != "steps":
        s = bench_steps(model_dir, work, args.batch_size, args.repeats, args.num_layers)
        summary += [f"dpo_vs_sft_step={s['step']['DPO'] / s['step']['SFT']:.2f}",
                    f"orpo_vs_sft_step={s['step']['ORPO'] / s['step']['SFT']:.2f}",
                    f"dpo_vs_sft_mem={s['mem']['DPO'] / s['mem']['SFT']:.2f}",
                    f"orpo_vs_sft_mem={s['mem']['ORPO'] / s['mem']['SFT']:.2f}"]
    if args.skip != "study":
        r = run_study(model_dir, work, heldout, args)
        for name in r:
            summary += [f"{name.lower()}_pref_acc={r[name]['pref_acc']:.3f}",
                        f"{name.lower()}_choice_acc={r[name]['choice_acc']:.3f}"]
    print("SUMMARY " + " ".join(summary))


if __name__ == "__main__":
    sys.exit(main())
