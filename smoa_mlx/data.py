"""Training data: the dataset formats and sources of `mlx_lm.lora` (and LLM-Adapters') -> token batches.

`load_data(spec, tokenizer, ...)` reads, as mlx_lm.lora's `load_dataset` does:
  - a local directory (it wins over a Hub id of the same name): `<split>.jsonl` (one
    JSON object a line) or `<split>.json` (a JSON list of objects), or a DatasetDict
    that `datasets` wrote with `save_to_disk`;
  - otherwise a Hugging Face Hub dataset id, through `datasets.load_dataset` (splits
    named train / valid / test, as mlx-lm; a "validation" split serves as valid);
  - an `hf_dataset` config, one mapping or a list of them (concatenated): `path`,
    `train_split` / `valid_split` / `test_split`, `config` (keyword arguments of
    `load_dataset`) and the `*_feature` keys.
`datasets` is imported only for the last two (the `datasets` extra). Splits: train is
required; a missing valid split is a warning (training runs without validation).

A source's format is the one its first record names, checked in mlx-lm's order
(`prompt_feature`, `completion_feature`, `chat_feature`, `text_feature` rename the keys):
  completions  {"prompt", "completion"} (+ "tools")   the tokenizer's chat template, as
                                               mlx-lm (plain concatenation if it has none)
  chat, tools  {"messages": [...]} (+ "tools")   chat template; the prompt is every message
                                               but the last; assistant turns may carry
                                               `tool_calls` instead of `content`
  text         {"text"}                        loss on every token (no prompt to mask)
  alpaca       {"instruction", "output"} (+ "input", "answer")   LLM-Adapters' prompt
Keys the format does not use are ignored with one warning per source naming them, as
mlx-lm ignores them. An empty completion/output is allowed, as in mlx-lm and
LLM-Adapters: it teaches the model to stop. Everything is parsed and tokenized up
front, so a bad record stops the run before training with `file:line: what is wrong`.
Batches are a pure function of (seed, step): a resumed run only needs the step to
continue on the exact same data.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ConfigError, DataError, MissingFileError

BUNDLED = Path(__file__).parent / "bundled"
BUNDLED_DATA = BUNDLED  # train/valid/test.jsonl: story cards (scripts/make_example_data.py)
BUNDLED_MODEL = BUNDLED / "stories260K"  # a real pretrained tiny Llama (see its README.md)
SPLITS = ("train", "valid", "test")
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

# mlx-lm's feature names (`mlx_lm.tuner.datasets.create_dataset`) and their defaults.
FEATURES = {"prompt_feature": "prompt", "completion_feature": "completion",
            "chat_feature": "messages", "text_feature": "text"}
# hf_dataset keys (mlx-lm's `load_custom_hf_dataset`); mlx-lm overwrites `mask_prompt`
# with the run's own, and so does this loader.
HF_KEYS = {"path", "train_split", "valid_split", "test_split", "config", "mask_prompt",
           *FEATURES}
HF_DEFAULT_SPLITS = {"train": "train[:80%]", "valid": "train[-10%:]"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_JSON_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Example:
    tokens: list[int]  # BOS included when the tokenizer adds one
    prompt_len: int = 0  # the loss covers tokens[prompt_len:]; 0 = every token


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def json_type(v) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


# ---------------------------------------------------------------- reading files


def decode_text(path, data: bytes) -> str:
    """UTF-8 text, or a DataError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start} of the file)") from None


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    return decode_text(path, path.read_bytes())


def read_records(path):
    """Yield (location, record) of a JSON lines (.jsonl) or JSON list (.json) file:
    `file:line` for JSON lines, `file:line: record i` for a JSON list.

    The one reader of every dataset file (training splits, evaluation tasks), so every
    malformed input is reported the same way: one line naming the file and the line.
    """
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".json":
        yield from _json_list(path, text)
        return
    # str.splitlines would also split on U+2028 etc., which JSON allows inside strings.
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
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
        raise DataError(f"{where(pos)}: expected a JSON list of records, [{{...}}, ...]")
    pos, i = skip(pos + 1), 0
    if text.startswith("]", pos):
        pos = skip(pos + 1)
    else:
        while True:
            try:
                record, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield f"{where(pos)}: record {i}", record
            pos = skip(end)
            if text.startswith(",", pos):
                pos, i = skip(pos + 1), i + 1
            elif text.startswith("]", pos):
                pos = skip(pos + 1)
                break
            else:
                raise DataError(
                    f"{where(pos)}: invalid JSON: expected ',' or ']' after record {i}")
    if pos != len(text):
        raise DataError(f"{where(pos)}: invalid JSON: extra data after the list")


