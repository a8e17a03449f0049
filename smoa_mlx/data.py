"""Training data: the dataset formats of `mlx_lm.lora` and LLM-Adapters -> token batches.

A split is `<split>.jsonl` (one JSON object a line) or `<split>.json` (a JSON list of
objects). Every record of a file has the same format, recognised by its keys:

  text         {"text"}                        loss on every token (no prompt to mask)
  completions  {"prompt", "completion"}        the tokenizer's chat template, as mlx-lm
                                               (plain concatenation if it has none)
  chat         {"messages": [{"role", "content"}, ...]}   chat template; the prompt is
                                               every message but the last
  alpaca       {"instruction", "output"} (+ "input", "answer")   LLM-Adapters' prompt

Unknown keys are refused (a typo must not silently pick another format). An empty
completion/output is allowed, as in mlx-lm and LLM-Adapters: it teaches the model to stop.
Everything is parsed and tokenized up front, so a bad record stops the run before
training with `file:line: what is wrong`. Batches are a pure function of (seed, step):
a resumed run only needs the step to continue on the exact same data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

BUNDLED_DATA = Path(__file__).parent / "bundled"
SUFFIXES = (".jsonl", ".json")
PAD_MULTIPLE = 8

# LLM-Adapters' `generate_prompt` (finetune.py), with its source-code indentation removed.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# format -> (required keys, optional keys)
FORMATS = {
    "text": ({"text"}, set()),
    "completions": ({"prompt", "completion"}, set()),
    "chat": ({"messages"}, set()),
    "alpaca": ({"instruction", "output"}, {"input", "answer"}),
}
_KNOWN = "text, prompt/completion, messages or instruction/input/output"
_JSON_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Example:
    tokens: list[int]  # BOS included when the tokenizer adds one
    prompt_len: int = 0  # the loss covers tokens[prompt_len:]; 0 = every token


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def _json_type(v) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _records(path: Path):
    """Yield (location, record): `file:line` for JSONL, `file:line: record i` for a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".json":
        yield from _json_list(path, text)
        return
    # str.splitlines would also split on U+2028 etc., which JSON allows inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _json_list(path: Path, text: str):
    """Scan a JSON list record by record, so each error names the line it is on."""
    decoder = json.JSONDecoder()

    def skip(pos):
        return _JSON_WS.match(text, pos).end()

    def where(pos):
        return f"{path}:{text.count(chr(10), 0, pos) + 1}"

    pos = skip(0)
    if pos == len(text):
        return
    if text[pos] != "[":
        raise ValueError(f"{where(pos)}: expected a JSON list of records, [{{...}}, ...]")
    pos, i = skip(pos + 1), 0
    if text.startswith("]", pos):
        pos = skip(pos + 1)
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield f"{where(pos)}: record {i}", record
            pos = skip(end)
            if text.startswith(",", pos):
                pos, i = skip(pos + 1), i + 1
            elif text.startswith("]", pos):
                pos = skip(pos + 1)
                break
            else:
                raise ValueError(
                    f"{where(pos)}: invalid JSON: expected ',' or ']' after record {i}")
    if pos != len(text):
        raise ValueError(f"{where(pos)}: invalid JSON: extra data after the list")


def record_format(record, loc: str) -> str:
    """The format a record's keys name; a ValueError at `loc` if they name none or several."""
    if not isinstance(record, dict):
        raise ValueError(f"{loc}: expected a JSON object, got {_json_type(record)}")
    keys = set(record)
    hits = [name for name, (req, opt) in FORMATS.items() if keys & (req | opt)]
    if not hits:
        raise ValueError(f"{loc}: unknown keys {sorted(keys)}; expected {_KNOWN}")
    if len(hits) > 1:
        raise ValueError(f"{loc}: keys {sorted(keys)} mix the {' and '.join(hits)} formats")
    required, optional = FORMATS[hits[0]]
    if missing := required - keys:
        raise ValueError(f"{loc}: missing key {sorted(missing)} of the {hits[0]} format")
    if extra := keys - required - optional:
        raise ValueError(f"{loc}: unknown key {sorted(extra)} in the {hits[0]} format")
    return hits[0]


