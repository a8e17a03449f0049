"""One mlx-lm config trained by `mlx_lm.lora` and by `python -m smoa_mlx.train`, side by side.

    python scripts/mlx_lm_side_by_side.py --work /tmp/side

Two cases on the bundled stories260K model and example data (as text: mlx-lm's
prompt/completion format needs a chat template, which stories260K has none of):
`full`, every update on the same 40 examples (batch 40), so the data order cannot
matter and the runs must agree to float precision; `batches`, batch 4 over 300
examples with mlx-lm's cosine_decay schedule, where the two trainers visit the batches
in different orders. The configs leave out most keys, so both take mlx_lm.lora's
defaults (adam, scale 20, ...). mlx_lm.lora runs twice: as it is, and with its loss mask
ending at each row's last token (its `default_loss` also scores the first padding
position after the EOS, a target of token 0; smoa-mlx's loss does not). Prints the
trainable parameters, the learning rates, the losses and the final adapters' distance.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "smoa_mlx" / "bundled"
CASES = {
    "full": {"batch_size": 40, "iters": 60, "learning_rate": 2e-4, "steps_per_report": 5,
             "steps_per_eval": 20},
    "batches": {"batch_size": 4, "iters": 300, "steps_per_report": 25, "steps_per_eval": 50,
                "lr_schedule": {"name": "cosine_decay", "warmup": 20, "warmup_init": 1e-6,
                                "arguments": [3e-4, 280, 1e-5]}},
}
SEEDS = {"full": [0], "batches": [0, 1, 2]}  # seeds change the batch order (and nothing else here)


def text_data(out: Path, train_rows: int | None) -> Path:
    """The bundled prompt/completion data as mlx-lm text records."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        rows = [json.loads(x) for x in (BUNDLED / f"{split}.jsonl").read_text().splitlines()]
        rows = rows[:train_rows] if split == "train" and train_rows else rows
        (out / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    return out


def write_config(work: Path, case: str, seed: int) -> Path:
    import yaml

    data = text_data(work / f"data-{case}", 40 if case == "full" else None)
    config = {"model": str(BUNDLED / "stories260K"), "data": str(data), "train": True,
              "fine_tune_type": "lora", "num_layers": -1, "val_batches": -1, "seed": seed,
              **CASES[case]}
    path = work / f"{case}-{seed}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fixed_loss(model, batch, lengths):
    """mlx_lm.tuner.trainer.default_loss with `steps < length` for its `steps <= length`."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks


def run_mlx_lm(config: str, adapter_path: str, fixed: bool) -> None:
    """mlx_lm.lora's own main (its config merging and defaults), recording its reports."""
    import mlx_lm.lora as lora
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback

    records = []

    class Record(TrainingCallback):
        def on_train_loss_report(self, info):
            records.append({"type": "train", **info})

        def on_val_loss_report(self, info):
            records.append({"type": "val", **info})

    if fixed:
        lora.train = functools.partial(trainer.train, loss=fixed_loss)
    lora.get_reporting_callbacks = lambda *args, **kwargs: Record()
    sys.argv = ["mlx_lm.lora", "-c", config, "--adapter-path", adapter_path]
    lora.main()
    (Path(adapter_path) / "reports.json").write_text(json.dumps(records))


def adapter(path: Path) -> dict:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def train_all(work: Path, case: str, seed: int) -> dict:
    """Train `case` with both trainers (mlx-lm as is only at seed 0); returns the run directories."""
    config = write_config(work, case, seed)
    runs = {"smoa-mlx": work / f"{case}-{seed}-ours", "mlx-lm fixed": work / f"{case}-{seed}-mlx-lm-fixed"}
    if seed == 0:
        runs["mlx-lm as is"] = work / f"{case}-{seed}-mlx-lm"
    subprocess.run([sys.executable, "-m", "smoa_mlx.train", "-c", str(config), "--adapter-path",
                    str(runs["smoa-mlx"])], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    for name in list(runs)[1:]:
        subprocess.run([sys.executable, __file__, "--mlx-lm", str(config), str(runs[name])]
                       + (["--fixed"] if "fixed" in name else []), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return runs


def reports(runs: dict, kind: str) -> dict:
    """{run: {updates done: record}} of the train or val reports. mlx-lm validates before
    the update of its iteration, and records that as the updates done."""
    out = {}
    for name, path in runs.items():
        if name == "smoa-mlx":
            rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
            out[name] = {r["step"]: r for r in rows if r["type"] == kind}
        else:
            rows = json.loads((path / "reports.json").read_text())
            out[name] = {r["iteration"]: r for r in rows if r["type"] == kind}
    return out


def compare(work: Path, case: str) -> None:
    seeds = {seed: train_all(work, case, seed) for seed in SEEDS[case]}
    runs = seeds[0]
    weights = {n: adapter(p) for n, p in runs.items()}
    shapes = {n: {k: v.shape for k, v in w.items()} for n, w in weights.items()}
    print(f"\n== {case}: {work / f'{case}-0.yaml'}")
    print("trainable parameters: " + ", ".join(f"{n} {sum(v.size for v in w.values())}"
                                               for n, w in weights.items())
          + f"; same tensor names and shapes: {all(s == shapes['smoa-mlx'] for s in shapes.values())}")
    train = reports(runs, "train")
    steps = sorted(train["smoa-mlx"])
    lr = max(abs(train["smoa-mlx"][s]["learning_rate"] / train[n][s]["learning_rate"] - 1)
             for s in steps for n in runs)
    print(f"learning rate at every report: largest relative difference {lr:.1e}")
    print("seed 0, train loss at update: " + "  ".join(f"{n:>12}" for n in train))
    for s in steps:
        print(f"{s:29d}  " + "  ".join(f"{train[n][s]['train_loss']:12.6f}" for n in train))
    print("seed 0, val loss by updates done:")
    for n, v in reports(runs, "val").items():
        print(f"  {n:>12}: " + ", ".join(f"{k}: {r['val_loss']:.5f}" for k, r in sorted(v.items())))
    scale = max(float(np.abs(v).max()) for v in weights["smoa-mlx"].values())
    for n in list(runs)[1:]:
        diff = max(float(np.abs(weights[n][k] - weights["smoa-mlx"][k]).max()) for k in weights[n])
        print(f"seed 0, final adapter: largest |smoa-mlx - {n}| {diff:.1e} (largest weight {scale:.1e})")
    if len(seeds) > 1:
        for n in ("smoa-mlx", "mlx-lm fixed"):
            final = [max(reports(r, "val")[n].items())[1]["val_loss"] for r in seeds.values()]
            print(f"final val loss, seeds {list(seeds)}: {n:>12} "
                  + " ".join(f"{x:.4f}" for x in final) + f" (mean {np.mean(final):.4f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/mlx-lm-side-by-side"))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--mlx-lm", nargs=2, metavar=("CONFIG", "ADAPTER_PATH"), help=argparse.SUPPRESS)
    p.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mlx_lm:
        return run_mlx_lm(*args.mlx_lm, fixed=args.fixed)
    args.work.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        compare(args.work, case)


if __name__ == "__main__":
    main()