# ---------------------------------------------------------------- records -> examples


class _Format:
    """The record format of one source: its keys (renamed by the *_feature options)."""

    def __init__(self, features: dict):
        f = {**FEATURES, **{k: v for k, v in features.items() if v is not None}}
        self.prompt, self.completion = f["prompt_feature"], f["completion_feature"]
        self.chat, self.text = f["chat_feature"], f["text_feature"]
        # format -> (required keys, optional keys), in mlx-lm's order of precedence.
        self.keys = {
            "completions": ({self.prompt, self.completion}, {"tools"}),
            "chat": ({self.chat}, {"tools"}),
            "text": ({self.text}, set()),
            "alpaca": ({"instruction", "output"}, {"input", "answer"}),
        }

    def detect(self, record, loc: str) -> str:
        if not isinstance(record, dict):
            raise DataError(f"{loc}: expected a JSON object, got {json_type(record)}")
        keys = set(record)
        for name, (required, _) in self.keys.items():
            if required <= keys:
                return name
        for name, (required, _) in self.keys.items():
            if required & keys:
                raise DataError(f"{loc}: missing key {sorted(required - keys)} of the {name} format")
        expected = ", ".join("/".join(sorted(req)) for req, _ in self.keys.values())
        raise DataError(f"{loc}: keys {sorted(keys)} name no format; expected {expected}")


def _string(record: dict, key: str, loc: str, empty_ok: bool = False) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise DataError(f"{loc}: '{key}' must be a string, got {json_type(value)}")
    if not empty_ok and not value.strip():
        raise DataError(f"{loc}: '{key}' is empty")
    return value


def _tools(record: dict, loc: str):
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{loc}: 'tools' must be a list of objects, got {json_type(tools)}")
    return tools


def _messages(record: dict, key: str, loc: str, mask_prompt: bool) -> list[dict]:
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{loc}: '{key}' must be a non-empty list, got {json_type(messages)}")
    out = []
    for j, m in enumerate(messages):
        at = f"{loc}: {key}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object, got {json_type(m)}")
        # Arrow fills a field a message lacks with null; templates test `is defined`.
        m = {k: v for k, v in m.items() if v is not None}
        if "role" not in m:
            raise DataError(f"{at} has no 'role'")
        _string(m, "role", at)
        if "tool_calls" in m and not isinstance(m["tool_calls"], list):
            raise DataError(f"{at}: 'tool_calls' must be a list, got {json_type(m['tool_calls'])}")
        if "content" not in m and "tool_calls" not in m:
            raise DataError(f"{at} has no 'content' (nor 'tool_calls')")
        if "content" in m and not isinstance(m["content"], (str, list)):
            raise DataError(f"{at}: 'content' must be a string, got {json_type(m['content'])}")
        out.append(m)
    if mask_prompt and out[-1]["role"] != "assistant":
        raise DataError(
            f"{loc}: the last message is from '{out[-1]['role']}'; masking the prompt "
            "trains on the last message, which must be the assistant's"
        )
    return out


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


def _chat(tokenizer, messages: list[dict], tools, mask_prompt: bool, loc: str) -> Example:
    """mlx-lm's ChatDataset / CompletionsDataset: the template renders the tools too."""
    try:
        tokens = list(tokenizer.apply_chat_template(messages, tools=tools, return_dict=False))
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tools=tools, add_generation_prompt=True, return_dict=False
        ) if mask_prompt else []
    except Exception as e:  # templates raise on conversations they do not accept
        raise DataError(f"{loc}: the tokenizer's chat template rejects it: {e}") from None
    # The template ends the turn itself (mlx-lm adds no EOS to chat data).
    return Example(tokens, common_prefix(list(prompt), tokens))


