"""The fixed train/valid/held-out splits of the three datasets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import DATASETS, MAX_SEQ, TRAIN_SIZE, VALID_SIZE


@dataclass
class Dataset:
    name: str
    data: Path  # train/valid/test files in a format smoa_mlx.data reads
    mask_prompt: bool
    about: str
    sizes: dict = field(default_factory=dict)
    task: str | None = None  # scored by log-likelihood on `items` (the test split)
    items: list = field(default_factory=list)
    tasks: dict = field(default_factory=dict)  # several tasks' items (the SmolLM2 study), by task


def _write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fits(tokenizer, record) -> bool:
    """No truncation at MAX_SEQ: the training data adds EOS, the inputs drop the last token."""
    return len(tokenizer.encode(record["prompt"] + record["completion"])) <= MAX_SEQ


def prepare(name: str, src: Path, dst: Path, tokenizer) -> Dataset:
    """Write a fixed train/valid/test split of one dataset under `dst`."""
    out = dst / name
    if name == "wikisql":
        d = src / "wikisql_mlx"
        sizes = {"train": _write_jsonl(out / "train.jsonl", _jsonl(d / "train.jsonl")),
                 "valid": _write_jsonl(out / "valid.jsonl", _jsonl(d / "valid.jsonl")[:VALID_SIZE]),
                 "test": _write_jsonl(out / "test.jsonl", _jsonl(d / "test.jsonl"))}
        about = ("wikisql_mlx (mlx-examples' LoRA data), text format, loss on every token; "
                 f"valid = first {VALID_SIZE} of valid.jsonl, held-out = test.jsonl")
        return Dataset(name, out, False, about, sizes)
    if name == "gsm8k":
        def pc(r):
            return {"prompt": f"Question: {r['question']}\nAnswer: ", "completion": r["answer"]}

        train = [x for x in map(pc, _jsonl(src / "gsm8k" / "train.jsonl")) if _fits(tokenizer, x)]
        test = [x for x in map(pc, _jsonl(src / "gsm8k" / "test.jsonl")) if _fits(tokenizer, x)]
        sizes = {"train": _write_jsonl(out / "train.jsonl", train[:TRAIN_SIZE]),
                 "valid": _write_jsonl(out / "valid.jsonl", train[TRAIN_SIZE:TRAIN_SIZE + VALID_SIZE]),
                 "test": _write_jsonl(out / "test.jsonl", test[:100])}
        about = (f"GSM8K (openai/grade-school-math) rationales as prompt/completion, loss on the "
                 f"rationale; only problems that fit {MAX_SEQ} tokens (no truncation): train = the "
                 f"first {TRAIN_SIZE} of train.jsonl, valid = the next {VALID_SIZE}, held-out = the "
                 "first 100 of test.jsonl")
        return Dataset(name, out, True, about, sizes)
    if name == "boolq":
        from smoa_mlx.tasks import load_items

        d = src / "llm_adapters" / "boolq"
        train = json.loads((d / "train.json").read_text())
        test = json.loads((d / "test.json").read_text())[:200]
        sizes = {"train": _write_jsonl(out / "train.jsonl", train[:TRAIN_SIZE]),
                 "valid": _write_jsonl(out / "valid.jsonl", train[TRAIN_SIZE:TRAIN_SIZE + VALID_SIZE]),
                 "test": _write_jsonl(out / "test.jsonl", test)}
        about = (f"BoolQ (LLM-Adapters alpaca format), loss on the reply \"the correct answer is "
                 f"true/false\"; train = the first {TRAIN_SIZE} of train.json, valid = the next "
                 f"{VALID_SIZE}, held-out = the first 200 of test.json, also scored by "
                 "log-likelihood of the two replies (smoa_mlx.evaluate, --choices label)")
        items = load_items("boolq", out / "test.jsonl")
        return Dataset(name, out, True, about, sizes, "boolq", items)
    raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")

