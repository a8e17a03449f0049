"""The model side of the server: a request's adapter, prompt and mlx-lm sampler, then
the generated text as `Chunk`s (stop strings held back, tool calls and reasoning split
out by mlx-lm's text state machine, logprobs as OpenAI's chat and text shapes)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..errors import ConfigError
from ..generate import DEFAULT_TEMP, DEFAULT_TOP_P, prompt_tokens
from .registry import Adapters, Variant
from .schema import bad_request

DEFAULT_MAX_TOKENS = 512  # chat, when a request sets no limit (mlx-lm's server default)
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions, as in the OpenAI reference


def stop_position(text: str, stops: list[str]) -> tuple[int, bool]:
    """(how much of `text` is safe to emit, whether a stop string was found).

    A stop string cuts the text before it; otherwise a tail that could be the
    start of a stop string is held back until more text arrives.
    """
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return min(found), True
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return len(text) - hold, False


@dataclass
class Chunk:
    text: str = ""
    finish: str | None = None
    logprobs: list = field(default_factory=list)  # (token id, logprob, [(id, logprob)] top)
    tool_calls: list = field(default_factory=list)
    reasoning: str = ""
    usage: dict | None = None


def _token_logprobs(response, top: int, prev: int):
    """(previous token, token, logprob, [(id, logprob)] of the `top` most likely)."""
    lp = response.logprobs
    entry = (prev, response.token, lp[response.token].item(), [])
    if top > 0:
        ids = mx.argpartition(-lp, kth=top - 1)[:top]
        vals = lp[ids]
        order = mx.argsort(-vals)
        entry[3].extend(zip(ids[order].tolist(), vals[order].tolist()))
    return entry


def _piece(tokenizer, prev: int, token: int) -> str:
    """A token's text as it reads after `prev` (SentencePiece drops a leading space when alone)."""
    before = tokenizer.decode([prev])
    both = tokenizer.decode([prev, token])
    return both[len(before):] if both.startswith(before) else tokenizer.decode([token])


def _initial_state(tokenizer, tokens) -> str:
    """mlx-lm's choice: a prompt ending inside a think block continues reasoning."""
    state = "normal"
    if tokenizer.has_thinking and tokenizer.rfind_think_start(tokens) > tokenizer.rfind_think_end(tokens):
        state = "reasoning"
    return tokenizer.response_initial_state or state


