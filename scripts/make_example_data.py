"""Write the example dataset bundled with smoa_mlx (smoa_mlx/bundled/{train,valid,test}.jsonl).

What it teaches: given a two-sentence story, fill in a fixed card
`Who: <name>. What: <thing>. Where: <place>.`, copying the three fields out of stories
of many shapes (the feeling each story also names is a distractor). The words are TinyStories English, so the bundled
base model (stories260K, which knows nothing else) learns it in the default run of
`python -m smoa_mlx.train`, about a minute on a CPU; any chat model learns it too.

Completion (`prompt`/`completion`) records, as mlx-lm reads them: a model with a chat
template sees them as one user turn and one assistant turn, a base model as the prompt
followed by the completion; with `--mask-prompt` the loss covers the card only.
Deterministic: the same vocabularies and seed give byte-identical files (a test checks
that the bundled files are this script's output).

    python scripts/make_example_data.py [--out smoa_mlx/bundled]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "smoa_mlx" / "bundled"
SIZES = {"train": 300, "valid": 40, "test": 40}
SEED = 20250314

GIRLS = ["Lily", "Sue", "Mia", "Anna", "Lucy", "Amy", "Sara", "Emma", "Molly", "Jill",
         "Zoe", "Sally", "Daisy"]
BOYS = ["Tom", "Ben", "Max", "Tim", "Sam", "Jack", "Bob", "Jake", "Mike", "Timmy", "Billy",
        "Mark", "Joe"]
THINGS = ["ball", "kite", "doll", "book", "cake", "box", "hat", "toy car", "teddy bear",
          "apple", "flower", "bike", "boat", "balloon", "drum", "shell", "rock", "stick",
          "cookie", "cup"]
PLACES = ["park", "garden", "house", "forest", "beach", "school", "kitchen", "lake", "farm",
          "zoo", "shop", "yard", "river", "hill"]
FEELINGS = ["happy", "sad", "scared", "angry", "excited", "tired", "surprised", "proud"]

# {p} name, {s}/{S} she/he, {o} her/him, {t} the thing with its article, {l} place, {f} feeling.
STORIES = [
    "One day, {p} found {t} in the {l}. {S} was very {f}.",
    "{p} went to the {l} and saw {t}. {S} felt {f}.",
    "In the {l}, {p} played with {t}. It made {o} {f}.",
    "{p} was {f} because {s} lost {t} at the {l}.",
    "At the {l}, {p} got {t} from Mom. {S} was so {f}!",
    "{p} took {t} to the {l}. {S} felt {f} all day.",
    "There was {t} in the {l}. {p} saw it and felt {f}.",
    "Once upon a time, {p} had {t}. {S} took it to the {l} and was {f}.",
]


def article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def make_record(rng: random.Random) -> dict:
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    thing = article(rng.choice(THINGS))
    place, feeling = rng.choice(PLACES), rng.choice(FEELINGS)
    pronoun = "she" if girl else "he"
    story = rng.choice(STORIES).format(p=name, s=pronoun, S=pronoun.capitalize(),
                                       o="her" if girl else "him", t=thing, l=place, f=feeling)
    return {"prompt": f"Story: {story}\n",
            "completion": f"Who: {name}. What: {thing}. Where: the {place}."}


def make_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Distinct stories, split in a fixed order: no story is in two splits."""
    rng, seen, records = random.Random(seed), set(), []
    while len(records) < sum(SIZES.values()):
        record = make_record(rng)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            records.append(record)
    splits, start = {}, 0
    for name, size in SIZES.items():
        splits[name], start = records[start:start + size], start + size
    return splits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="Output directory.")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in make_splits().items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (args.out / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        print(f"{args.out / name}.jsonl: {len(records)} records, {len(lines.encode())} bytes")


if __name__ == "__main__":
    main()