def _string(record: dict, key: str, loc: str, empty_ok: bool = False) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{loc}: '{key}' must be a string, got {_json_type(value)}")
    if not empty_ok and not value.strip():
        raise ValueError(f"{loc}: '{key}' is empty")
    return value


def _messages(record: dict, loc: str, mask_prompt: bool) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{loc}: 'messages' must be a non-empty list, got {_json_type(messages)}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{loc}: messages[{j}] must be an object, got {_json_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"{loc}: messages[{j}] has no '{key}'")
            _string(m, key, f"{loc}: messages[{j}]", empty_ok=key == "content")
    if mask_prompt and messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{loc}: the last message is from '{messages[-1]['role']}'; masking the prompt "
            "trains on the last message, which must be the assistant's"
        )
    return messages


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the shared start of two token lists (where a prompt ends inside a
    templated conversation; how much of a KV cache is still valid)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _plain(tokenizer, prompt: str, completion: str, mask_prompt: bool) -> Example:
    tokens = list(tokenizer.encode(prompt + completion))
    eos = tokenizer.eos_token_id
    if eos is not None and (not tokens or tokens[-1] != eos):
        tokens.append(eos)
    # Tokens can merge across the boundary; the loss starts where the prompt's own tokens end.
    offset = common_prefix(tokenizer.encode(prompt), tokens) if mask_prompt and prompt else 0
    return Example(tokens, offset)


def _chat(tokenizer, messages: list[dict], mask_prompt: bool, loc: str) -> Example:
    try:
        tokens = list(tokenizer.apply_chat_template(messages, return_dict=False))
        prompt = tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, return_dict=False
        ) if mask_prompt else []
    except Exception as e:  # templates raise on conversations they do not accept
        raise ValueError(f"{loc}: the tokenizer's chat template rejects it: {e}") from None
    # The template ends the turn itself (mlx-lm adds no EOS to chat data).
    return Example(tokens, common_prefix(prompt, tokens))


def _example(record: dict, fmt: str, tokenizer, mask_prompt: bool, chat: bool, loc: str):
    if fmt == "text":
        example = _plain(tokenizer, "", _string(record, "text", loc), False)
    elif fmt == "alpaca":
        prompt = alpaca_prompt(_string(record, "instruction", loc),
                               _string(record, "input", loc, empty_ok=True))
        example = _plain(tokenizer, prompt, _string(record, "output", loc, empty_ok=True), mask_prompt)
    elif fmt == "completions":
        prompt = _string(record, "prompt", loc, empty_ok=True)
        completion = _string(record, "completion", loc, empty_ok=True)
        if chat:
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion}]
            example = _chat(tokenizer, messages, mask_prompt, loc)
        else:
            example = _plain(tokenizer, prompt, completion, mask_prompt)
    else:
        example = _chat(tokenizer, _messages(record, loc, mask_prompt), mask_prompt, loc)
    if len(example.tokens) - max(example.prompt_len, 1) < 1:
        raise ValueError(f"{loc}: nothing to train on: {len(example.tokens)} tokens, "
                         f"{example.prompt_len} of them prompt")
    return example


def load_split(path, tokenizer, mask_prompt: bool = False) -> list[Example]:
    """Parse, validate and tokenize one file; any bad record is a ValueError at `file:line`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: expected a .jsonl or .json file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    chat = getattr(tokenizer, "chat_template", None) is not None
    examples, fmt, first = [], None, None
    for loc, record in _records(path):
        this = record_format(record, loc)
        if fmt is None:
            fmt, first = this, loc
            if fmt == "text" and mask_prompt:
                raise ValueError(f"{loc}: the text format has no prompt to mask; use "
                                 "prompt/completion, messages or instruction/output records")
            if fmt == "chat" and not chat:
                raise ValueError(f"{loc}: the messages format needs a tokenizer with a chat "
                                 "template, and this one has none")
        elif this != fmt:
            raise ValueError(f"{loc}: this record is in the {this} format, but the first one "
                             f"({first}) is in the {fmt} format; a file holds one format")
        examples.append(_example(record, fmt, tokenizer, mask_prompt, chat, loc))
    if not examples:
        raise ValueError(f"{path}: empty, no records in this split")
    return examples


def split_path(data_dir, split: str) -> Path:
    """`<split>.jsonl` or `<split>.json` in `data_dir`; errors name the split and what was tried."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: data directory not found")
    found = [data_dir / f"{split}{s}" for s in SUFFIXES if (data_dir / f"{split}{s}").is_file()]
    if not found:
        tried = " or ".join(f"{split}{s}" for s in SUFFIXES)
        raise FileNotFoundError(f"{data_dir}: the {split} split is missing (looked for {tried})")
    if len(found) > 1:
        raise ValueError(f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0]