class Engine:
    """One base model and its adapters: a checked request in, `Chunk`s out, one request
    at a time (`lock`), with one `PromptCache` per adapter."""

    def __init__(self, model, tokenizer, adapters: Adapters, defaults: dict | None = None,
                 chat_template_args: dict | None = None):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.defaults = {"temperature": DEFAULT_TEMP, "top_p": DEFAULT_TOP_P, "top_k": 0, "min_p": 0.0,
                         "max_tokens": DEFAULT_MAX_TOKENS, **(defaults or {})}
        self.chat_template_args = chat_template_args or {}
        self.lock = threading.Lock()

    @property
    def vocab(self) -> int:
        args = getattr(self.model, "args", None)
        return getattr(args, "vocab_size", None) or len(self.tokenizer.get_vocab())

    def generate(self, req: dict):
        """Resolve, tokenize and generate under the model lock; yields `Chunk`s."""
        with self.lock:
            variant = self.variant(req)
            tokens = self.prompt(req)
            yield from self.completion(req, variant, tokens)

    def variant(self, req: dict) -> Variant:
        if "adapters" in req:
            return self.adapters.resolve(req["adapters"], "adapters")
        return self.adapters.resolve(req.get("model"))

    def prompt(self, req: dict) -> list[int]:
        if "messages" not in req:
            p = req["prompt"]
            tokens = list(self.tokenizer.encode(p)) if isinstance(p, str) else p
            if not all(0 <= t < self.vocab for t in tokens):
                raise bad_request(f"'prompt' token ids must be in [0, {self.vocab})", "prompt")
            return tokens
        tools = req.get("tools")
        kwargs = {**self.chat_template_args, **req.get("chat_template_kwargs", {})}
        try:
            if tools or kwargs:
                if not self.tokenizer.has_chat_template:
                    raise ConfigError("the model has no chat template")
                return list(self.tokenizer.apply_chat_template(
                    req["messages"], tools=tools, add_generation_prompt=True, **kwargs))
            return prompt_tokens(self.tokenizer, req["messages"])
        except Exception as e:  # the template rejects this conversation (e.g. role order)
            raise bad_request(f"cannot apply the chat template: {e}", "messages") from None

    def _sampling(self, req: dict, vocab: int):
        get = lambda k: req.get(k, self.defaults.get(k))  # noqa: E731
        top_k = get("top_k")
        bias = req.get("logit_bias") or {}
        if not all(0 <= t < vocab for t in bias):
            raise bad_request(f"'logit_bias' token ids must be in [0, {vocab})", "logit_bias")
        sampler = make_sampler(
            get("temperature"), top_p=get("top_p"), min_p=get("min_p"),
            top_k=top_k if 0 < top_k < vocab else 0,  # top_k >= vocab keeps every token
            xtc_probability=req.get("xtc_probability", 0.0), xtc_threshold=req.get("xtc_threshold", 0.1),
            xtc_special_tokens=list(self.tokenizer.encode("\n")) + list(self.tokenizer.eos_token_ids),
        )
        processors = make_logits_processors(
            bias or None, req.get("repetition_penalty"), req.get("repetition_context_size", 20),
            req.get("presence_penalty"), req.get("presence_context_size", 20),
            req.get("frequency_penalty"), req.get("frequency_context_size", 20),
        )
        return sampler, processors

    def completion(self, req: dict, variant: Variant, tokens: list[int]):
        """Yield `Chunk`s; the last has `finish` and `usage`. The caller holds `self.lock`."""
        chat = "messages" in req
        default = self.defaults["max_tokens"] if chat else DEFAULT_COMPLETION_TOKENS
        max_tokens = req.get("max_completion_tokens", req.get("max_tokens", default))
        sampler, processors = self._sampling(req, self.vocab)
        top = req.get("top_logprobs", 0) if chat else req.get("logprobs", 0)
        want_logprobs = bool(req.get("logprobs")) if chat else "logprobs" in req
        if "seed" in req:
            mx.random.seed(req["seed"])
        stops = req.get("stop", [])
        self.adapters.activate(variant)
        with contextlib.closing(variant.cache.stream(self.tokenizer, tokens, max_tokens, sampler,
                                                     processors)) as responses:
            yield from self._chunks(responses, tokens, stops, want_logprobs, top, chat)

    def _chunks(self, responses, tokens, stops, want_logprobs, top, chat):
        sm_state = make_text_state_machine(self.tokenizer).make_state(
            _initial_state(self.tokenizer, tokens) if chat else "normal")
        prev, text, sent, tool_text, called = sm_state[0], "", 0, "", False
        out = Chunk()
        last_token = tokens[-1]
        for r in responses:
            if want_logprobs:
                out.logprobs.append(_token_logprobs(r, top, last_token))
                last_token = r.token
            if r.finish_reason == "stop":
                sm_state, state = TextStateMachine.discard(sm_state)
                segments = [(state, "")]
            else:
                sm_state, segments = TextStateMachine.split(sm_state, r.text)
                if r.finish_reason == "length":
                    sm_state, flushed, state = TextStateMachine.flush(sm_state)
                    segments.append((state, flushed))
            for state, piece in segments:
                if state == "tool":
                    tool_text += piece
                elif state == "reasoning":
                    out.reasoning += piece
                else:
                    if prev == "tool" and tool_text:
                        out.tool_calls.append(tool_text)
                        tool_text, called = "", True
                    text += piece
                prev = state
            end, stopped = stop_position(text, stops)
            finish = "stop" if stopped else r.finish_reason
            if finish is not None:
                if tool_text:
                    out.tool_calls.append(tool_text)
                    called = True
                if called and finish == "stop":
                    finish = "tool_calls"
                out.text, out.finish = text[sent:end if stopped else len(text)], finish
                out.usage = {"prompt_tokens": len(tokens), "completion_tokens": r.generation_tokens,
                             "total_tokens": len(tokens) + r.generation_tokens,
                             "prompt_tokens_details": {"cached_tokens": len(tokens) - r.prompt_tokens}}
                yield out
                return
            if end > sent or out.reasoning or out.tool_calls:
                out.text = text[sent:end]
                sent = end
                yield out
                out = Chunk()


def logprobs_chat(tokenizer, entries):
    def item(prev, t, lp):
        s = _piece(tokenizer, prev, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**item(prev, t, lp), "top_logprobs": [item(prev, i, v) for i, v in top]}
                        for prev, t, lp, top in entries]}


def logprobs_text(tokenizer, entries, offset):
    tokens, offsets = [], []
    for prev, t, _, _ in entries:
        tokens.append(_piece(tokenizer, prev, t))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for _, _, lp, _ in entries],
            "top_logprobs": [{_piece(tokenizer, prev, i): v for i, v in top} for prev, _, _, top in entries],
            "text_offset": offsets}
