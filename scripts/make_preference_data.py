"""Preference pairs from an LLM-Adapters multiple-choice set (offline): for each question,
chosen = the correct reply, rejected = a wrong option (drawn with a fixed seed), as
{"prompt", "chosen", "rejected"} records for `python -m smoa_mlx.train --train-mode dpo`.

The prompt is LLM-Adapters' alpaca prompt; the reply is LLM-Adapters' target, "the correct
answer is answerN", followed with --reply text by the option's own words (a signal a
small model can learn from in a few updates). train.jsonl comes from the set's train.json,
valid.jsonl and test.jsonl from the two halves of its test.json (held out).

    python scripts/make_preference_data.py ../shared/data/datasets/llm_adapters/ARC-Easy \\
        pref_arc --task ARC-Easy --train 512 --valid 128 --test 128
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoa_mlx.files import atomic_write  # noqa: E402
from smoa_mlx.tasks import load_items  # noqa: E402


def reply(label: str, text: str, with_text: bool) -> str:
    return f"the correct answer is {label}" + (f": {text}" if with_text and text != label else "")


def pairs(items, seed: int, with_text: bool) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for item in items:
        right = item.labels.index(item.answer)
        wrong = rng.choice([i for i in range(len(item.labels)) if i != right])
        chosen, rejected = (reply(item.labels[i], item.options[i], with_text) for i in (right, wrong))
        if chosen != rejected:  # identical option texts make no pair
            out.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="an LLM-Adapters task directory holding train.json and test.json")
    p.add_argument("out", help="output directory (train/valid/test.jsonl)")
    p.add_argument("--task", required=True, help="the task name (ARC-Easy, boolq, ...)")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--valid", type=int, default=128)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--reply", choices=("label", "text"), default="text")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    src, out = Path(a.source), Path(a.out)
    held = load_items(a.task, src / "test.json", a.valid + a.test)
    splits = {"train": load_items(a.task, src / "train.json", a.train),
              "valid": held[:a.valid], "test": held[a.valid:]}
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, items) in enumerate(splits.items()):
        records = pairs(items, a.seed + i, a.reply == "text")
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(out / f"{name}.jsonl", lambda t, text=text: t.write_text(text))
        print(f"{out / name}.jsonl: {len(records)} pairs")


if __name__ == "__main__":
    main()