def _example(record: dict, fmt: str, f: _Format, tokenizer, mask_prompt: bool, loc: str):
    chat = getattr(tokenizer, "chat_template", None) is not None
    tools = _tools(record, loc) if fmt in ("chat", "completions") else None
    if tools is not None and not chat:
        raise DataError(f"{loc}: 'tools' need a tokenizer with a chat template, and this "
                        "one has none")
    if fmt == "text":
        example = _plain(tokenizer, "", _string(record, f.text, loc), False)
    elif fmt == "alpaca":
        prompt = alpaca_prompt(_string(record, "instruction", loc),
                               _string(record, "input", loc, empty_ok=True))
        example = _plain(tokenizer, prompt, _string(record, "output", loc, empty_ok=True),
                         mask_prompt)
    elif fmt == "completions":
        prompt = _string(record, f.prompt, loc, empty_ok=True)
        completion = _string(record, f.completion, loc, empty_ok=True)
        if chat:
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion}]
            example = _chat(tokenizer, messages, tools, mask_prompt, loc)
        else:
            example = _plain(tokenizer, prompt, completion, mask_prompt)
    else:
        if not chat:
            raise DataError(f"{loc}: the '{f.chat}' format needs a tokenizer with a chat "
                            "template, and this one has none")
        example = _chat(tokenizer, _messages(record, f.chat, loc, mask_prompt), tools,
                        mask_prompt, loc)
    if len(example.tokens) - max(example.prompt_len, 1) < 1:
        raise DataError(f"{loc}: nothing to train on: {len(example.tokens)} tokens, "
                        f"{example.prompt_len} of them prompt")
    return example


def _examples(name: str, records, tokenizer, mask_prompt: bool, features: dict) -> list[Example]:
    """Tokenize one source's (location, record) pairs; `name` names the source in messages."""
    f = _Format(features)
    examples, fmt, first, ignored = [], None, None, set()
    for loc, record in records:
        if fmt is None:
            fmt, first = f.detect(record, loc), loc
            if fmt == "text" and mask_prompt:
                raise DataError(f"{loc}: the text format has no prompt to mask; use "
                                "prompt/completion, messages or instruction/output records")
        elif not isinstance(record, dict):
            raise DataError(f"{loc}: expected a JSON object, got {json_type(record)}")
        required, optional = f.keys[fmt]
        if not required <= set(record):
            this = f.detect(record, loc)
            raise DataError(f"{loc}: this record is in the {this} format, but the first one "
                            f"({first}) is in the {fmt} format; a source holds one format")
        ignored |= set(record) - required - optional
        examples.append(_example(record, fmt, f, tokenizer, mask_prompt, loc))
    if not examples:
        raise DataError(f"{name}: empty, no records in this split")
    if ignored:
        warn(f"{name}: ignoring key(s) {sorted(ignored)}, which the {fmt} format does not use")
    return examples


def load_split(path, tokenizer, mask_prompt: bool = False, **features) -> list[Example]:
    """Parse, validate and tokenize one file; any bad record is a DataError at `file:line`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: expected a .jsonl or .json file")
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    return _examples(str(path), read_records(path), tokenizer, mask_prompt, features)


# ---------------------------------------------------------------- sources


def split_path(data_dir, split: str) -> Path | None:
    """`<split>.jsonl` or `<split>.json` in `data_dir`, or None when it has neither."""
    data_dir = Path(data_dir)
    found = [data_dir / f"{split}{s}" for s in SUFFIXES if (data_dir / f"{split}{s}").is_file()]
    if len(found) > 1:
        raise DataError(f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0] if found else None


def _rows(dataset, name: str):
    """(location, record) of the rows of a `datasets.Dataset`."""
    return ((f"{name}: row {i}", row) for i, row in enumerate(dataset))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets library: "
                        "pip install 'smoa-mlx[datasets]'") from None
    return datasets


def _load_local(data_dir: Path, tokenizer, mask_prompt, splits, features) -> dict:
    if (data_dir / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk
        dd = _datasets().load_from_disk(str(data_dir))
        return _load_dict(dd, str(data_dir), tokenizer, mask_prompt, splits, features)
    if (data_dir / "state.json").is_file():  # Dataset.save_to_disk: one split, but which?
        raise DataError(f"{data_dir}: a single saved Dataset; save a DatasetDict with "
                        "'train' (and 'valid', 'test') splits instead")
    out = {}
    for split in splits:
        path = split_path(data_dir, split)
        if path is None:
            tried = " or ".join(f"{split}{s}" for s in SUFFIXES)
            out[split] = _absent(split, f"{data_dir}: the {split} split is missing "
                                        f"(looked for {tried})")
        else:
            out[split] = load_split(path, tokenizer, mask_prompt, **features)
    return out


def _absent(split: str, message: str) -> list:
    """A missing split: valid is optional (as in mlx-lm), train and test are not."""
    if split != "valid":
        raise MissingFileError(message)
    warn(f"{message}; training without validation")
    return []


def _load_dict(dd, name: str, tokenizer, mask_prompt, splits, features) -> dict:
    """The train / valid / test splits of a DatasetDict (mlx-lm's `load_hf_dataset`)."""
    out = {}
    for split in splits:
        # `datasets` names a valid.* file's split "validation"; mlx-lm would skip it.
        found = "validation" if split == "valid" and "valid" not in dd else split
        if found in dd:
            out[split] = _examples(f"{name} [{found}]", _rows(dd[found], f"{name} [{found}]"),
                                   tokenizer, mask_prompt, features)
        else:
            out[split] = _absent(split, f"{name}: the {split} split is missing (the dataset "
                                        f"has {', '.join(dd) or 'no splits'})")
    return out


def _load_hub(data_id: str, tokenizer, mask_prompt, splits, features) -> dict:
    datasets = _datasets()
    try:
        dd = datasets.load_dataset(data_id)
    except Exception as e:  # not found, offline, gated: the reason is in the message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{data_id}: no such local directory, and loading it as a Hugging "
                        f"Face dataset failed: {reason}") from None
    return _load_dict(dd, data_id, tokenizer, mask_prompt, splits, features)