def load_data(data_dir, tokenizer, mask_prompt: bool = False,
              splits=("train", "valid")) -> dict[str, list[Example]]:
    """Every requested split, fully validated, so bad input stops before training starts."""
    paths = {split: split_path(data_dir, split) for split in splits}
    return {split: load_split(p, tokenizer, mask_prompt) for split, p in paths.items()}


class Batcher:
    """Length-sorted, padded batches as a pure function of (seed, step).

    Examples are sorted by length and cut into groups of `batch_size * world_size`;
    each epoch visits every group once in an order drawn from
    `np.random.default_rng((seed, epoch))`, and rank r takes rows r, r + world_size, ...
    of the group. When the examples do not divide evenly, the group of the shortest
    ones is filled with empty rows (mask 0), so each epoch covers every example exactly
    once and every batch has the same number of rows. `max_seq_length` bounds the
    positions the model sees: an example keeps at most `max_seq_length + 1` tokens.
    """

    def __init__(self, examples, batch_size: int, max_seq_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or max_seq_length < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_seq_length ({max_seq_length}) "
                             "must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        size = batch_size * world_size
        if size > len(examples):
            workers = f" x {world_size} workers" if world_size > 1 else ""
            raise ValueError(f"batch size {batch_size}{workers} needs at least {size} examples, "
                             f"but the dataset has only {len(examples)}")
        self.examples = list(examples)
        self.batch_size, self.max_seq_length, self.seed = batch_size, max_seq_length, seed
        self.rank, self.world_size = rank, world_size
        order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i].tokens))
        short = len(order) % size or size
        order = order[:short] + [-1] * (size - short) + order[short:]
        self._groups = [order[i:i + size] for i in range(0, len(order), size)]
        self.num_batches = len(self._groups)
        self.truncated = sum(len(e.tokens) - 1 > max_seq_length for e in self.examples)
        # Examples whose whole completion is cut away: they add no loss tokens.
        self.fully_masked = sum(e.prompt_len > max_seq_length for e in self.examples)
        self._epoch, self._perm = None, None

    def group(self, step: int) -> list[int]:
        """Example indices of the global batch at `step` (-1 = an empty row)."""
        epoch, i = divmod(step, self.num_batches)
        if epoch != self._epoch:
            self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_batches)
            self._epoch = epoch
        return self._groups[self._perm[i]]

    def batch(self, step: int) -> tuple[mx.array, mx.array, mx.array]:
        """(inputs, targets, mask), each (batch_size, L): this rank's rows of the step's batch."""
        group = self.group(step)
        longest = max(min(len(self.examples[i].tokens) - 1, self.max_seq_length)
                      for i in group if i >= 0)
        width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, self.max_seq_length)
        rows = group[self.rank::self.world_size]
        inputs = np.zeros((len(rows), width), np.int32)
        targets = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.float32)
        for r, i in enumerate(rows):
            if i < 0:
                continue
            example = self.examples[i]
            tokens = example.tokens[: self.max_seq_length + 1]
            n = len(tokens) - 1
            inputs[r, :n] = tokens[:-1]
            targets[r, :n] = tokens[1:]
            # targets[j] is tokens[j + 1]: in the loss when j + 1 >= prompt_len.
            mask[r, max(example.prompt_len - 1, 0):n] = 1.0
        return mx.array(inputs), mx.array(targets), mx.array(mask)

    def eval_batches(self, num_batches: int = -1):
        """The first `num_batches` batches (all when -1) of epoch 0's order: fixed, and a
        mix of lengths (the sorted order would only sample the shortest examples)."""
        n = self.num_batches if num_batches < 0 else min(num_batches, self.num_batches)
        for step in range(n):
            yield self.batch(step)
