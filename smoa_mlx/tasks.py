"""Evaluation tasks of the LLM-Adapters / DoRA protocol: prompts, loaders, answer extraction.

Pure functions only (no model): `load_items(task, path)` turns a dataset file into
`Item`s, `extract_label` / `extract_number` read an answer out of a generated reply
with the rules of LLM-Adapters' `commonsense_evaluate.py` and `evaluate.py`
(AGI-Edgerunners/LLM-Adapters): the first occurrence of a label word, matched
case-sensitively; for math, the last number after removing commas, correct when
within 1e-3 of the label.

One deliberate difference: LLM-Adapters' evaluators indent the lines of their
prompt with the source code's 16 spaces; this module uses the clean alpaca prompt
their `finetune.py` trains on, which is what a model fine-tuned on their data expects.
"""

from __future__ import annotations

import bz2
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .data import alpaca_prompt, decode_text, json_type, read_records, read_text
from .errors import ConfigError, DataError, MissingFileError

HELLASWAG_INSTRUCTION = (
    "Please choose the correct ending to complete the given sentence: {ctx}\n\n{endings}\n\n"
    "Answer format: ending1/ending2/ending3/ending4"
)
# The label words LLM-Adapters' extract_answer searches for, per task.
LABELS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
CHOICE_TASKS = tuple(LABELS)
TASKS = CHOICE_TASKS + ("gsm8k", "perplexity")
MATH_TOLERANCE = 1e-3
_NUMBER = re.compile(r"-?\d+\.?\d*")
_OPTION = re.compile(r"\b(Solution|Answer|Option|Ending)([1-9]): ?")
_FORMAT = "Answer format:"


@dataclass
class Item:
    """One test question: the prompt, the gold answer, and the candidate answers."""

    prompt: str
    answer: str
    labels: list[str] = field(default_factory=list)   # e.g. answer1..answer4 (choice tasks)
    options: list[str] = field(default_factory=list)  # the candidates' own texts, same order


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
    return task


def extract_label(task: str, text: str) -> str:
    """The first label word of `task` in `text`, or '' (LLM-Adapters' extract_answer)."""
    found = re.findall("|".join(LABELS[task]), text.strip())
    return found[0] if found else ""


def extract_number(text: str) -> float:
    """The last number in `text` with commas removed, or inf (LLM-Adapters' extract_answer_number)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else math.inf


def numbers_match(predicted: float, answer: str) -> bool:
    return abs(float(answer) - predicted) <= MATH_TOLERANCE


def parse_options(instruction: str) -> tuple[list[str], list[str]]:
    """(labels, option texts) of an LLM-Adapters multiple-choice instruction.

    The labels come from its closing "Answer format: a/b/..." line; the texts are
    what follows each "Answer1:" / "Solution1:" / "Option1:" / "Ending1:" marker.
    Instructions without markers (boolq) use the labels as the texts.
    """
    cut = instruction.rfind(_FORMAT)
    if cut < 0:
        raise DataError(f"no {_FORMAT!r} line in instruction {instruction[:60]!r}...")
    labels = instruction[cut + len(_FORMAT):].strip().split("/")
    body = instruction[:cut]
    marks = [m for m in _OPTION.finditer(body) if m.group(1).lower() + m.group(2) in labels]
    if not marks:
        return labels, list(labels)
    ends = [m.start() for m in marks[1:]] + [len(body)]
    found = {m.group(1).lower() + m.group(2): body[m.end():end].strip() for m, end in zip(marks, ends)}
    missing = [label for label in labels if label not in found]
    if missing:
        raise DataError(f"option {missing[0]} not found in instruction {instruction[:60]!r}...")
    return labels, [found[label] for label in labels]


def _records(path) -> list[tuple[str, object]]:
    """(location, record) of a JSON list (.json) or JSON lines (.jsonl) file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: dataset file not found")
    records = list(read_records(path))
    if not records:
        raise DataError(f"{path}: empty, no records")
    return records


