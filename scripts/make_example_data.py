"""Write the example dataset bundled with smoa_mlx (smoa_mlx/bundled/{train,valid,test}.jsonl).

What it teaches: asked "Extract the event as JSON: <sentence>", answer with exactly one
line `{"person": ..., "event": ..., "city": ..., "date": "YYYY-MM-DD"}`: fixed keys,
fields copied from sentences of many shapes, dates normalised to ISO. An Instruct model
answers this in its own verbose way before training and in the trained format after a
few minutes of fine-tuning, which is easy to check by chatting with it.

Chat (`messages`) records, so `--mask-prompt` and the model's chat template apply.
Deterministic: the same vocabularies and seed give byte-identical files (a test checks
that the bundled files are this script's output).

    python scripts/make_example_data.py [--out smoa_mlx/bundled]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "smoa_mlx" / "bundled"
SIZES = {"train": 300, "valid": 40, "test": 40}
SEED = 20250314
INSTRUCTION = "Extract the event as JSON: "

FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sofia",
         "Kwame", "Elena", "Ravi", "Chloe", "Mateo", "Hannah", "Yusuf", "Ingrid", "Diego",
         "Mei", "Lucas", "Amara", "Felix", "Nadia", "Oscar", "Zara", "Henrik", "Leila",
         "Bruno", "Grace", "Tariq"]
LAST = ["Lopez", "Carter", "Tanaka", "Haddad", "Fischer", "Silva", "Sharma", "Nguyen",
        "Rossi", "Mensah", "Petrova", "Iyer", "Dubois", "Garcia", "Becker", "Demir",
        "Larsen", "Moreno", "Chen", "Martin", "Okafor", "Wagner", "Karimi", "Novak",
        "Ahmed", "Berg", "Rahimi", "Costa", "Kim", "Walsh"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Berlin", "Lima", "Mumbai", "Hanoi",
          "Rome", "Accra", "Sofia", "Chennai", "Lyon", "Seville", "Hamburg", "Istanbul",
          "Oslo", "Bogota", "Shanghai", "Montreal", "Lagos", "Vienna", "Tehran", "Prague",
          "Cairo", "Bergen", "Porto", "Seoul", "Dublin", "Melbourne"]
EVENTS = ["concert", "workshop", "conference", "book signing", "charity dinner",
          "art exhibition", "wedding", "birthday party", "marathon", "hackathon",
          "chess tournament", "farewell party", "film screening", "product launch",
          "poetry reading", "cooking class", "yoga retreat", "job fair", "science fair",
          "board game night"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# {p} person, {a} the event with its article, {e} the bare event, {c} city, {d} date.
SENTENCES = [
    "{p} is hosting {a} in {c} on {d}.",
    "On {d}, {p} will attend {a} in {c}.",
    "{p} has organised {a} in {c} for {d}.",
    "Join {p} at {a} in {c} on {d}!",
    "{c} welcomes {p} for {a} on {d}.",
    "Save the date: {a} with {p}, {d}, {c}.",
    "Reminder: the {e} of {p} takes place in {c} on {d}.",
    "{p} flies to {c} on {d} for {a}.",
    "In {c}, {p} is planning {a} for {d}.",
    "{d}: {a} in {c}, organised by {p}.",
    "Dear all, {p} invites you to {a} on {d} in {c}.",
    "Don't forget that {p} goes to {a} in {c} on {d}.",
    "There will be {a} in {c} on {d}, and {p} is running it.",
    "Big news from {c}: {p} confirmed {a} for {d}.",
]


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def render_date(day: datetime.date, style: int) -> str:
    month, weekday = MONTHS[day.month - 1], WEEKDAYS[day.weekday()]
    suffix = "th" if 11 <= day.day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day.day % 10, "th")
    return [
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{weekday}, {month} {day.day}, {day.year}",
        f"the {day.day}{suffix} of {month} {day.year}",
        f"{weekday} {day.day} {month[:3]} {day.year}",
    ][style]


def make_record(rng: random.Random) -> tuple[str, dict]:
    person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    event, city = rng.choice(EVENTS), rng.choice(CITIES)
    day = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(730))
    sentence = rng.choice(SENTENCES).format(
        p=person, a=article(event), e=event, c=city, d=render_date(day, rng.randrange(5))
    )
    answer = {"person": person, "event": event, "city": city, "date": day.isoformat()}
    return sentence, {"messages": [
        {"role": "user", "content": INSTRUCTION + sentence},
        {"role": "assistant", "content": json.dumps(answer)},
    ]}


def make_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """Distinct sentences, split in a fixed order: no sentence is in two splits."""
    rng, seen, records = random.Random(seed), set(), []
    while len(records) < sum(SIZES.values()):
        sentence, record = make_record(rng)
        if sentence not in seen:
            seen.add(sentence)
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