def _check_hf_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping with 'path', got {json_type(entry)}")
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise ConfigError(f"{where}: 'path' (a dataset id or directory) is required")
    for key in ("train_split", "valid_split", "test_split", *FEATURES):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {json_type(entry[key])}")
    if entry.get("config") is not None and not isinstance(entry["config"], dict):
        raise ConfigError(f"{where}: 'config' must be a mapping of load_dataset arguments, "
                          f"got {json_type(entry['config'])}")
    if unknown := sorted(set(entry) - HF_KEYS):
        warn(f"{where}: ignoring key(s) {unknown} (known: {', '.join(sorted(HF_KEYS))})")
    return entry


def _load_hf_config(config, tokenizer, mask_prompt, splits) -> dict:
    """mlx-lm's `load_custom_hf_dataset`: one entry or a list, each split concatenated."""
    entries = [config] if isinstance(config, dict) else config
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"hf_dataset: expected a mapping or a non-empty list of them, "
                          f"got {json_type(config)}")
    wheres = ["hf_dataset"] if isinstance(config, dict) else [
        f"hf_dataset[{i}]" for i in range(len(entries))]
    entries = [_check_hf_entry(e, where) for e, where in zip(entries, wheres)]  # all, first
    out = {split: [] for split in splits}
    for entry, where in zip(entries, wheres):
        features = {k: entry.get(k) for k in FEATURES}
        kwargs = entry.get("config") or {}
        for split in splits:
            chosen = entry.get(f"{split}_split") or HF_DEFAULT_SPLITS.get(split)
            if chosen is None:
                raise ConfigError(f"{where} ({entry['path']}): no {split}_split given")
            name = f"{entry['path']} [{chosen}]"
            try:
                ds = _datasets().load_dataset(entry["path"], split=chosen, **kwargs)
            except Exception as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"{name}: loading the Hugging Face dataset failed: "
                                f"{reason}") from None
            out[split] += _examples(name, _rows(ds, name), tokenizer, mask_prompt, features)
    return out


def load_data(spec, tokenizer, mask_prompt: bool = False, splits=("train", "valid"),
              **features) -> dict[str, list[Example]]:
    """Every requested split, fully validated, so bad input stops before training starts.

    `spec`: a local directory, a Hugging Face Hub dataset id, or an `hf_dataset` config
    (a mapping or a list of them). `features`: mlx-lm's `prompt_feature`,
    `completion_feature`, `chat_feature`, `text_feature` for a directory or a Hub id.
    A missing valid split gives [] and a warning; a missing train or test split is an error.
    """
    if unknown := sorted(set(features) - set(FEATURES)):
        raise ConfigError(f"unknown data option(s) {unknown} (known: {', '.join(FEATURES)})")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ConfigError(f"unknown split(s) {bad} (known: {', '.join(SPLITS)})")
    if isinstance(spec, (dict, list)):
        return _load_hf_config(spec, tokenizer, mask_prompt, splits)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path}: --data is a directory holding train.jsonl / valid.jsonl "
                            "(/ test.jsonl), not a file")
        return _load_local(path, tokenizer, mask_prompt, splits, features)
    if not _HUB_ID.fullmatch(str(spec)):
        raise MissingFileError(f"{path}: data directory not found")
    return _load_hub(str(spec), tokenizer, mask_prompt, splits, features)


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
            raise ConfigError(f"batch_size ({batch_size}) and max_seq_length ({max_seq_length}) "
                             "must be at least 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        size = batch_size * world_size
        if size > len(examples):
            workers = f" x {world_size} workers" if world_size > 1 else ""
            raise DataError(f"batch size {batch_size}{workers} needs at least {size} examples, "
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
