"""Record formats -> `Example`s: the formats of `mlx_lm.lora` (and LLM-Adapters').

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
These are the one-sequence (SFT) formats; preference pairs (prompt/chosen/rejected)
are another record kind with their own example type, beside this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .read import json_type, warn

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


@dataclass(frozen=True)
class Example:
    tokens: list[int]  # BOS included when the tokenizer adds one
    prompt_len: int = 0  # the loss covers tokens[prompt_len:]; 0 = every token


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


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


def to_examples(name: str, records, tokenizer, mask_prompt: bool, features: dict) -> list[Example]:
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