def _field(record, key: str, where: str):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type(record)}")
    if not isinstance(record.get(key), str):
        got = json_type(record[key]) if key in record else "nothing"
        raise DataError(f"{where}: {key!r} must be a string, got {got}")
    return record[key]


def read_hellaswag_text(path) -> list[dict]:
    """llama.cpp's HellaSwag text format (bz2 or plain): 6 lines per item, namely
    "activity_label: ctx", the gold label 0-3, and the 4 endings."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: dataset file not found")
    data = path.read_bytes()
    if path.suffix == ".bz2":
        try:
            data = bz2.decompress(data)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a valid bz2 file ({e})") from None
    lines = decode_text(path, data).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}: empty, no items")
    if len(lines) % 6:
        raise DataError(f"{path}:{len(lines)}: {len(lines)} lines is not a multiple of 6 "
                        "(context, label, 4 endings per item)")
    items = []
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i:i + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{i + 2}: gold label {gold!r} is not 0-3")
        items.append({"ctx": ctx, "label": int(gold), "endings": endings})
    return items


def hellaswag_record(ctx: str, label: int, endings: list[str]) -> dict:
    """The LLM-Adapters record for one HellaSwag item (their commonsense_170k format)."""
    listed = " ".join(f"Ending{k + 1}: {e}" for k, e in enumerate(endings))
    return {"instruction": HELLASWAG_INSTRUCTION.format(ctx=ctx, endings=listed), "input": "",
            "answer": f"ending{label + 1}"}


def _input(record: dict, where: str) -> str:
    """LLM-Adapters' optional "input" (absent, null or a string)."""
    value = record.get("input") or ""
    if not isinstance(value, str):
        raise DataError(f"{where}: 'input' must be a string, got {json_type(value)}")
    return value


def _gsm8k_item(record, where: str) -> Item:
    if isinstance(record, dict) and "question" in record:  # openai/grade-school-math jsonl
        question = _field(record, "question", where)
        solution = _field(record, "answer", where)
        if "####" not in solution:
            raise DataError(f"{where}: answer has no '#### <number>' line")
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        prompt = alpaca_prompt(question)
    else:  # LLM-Adapters json
        prompt = alpaca_prompt(_field(record, "instruction", where), _input(record, where))
        answer = str(record.get("answer", ""))
    try:
        float(answer)
    except ValueError:
        raise DataError(f"{where}: answer {answer!r} is not a number") from None
    return Item(prompt, answer)


def load_items(task: str, path, limit: int | None = None) -> list[Item]:
    """The first `limit` test items of `task` from `path` (any format the task accepts)."""
    check_task(task)
    path = Path(path)
    if task == "perplexity":
        raise ConfigError("perplexity reads documents, not items: use read_documents")
    if task == "hellaswag" and path.suffix in (".txt", ".bz2"):
        records = [(f"{path}:{6 * i + 1}", hellaswag_record(**r))
                   for i, r in enumerate(read_hellaswag_text(path)[:limit])]
    else:
        records = _records(path)[:limit]
    items = []
    for where, record in records:
        if task == "gsm8k":
            items.append(_gsm8k_item(record, where))
            continue
        instruction = _field(record, "instruction", where)
        answer = _field(record, "answer", where)
        try:
            labels, options = parse_options(instruction)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if answer not in labels:
            raise DataError(f"{where}: answer {answer!r} is not one of {'/'.join(labels)}")
        items.append(Item(alpaca_prompt(instruction, _input(record, where)), answer, labels, options))
    return items


def read_documents(path, limit: int | None = None) -> list[str]:
    """Documents for perplexity: a text file split at `<|endoftext|>` (or one document),
    or JSON lines / a JSON list of {"text": ...} records."""
    path = Path(path)
    if path.suffix in (".json", ".jsonl"):
        docs = [_field(r, "text", where) for where, r in _records(path)]
    else:
        if not path.is_file():
            raise MissingFileError(f"{path}: dataset file not found")
        docs = read_text(path).split("<|endoftext|>")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{path}: empty, no text found")
    return docs[:limit]
