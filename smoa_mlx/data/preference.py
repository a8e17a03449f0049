"""Preference records -> `Pair`s (chosen and rejected `Example`s of one prompt), in the
formats mlx-lm-lora's DPO/ORPO trainers (and TRL's) read:
  {"prompt": str, "chosen": str, "rejected": str} (+ "system")   user turn and the two
                                          assistant replies, through the chat template
  {"chosen": [messages], "rejected": [messages]}   two whole conversations; the prompt is
                                          every message but the last (an assistant turn)
  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}   TRL's
                                          conversational form: prompt + each reply
The chat template is applied as for SFT (`formats._chat`; plain concatenation and an
EOS for a tokenizer without one), and the loss covers the reply tokens only: a pair's
prompt is always masked. A record lacking a key, or whose two replies are identical,
stops the run with `file:line: what is wrong`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .formats import Example, _chat, _messages, _plain, _string
from .read import json_type, warn

KEYS = ("chosen", "rejected")
OPTIONAL = ("prompt", "system")


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example

    @property
    def tokens(self) -> list[int]:
        """The longer sequence: what a batch's width and truncation depend on."""
        return max(self.chosen.tokens, self.rejected.tokens, key=len)

    @property
    def prompt_len(self) -> int:
        """The longer prompt: a --max-seq-length below it leaves that reply no token, and
        the pair counts for nothing (`Batcher.fully_masked`)."""
        return max(self.chosen.prompt_len, self.rejected.prompt_len)


def _conversations(record: dict, loc: str) -> tuple[list, list]:
    """The chosen and rejected conversations of a record, as message lists."""
    prompt = record.get("prompt")
    if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
        text = [_string(record, k, loc, empty_ok=True) for k in KEYS]
        if prompt is None:
            raise DataError(f"{loc}: missing key 'prompt' (string replies need one)")
        messages = []
        if record.get("system") is not None:
            messages.append({"role": "system", "content": _string(record, "system", loc)})
        messages.append({"role": "user", "content": _string(record, "prompt", loc)})
        return tuple(messages + [{"role": "assistant", "content": t}] for t in text)
    head = []
    if isinstance(prompt, list):
        head = _messages(record, "prompt", loc, mask_prompt=False)
    elif prompt is not None:
        raise DataError(f"{loc}: 'prompt' must be a string or a message list when the replies "
                        f"are message lists, got {json_type(prompt)}")
    return tuple(head + _messages(record, k, loc, mask_prompt=True) for k in KEYS)


def _pair(record, tokenizer, loc: str) -> Pair:
    if not isinstance(record, dict):
        raise DataError(f"{loc}: expected a JSON object, got {json_type(record)}")
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise DataError(f"{loc}: missing key {missing} of the preference format "
                        "(prompt/chosen/rejected)")
    chosen, rejected = _conversations(record, loc)
    if chosen == rejected:
        raise DataError(f"{loc}: 'chosen' and 'rejected' are identical; a pair must differ")
    if getattr(tokenizer, "chat_template", None) is not None:
        pair = Pair(*(_chat(tokenizer, c, None, True, loc) for c in (chosen, rejected)))
    else:
        prompt = "".join(m["content"] for m in chosen[:-1] if isinstance(m.get("content"), str))
        pair = Pair(*(_plain(tokenizer, prompt, c[-1].get("content", ""), True)
                      for c in (chosen, rejected)))
    for name, ex in zip(KEYS, (pair.chosen, pair.rejected)):
        if len(ex.tokens) - max(ex.prompt_len, 1) < 1:
            raise DataError(f"{loc}: the '{name}' reply has no tokens to score")
    return pair


def to_pairs(name: str, records, tokenizer, mask_prompt: bool, features: dict) -> list[Pair]:
    """Tokenize one source's (location, record) preference pairs (`to_examples`'s
    signature; the prompt is masked whatever `mask_prompt` says)."""
    pairs, ignored = [], set()
    for loc, record in records:
        pairs.append(_pair(record, tokenizer, loc))
        ignored |= set(record) - set(KEYS) - set(OPTIONAL)
    if not pairs:
        raise DataError(f"{name}: empty, no records in this split")
    if ignored:
        warn(f"{name}: ignoring key(s) {sorted(ignored)}, which the preference format does "
             "not use")
    return pairs
