"""The SmolLM2 section of docs/RESULTS.md, rendered from the study's record
(scripts/quality/records/smollm2.jsonl): whatever has finished, marked partial until every
planned run is in. The stories260K part of the file is left as it is."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from . import smollm2 as proto
from .protocol import extension, fmt_lr
from .runs import data_digest
from .stats import clear, compare, default_cost, finals, mean_std, pm, sweep, verdict

from .report import KEPT_BEGIN as BEGIN, rank_table

END = "<!-- smollm2 section end -->"
PAIRS = (
    ("SMoA r=8 K=2", "LoRA r=8", "the paper's claim: SMoA with half of LoRA's parameters"),
    ("SMoA r=16 K=2", "LoRA r=8", "equal parameters"),
    ("HiRA r=8", "LoRA r=8", "equal parameters; one block"),
    ("DoRA r=8", "LoRA r=8", "DoRA's magnitude vector"),
    ("SMoA r=8 K=2", "DoRA r=8", "the paper's other baseline, at half its parameters"),
)


def read_record(path: Path, datasets, model_path: Path) -> tuple[list[dict], dict]:
    """(runs, baselines by dataset) of this model and these prepared datasets; the last
    line of a key wins."""
    model = hashlib.sha256((Path(model_path) / "config.json").read_bytes()).hexdigest()[:16]
    digests = {ds.name: data_digest(ds) for ds in datasets}
    runs, base = {}, {}
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in filter(str.strip, lines):
        entry = json.loads(line)
        key = json.loads(entry["key"])
        if key["model"] != model or key["data"] not in digests.values():
            continue
        if "baseline" in key:
            base[key["baseline"]] = entry["run"]
        else:
            runs[entry["key"]] = entry["run"]
    return list(runs.values()), base


def in_sweep(r: dict) -> bool:
    """A seed-0 run of the rate search (the default rate counts when it is a grid rate)."""
    return r["seed"] == proto.SEEDS[0] and (r["lr"] in proto.GRID[r["method"]]
                                            or not math.isclose(r["lr"], proto.DEFAULT_RATE[r["method"]]))


def as_results(runs: list[dict], base: dict) -> dict:
    """The runner's results layout (stats.py reads it): best rate per (steps, dataset, method)."""
    best = {}
    for key in {(r["iters"], r["dataset"], r["method"]) for r in runs}:
        tried = [r for r in runs if (r["iters"], r["dataset"], r["method"]) == key and in_sweep(r)]
        if tried:
            best[key] = min(tried, key=lambda r: r["val_loss"])["lr"]
    return {"runs": runs, "best": best, "baseline": base, "defaults": proto.DEFAULT_RATE}


def status(results, it, ds, label) -> str:
    """'done', or what is missing (the rate search, seeds at the best or default rate)."""
    tried = sorted(r["lr"] for r in sweep(results, it, ds, label) if in_sweep(r))
    grid = list(proto.GRID[label])
    if not set(grid) <= set(tried):
        return f"rates {len(set(tried) & set(grid))}/{len(grid)}"
    best = results["best"][(it, ds, label)]
    more = extension(tried, best)
    if more is not None and len(tried) - len(grid) < proto.MAX_EXTEND and more not in tried:
        return "rate search extending"
    n = len(finals(results, it, ds, label))
    if n < len(proto.SEEDS):
        return f"seeds {n}/{len(proto.SEEDS)}"
    if not finals(results, it, ds, label, "default"):
        return "default rate"
    return "done"


def _acc(r: dict, tasks) -> float | None:
    acc = r.get("accuracy")
    return None if not isinstance(acc, dict) else float(np.mean([acc[t] for t in tasks]))


