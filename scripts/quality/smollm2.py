"""The SmolLM2-135M-Instruct study (issue 23): the SMoA paper's commonsense protocol in
miniature on a real 576-wide model, plus wikisql and gsm8k held-out loss.

Same rules as the stories260K study (`protocol.py`: per (steps, dataset, method) a rate
sweep with the first seed, the next ladder rung added while the best is at an end, then
the other seeds at the best rate and at the default rate), with its own sizes.

Sizing (measured before the study was fixed; the full study must fit a few hours on this
2-core machine). One update of 4 x ~150 tokens took 9-16 s for LoRA r=8 and 12-17 s for
SMoA r=8 K=2 (fast BLAS, side by side in one process) while three other helpers loaded
the 2 cores (load ~6); unloaded the reference is ~3 s for 4 x 220 tokens, so ~2 s for
this study's ~100-150-token examples. Counted in FLOPs (107M non-embedding weights, a
49152 x 576 head), scoring one commonsense item (~100-token prompt) costs ~0.09 of an
update and the 32-example validation ~2.5 updates; in the first attempt (100 items per
task) the base model's 700 items took over 15 min under that load, so:
- batch 4, at most 256 tokens (every commonsense item fits; gsm8k keeps the problems that
  fit, as in the stories study), alpha 8, q/k/v/up/down in all 30 layers;
- lengths 40 and 120 updates; the longer one on commonsense only (wikisql and gsm8k at
  40): 5 methods x (3 datasets x ~7 runs x 40 + 1 dataset x ~7 runs x 120) ~ 8,400
  updates, plus ~50 measured commonsense runs x ~50 updates' worth of scoring and
  held-out loss, plus validation at 0, 40, 80, 120: ~11,000 update-equivalents, ~4 h
  with 2 worker processes on an unloaded machine (several times that under load);
- rates: three ~x3 apart per method (LoRA/DoRA 1e-3/3e-3/1e-2, around the issue's
  wikisql probe where LoRA's best was 3e-3; SMoA/HiRA 3e-3/1e-2/3e-2, around SMoA's 1e-2),
  at most one more rung; the default rates too (SMoA's, 1e-2 at 576, is a grid point);
- 3 seeds at the best rate (and at the default rate where it lies inside the grid);
- accuracy on the first 50 test items of each of 7 tasks (binomial standard error
  <= 0.071 per task, <= 0.035 on the 4-task in-domain mean of 200 items; paired method
  differences on the same items vary less); validation on 32 held-back training
  examples (the rate choice), held-out loss on the 200 in-domain test items.
Finished runs are appended to `records/smollm2.jsonl` (in the repository) and read
back, so an interrupted study, even in a fresh checkout, loses only the runs in flight.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from .datasets import Dataset, _fits, _write_jsonl

ALPHA, BATCH, MAX_SEQ, EVAL_EVERY = 8.0, 4, 256, 40
VALID_SIZE, TRAIN_PER_TASK, TEST_ITEMS = 32, 500, 50
SEEDS = (0, 1, 2)
ITERS = (40, 120)
LONG_DATASETS = ("commonsense",)  # the datasets also run at the longer length
DATASETS = ("commonsense", "wikisql", "gsm8k")
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
METHODS = {
    "LoRA r=8": {"method": "lora", "rank": 8},
    "SMoA r=8 K=2": {"method": "smoa", "rank": 8, "num_blocks": 2},
    "SMoA r=16 K=2": {"method": "smoa", "rank": 16, "num_blocks": 2},  # LoRA r=8's parameter count
    "DoRA r=8": {"method": "dora", "rank": 8},
    "HiRA r=8": {"method": "hira", "rank": 8, "num_blocks": 1},
}
GRID = {
    "LoRA r=8": (1e-3, 3e-3, 1e-2),
    "DoRA r=8": (1e-3, 3e-3, 1e-2),
    "SMoA r=8 K=2": (3e-3, 1e-2, 3e-2),
    "SMoA r=16 K=2": (3e-3, 1e-2, 3e-2),
    "HiRA r=8": (3e-3, 1e-2, 3e-2),
}
MAX_EXTEND = 1
HIDDEN = 576
# The trainer's own defaults at this width (smoa_mlx.options.DEFAULT_LR, lr_scale.default_rate).
TRAIN_TASKS = ("ARC-Easy", "ARC-Challenge", "openbookqa", "boolq")
TRANSFER_TASKS = ("piqa", "social_i_qa", "winogrande")
# SMOA_STUDY_RECORD: another record file (smoke tests must not touch the study's).
RECORD = Path(os.environ.get("SMOA_STUDY_RECORD") or Path(__file__).resolve().parent / "records" / "smollm2.jsonl")
# A float32 HF-layout copy of SmolLM2-135M-Instruct.Q4_1.gguf made by transformers 5.25
# (make_smollm2_f32.py rebuilds it byte for byte: the record keys runs by its config hash).
# Checked: mlx-lm and transformers logits agree to 7e-5 (of 31); greedy answer "...is Paris."
DEFAULT_MODEL = Path("/work/cache/smollm2-f32")
QUICK = {"dataset": "commonsense", "iters": 40, "methods": ("LoRA r=8", "SMoA r=8 K=2")}
TOLERANCE = 0.01


def default_rates() -> dict:
    from types import SimpleNamespace

    from smoa_mlx.lr_scale import default_rate
    from smoa_mlx.options import DEFAULT_LR

    width = SimpleNamespace(args=SimpleNamespace(hidden_size=HIDDEN))
    return {label: DEFAULT_LR[o["method"]] or default_rate(width) for label, o in METHODS.items()}


DEFAULT_RATE = default_rates()


def lengths(dataset: str) -> tuple:
    return ITERS if dataset in LONG_DATASETS else ITERS[:1]


def prepare(name: str, src: Path, dst: Path, tokenizer) -> Dataset:
    """Write one dataset's fixed train/valid/test split under `dst`."""
    from smoa_mlx.tasks import load_items

    out = dst / name
    if name == "commonsense":
        d = src / "llm_adapters"
        train, valid, test, items = [], [], [], {}
        for task in TRAIN_TASKS:
            fits = [r for r in json.loads((d / task / "train.json").read_text())
                    if _fits(tokenizer, {"prompt": _prompt(r), "completion": r["output"]})]
            train += fits[:TRAIN_PER_TASK]
            valid += fits[TRAIN_PER_TASK:TRAIN_PER_TASK + VALID_SIZE // len(TRAIN_TASKS)]
        for task in TRAIN_TASKS + TRANSFER_TASKS:
            records = json.loads((d / task / "test.json").read_text())[:TEST_ITEMS]
            _write_jsonl(out / "items" / f"{task}.jsonl", records)
            items[task] = load_items(task, out / "items" / f"{task}.jsonl")
            if task in TRAIN_TASKS:
                test += records
        random.Random(0).shuffle(train)  # a mix, not four blocks (the batcher sorts by length anyway)
        sizes = {"train": _write_jsonl(out / "train.jsonl", train),
                 "valid": _write_jsonl(out / "valid.jsonl", valid),
                 "test": _write_jsonl(out / "test.jsonl", test)}
        about = (f"LLM-Adapters' ARC-Easy, ARC-Challenge, OpenBookQA and BoolQ train splits (alpaca "
                 f"prompt, loss on the reply \"the correct answer is X\"): the first {TRAIN_PER_TASK} "
                 f"of each that fit {MAX_SEQ} tokens, mixed; valid = the next {VALID_SIZE // 4} of each; "
                 f"held-out loss on the first {TEST_ITEMS} test items of each; accuracy by "
                 f"log-likelihood of the label replies on those items and on the first {TEST_ITEMS} of "
                 "PIQA, SIQA and WinoGrande (transfer: not trained on)")
        return Dataset(name, out, True, about, sizes, tasks=items)
    if name in ("wikisql", "gsm8k"):  # the stories260K study's splits (valid 32, test 100)
        from .datasets import prepare as prepare_stories

        return prepare_stories(name, src, dst, tokenizer)
    raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")


def _prompt(record: dict) -> str:
    from smoa_mlx.data import alpaca_prompt

    return alpaca_prompt(record["instruction"], record.get("input") or "")