def main_table(results, it, names) -> str:
    head = ("dataset", "method", "trainable", "default rate → held-out", "rates tried → best",
            "held-out at best", "default vs best", "accuracy in-domain", "accuracy transfer",
            "s/step", "status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        base = results["baseline"].get(name)
        if base is not None:
            acc = [_acc(base, t) for t in (proto.TRAIN_TASKS, proto.TRANSFER_TASKS)]
            acc = ["—" if a is None else f"{a:.3f}" for a in acc]
            lines.append(f"| {name} | base model | 0 | | | {base['test_loss']:.3f} | | {acc[0]} | {acc[1]} | | |")
        for label in proto.METHODS:
            best = results["best"].get((it, name, label))
            if best is None:
                continue
            runs = finals(results, it, name, label)
            grid = [r["lr"] for r in sweep(results, it, name, label) if in_sweep(r)]
            edge = " (edge)" if len(grid) > 1 and best in (grid[0], grid[-1]) else ""
            where = f"{'/'.join(fmt_lr(x) for x in grid)} → **{fmt_lr(best)}**{edge}"
            at_default = finals(results, it, name, label, "default")
            default = f"{fmt_lr(proto.DEFAULT_RATE[label])} → {pm(r['test_loss'] for r in at_default)}"
            state = status(results, it, name, label)
            if not runs:
                lines.append(f"| {name} | {label} | | {default} | {where} | (not measured yet) | | | | | {state} |")
                continue
            cost = default_cost(results, it, name, label)
            cost = "—" if cost is None else f"{cost:+.1f}%"
            accs = [pm(_acc(r, t) for r in runs) if name == "commonsense" else "—"
                    for t in (proto.TRAIN_TASKS, proto.TRANSFER_TASKS)]
            lines.append(
                f"| {name} | {label} | {runs[0]['trainable']:,} | {default} | {where} | "
                f"{pm(r['test_loss'] for r in runs)} (n={len(runs)}) | {cost} | {accs[0]} | {accs[1]} | "
                f"{np.mean([r['seconds_per_step'] for r in runs]):.1f} | {state} |")
    return "\n".join(lines)


def task_table(results, it) -> str:
    """Commonsense accuracy per task at each method's best rate (mean over seeds)."""
    tasks = proto.TRAIN_TASKS + proto.TRANSFER_TASKS
    lines = ["| method | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    base = results["baseline"].get("commonsense")
    if base is not None and isinstance(base.get("accuracy"), dict):
        lines.append("| base model | " + " | ".join(f"{base['accuracy'][t]:.2f}" for t in tasks) + " |")
    for label in proto.METHODS:
        runs = finals(results, it, "commonsense", label)
        if runs:
            cells = [f"{np.mean([r['accuracy'][t] for r in runs]):.2f}" for t in tasks]
            lines.append(f"| {label} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_lines(results, it, names) -> list[str]:
    out = []
    for name in names:
        for label in proto.METHODS:
            runs = sweep(results, it, name, label)
            if runs:
                best = results["best"].get((it, name, label))
                cells = " · ".join((f"**{fmt_lr(r['lr'])}: {r['val_loss']:.4f}**" if r["lr"] == best
                                    else f"{fmt_lr(r['lr'])}: {r['val_loss']:.4f}") for r in runs)
                out.append(f"| {it} | {name} | {label} | {cells} |")
    return out


def comparisons(results, it, names) -> list[str]:
    lines = []
    for a, b, why in PAIRS:
        for name in names:
            c = compare(results, it, name, a, b)
            if c is not None:
                lines.append(f"- {it} steps, {name}: {a} vs {b} ({why}): held-out {c['a']:.3f} vs "
                             f"{c['b']:.3f}, {verdict(c)}.")
            default = proto.DEFAULT_RATE[a]
            d = compare(results, it, name, a, b, "default", "best")
            if c is not None and d is not None and results["best"].get((it, name, a)) != default:
                lines.append(f"  - {a} at its default rate ({fmt_lr(default)}; the best rate was chosen by "
                             f"the first seed's validation loss on 32 examples) vs {b} at its best: held-out "
                             f"{d['a']:.3f} vs {d['b']:.3f}, {verdict(d)}.")
        ra, rb = finals(results, it, "commonsense", a), finals(results, it, "commonsense", b)
        if ra and rb:
            (ma, sa), (mb, sb) = (mean_std(_acc(r, proto.TRAIN_TASKS) for r in x) for x in (ra, rb))
            items = proto.TEST_ITEMS * len(proto.TRAIN_TASKS)
            se = math.sqrt(mb * (1 - mb) / items)
            spread = "" if sa is None or sb is None else f", seed stds {sa:.3f} / {sb:.3f}"
            lines.append(f"- {it} steps, commonsense in-domain accuracy: {a} {ma:.3f} vs {b} {mb:.3f} "
                         f"(difference {ma - mb:+.3f}; binomial SE of one run's mean over {items} items "
                         f"{se:.3f}{spread}).")
    return lines


def targets(results, it, names) -> str:
    """The issue's targets at one length; 'so far' while a row involved is not done."""
    a, b = "SMoA r=8 K=2", "LoRA r=8"
    rows = [(n, m) for n in names for m in (a, b) if (it, n, m) in results["best"]]
    final = len(rows) == 2 * len(names) and all(status(results, it, n, m) == "done" for n, m in rows)
    word = (lambda ok: "met" if ok else "not met") if final else \
        (lambda ok: f"{'met' if ok else 'not met'} so far (provisional: rows not done)")
    cs = [c for c in (compare(results, it, n, a, b) for n in names) if c is not None]
    text = []
    if cs:
        better = sum(c["gap"] < 0 and clear(c) for c in cs)
        worse = sum(c["gap"] > 0 and clear(c) for c in cs)
        unknown = sum(c["stds"] is None for c in cs)
        equal = len(cs) - better - worse - unknown
        met = better >= 2 or (worse == 0 and unknown == 0 and equal == len(cs) == len(names))
        text.append(f"held-out loss, {a} vs {b} at their best rates: clearly lower on {better}, clearly "
                    f"higher on {worse}, within two seed stds on {equal}, one seed only (no noise "
                    f"estimate) on {unknown} of the {len(cs)} dataset(s) measured (target: lower on 2 of "
                    f"3 beyond noise, or equal on all): {word(met)}")
    ra, rb = finals(results, it, "commonsense", a), finals(results, it, "commonsense", b)
    if ra and rb:
        ma = mean_std(_acc(r, proto.TRAIN_TASKS) for r in ra)[0]
        mb = mean_std(_acc(r, proto.TRAIN_TASKS) for r in rb)[0]
        text.append(f"in-domain accuracy {ma:.3f} vs {mb:.3f} (target SMoA >= LoRA): {word(ma >= mb)}")
    costs = [c for c in (default_cost(results, it, n, a) for n in names) if c is not None]
    if costs:
        text.append(f"SMoA's default rate costs at most {max(costs):.1f}% against its best on "
                    f"{len(costs)} dataset(s) (target 2%): {word(max(costs) <= 2)}")
    return f"**At {it} steps:** " + "; ".join(text) + "." if text else ""


def write_section(path: Path, record: Path, datasets, model_path: Path) -> None:
    from smoa_mlx.files import atomic_write

    runs, base = read_record(record, datasets, model_path)
    results = as_results(runs, base)
    names = [ds.name for ds in datasets]
    planned = [(it, n, m) for it in proto.ITERS for n in names if it in proto.lengths(n) for m in proto.METHODS]
    done = sum(status(results, *k) == "done" for k in planned if k in results["best"])
    final = done == len(planned)
    head = "FINAL" if final else f"PARTIAL: {done} of {len(planned)} (steps, dataset, method) cells done"
    body = [BEGIN, "", "## SmolLM2-135M-Instruct (issue 23)", "",
            f"**{head}** ({len(runs)} runs in `scripts/quality/records/smollm2.jsonl`). Rendered from the "
            "record by `python scripts/reproduce_quality.py --study smollm2 --report-only`; the "
            "study resumes with `nice -n 10 python scripts/reproduce_quality.py --study smollm2 "
            "--jobs 2 --work-dir W` (recorded runs are read back, not rerun). Protocol and sizing: "
            "`scripts/quality/smollm2.py`.", "",
            f"- Model: SmolLM2-135M-Instruct, float32 (de-quantized from the Q4_1 GGUF; hidden 576, "
            f"MLP 1536, 30 layers), adapting {' '.join(proto.TARGETS)} in every layer; alpha "
            f"{proto.ALPHA:g}; batch {proto.BATCH}; at most {proto.MAX_SEQ} tokens; AdamW, cosine "
            f"schedule, iters/10 warmup; validation every {proto.EVAL_EVERY} updates.",
            f"- Rates: per method {', '.join(f'{k} ' + '/'.join(fmt_lr(x) for x in v) for k, v in proto.GRID.items())}"
            f" (first seed; at most {proto.MAX_EXTEND} more ~x3 rung while the best is at an end); "
            f"default rates {', '.join(f'{k} {fmt_lr(v)}' for k, v in proto.DEFAULT_RATE.items())}. "
            f"Best = lowest final validation loss; then seeds {', '.join(map(str, proto.SEEDS))} at it.",
            "- Held-out loss: mean masked NLL per token (nats), mean ± sample std over seeds (n = seeds).",
            "- Accuracy: log-likelihood of the replies \"the correct answer is <label>\" "
            f"(smoa_mlx.evaluate, loglik-label) on the first {proto.TEST_ITEMS} test items of each task; "
            f"in-domain = mean over {', '.join(proto.TRAIN_TASKS)}; transfer = mean over "
            f"{', '.join(proto.TRANSFER_TASKS)} (not trained on). Binomial SE of one task's accuracy "
            f"<= {0.5 / math.sqrt(proto.TEST_ITEMS):.3f}; of the in-domain mean <= "
            f"{0.5 / math.sqrt(proto.TEST_ITEMS * len(proto.TRAIN_TASKS)):.3f}.",
            "- SMoA's and HiRA's default rate is the trainer's, 3e-2 x sqrt(64 / hidden) = 1e-2 here "
            "(`lr_scale.default_rate`). It replaced 3e-2 x 64 / hidden (3.3e-3 here) on this data, from "
            "issue 23 (wikisql, 100 updates of 4, seed 1, held-out NLL; base 3.338): SMoA r=8 K=2 "
            "1.805 at 3.3e-3, **1.708 at 1e-2**, 1.903 at 3e-2; LoRA r=8 1.732 at 3e-3 (its best), "
            "1.744 at 1e-2; with stories260K's best 3e-2 at hidden 64 (3 datasets, 2 lengths, 3 "
            "seeds) the two widths give 1/sqrt(hidden). The rate sweeps below test it.",
            "- Datasets: " + " ".join(f"**{ds.name}** ({', '.join(f'{v} {k}' for k, v in ds.sizes.items())})"
                                      + (f": {ds.about}." if ds.name == "commonsense" else ".")
                                      for ds in datasets), ""]
    for it in proto.ITERS:
        its = [n for n in names if it in proto.lengths(n)]
        if not any(k[0] == it for k in results["best"]) and (it != proto.ITERS[0] or not base):
            body += [f"### {it} steps", "", "No finished runs yet.", ""]
            continue
        body += [f"### {it} steps", "", main_table(results, it, its), ""]
        if any(finals(results, it, "commonsense", m) for m in proto.METHODS):
            body += ["Commonsense accuracy per task at the best rate:", "", task_table(results, it), "",
                     "Effective rank of the learned ΔW by module type, commonsense at the best rate "
                     "(rank>1% / entropy rank, mean over the 30 layers and the seeds; cap = min(d_out, d_in)):",
                     "", rank_table(results, it, "commonsense", proto.METHODS), ""]
        body += comparisons(results, it, its) + ["", targets(results, it, its), ""]
    sweeps = [line for it in proto.ITERS for line in sweep_lines(results, it, names)]
    if sweeps:
        body += ["### Learning-rate sweep (final validation loss, first seed)", "",
                 "| steps | dataset | method | rate: validation loss |", "|---|---|---|---|", *sweeps, ""]
    body.append(END)
    section = "\n".join(body) + "\n"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write(path, lambda t: t.write_text(text))


def check_quick(results: dict, record: Path) -> bool:
    """The retrained quick runs against the record's runs of the same key."""
    recorded = {}
    lines = record.read_text().splitlines() if record.is_file() else []
    for line in filter(str.strip, lines):
        entry = json.loads(line)
        recorded[entry["key"]] = entry["run"]
    ok, compared = True, 0
    for r in results["runs"]:
        ref = recorded.get(r["key"])
        name = f"{r['iters']} steps {r['dataset']} {r['method']} lr {fmt_lr(r['lr'])} seed {r['seed']}"
        if ref is None or "test_loss" not in ref:
            print(f"  {name}: not (yet) in the record, nothing to compare")
            continue
        compared += 1
        pairs = [("val_loss", r["val_loss"], ref["val_loss"]), ("test_loss", r.get("test_loss"), ref["test_loss"])]
        if isinstance(ref.get("accuracy"), dict):
            pairs.append(("accuracy", _acc(r, ref["accuracy"]), _acc(ref, ref["accuracy"])))
        same = all(a is not None and abs(a - b) <= proto.TOLERANCE for _, a, b in pairs)
        ok &= same
        print(f"  {name}: " + ", ".join(f"{k} {a:.4f} vs {b:.4f}" for k, a, b in pairs if a is not None)
              + (": consistent" if same else ": DIFFERENT"))
    ok = ok and compared > 0
    print(f"Quick run vs {record}: " + (f"consistent on the {compared} recorded run(s)" if ok
                                       else "NOT consistent, or nothing recorded to compare"))
    return ok
