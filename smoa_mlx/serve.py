"""An OpenAI-compatible HTTP server for one base model and any number of adapters.

`POST /v1/chat/completions` and `POST /v1/completions` (each with or without
`"stream": true`, as SSE chunks ending in `data: [DONE]`), `GET /v1/models` and
`GET /health`, field by field as in the OpenAI API and `mlx_lm.server`: sampling
and logits processors are mlx-lm's, tool calls are parsed with the tokenizer's
mlx-lm tool parser. A field we cannot honour (`n` > 1, `response_format` json,
...) is a precise 400; malformed JSON or a wrong type is a 400 JSON error; a
body above `--max-body-mb` is a 413. Nothing a client sends takes the server down.

With `--adapter-dir DIR`, every adapter directory directly under DIR is served
too, selected per request by `model` (or mlx-lm's `adapters` field): the base
is loaded once and each adapter's layers are built once, then swapped in and
out of the model (no reload). Names resolve only inside DIR.

Connections are served by threads (a slow client holds only its own); model
calls are serialised by one lock, with one `PromptCache` per adapter, so a
front-end that re-sends the whole conversation only pays for the new turn.

    python -m smoa_mlx.serve --model M [--adapter-path A] [--adapter-dir DIR] [--port 8080]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .adapters import CONFIG, load_adapter
from .cli import run
from .errors import AdapterError, ConfigError, MissingFileError
from .generate import DEFAULT_TEMP, DEFAULT_TOP_P, PromptCache, add_model_args, load_model, prompt_tokens

DEFAULT_MAX_TOKENS = 512  # chat, when a request sets no limit (mlx-lm's server default)
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions, as in the OpenAI reference
DEFAULT_MAX_BODY_MB = 8
SOCKET_TIMEOUT = 60.0  # seconds a client may stall mid-request before it is dropped
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _unsupported(name: str, why: str) -> APIError:
    return _bad(f"'{name}' {why} is not supported by this server", name)


# ---- field checkers: each takes (name, value) and returns the checked value ----

def _int(lo=None, hi=None):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"'{name}' must be an integer", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _bad(f"'{name}' must be in [{lo}, {hi}]" if hi is not None
                       else f"'{name}' must be >= {lo}", name)
        return v
    return check


def _number(lo, hi):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(f"'{name}' must be a number", name)
        if not lo <= v <= hi:  # also refuses NaN
            raise _bad(f"'{name}' must be in [{lo}, {hi}]", name)
        return float(v)
    return check


def _type(kind, label):
    def check(name, v):
        if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
            raise _bad(f"'{name}' must be {label}", name)
        return v
    return check


_str, _bool, _obj = _type(str, "a string"), _type(bool, "a boolean"), _type(dict, "an object")


def _stop(name, v):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise _bad(f"'{name}' must be a non-empty string or a list of at most 4 non-empty strings", name)
    return stops


def _n(name, v):
    _int(1)(name, v)
    if v != 1:
        raise _unsupported(name, f"= {v} (several choices per request)")
    return v


def _logit_bias(name, v):
    _obj(name, v)
    try:
        bias = {int(k): float(b) for k, b in v.items()}
    except (TypeError, ValueError):
        raise _bad(f"'{name}' must map token ids to numbers", name) from None
    if not all(-100 <= b <= 100 for b in bias.values()):
        raise _bad(f"'{name}' values must be in [-100, 100]", name)
    return bias


def _stream_options(name, v):
    _obj(name, v)
    unknown = sorted(set(v) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise _bad(f"'{name}' has unsupported field '{unknown[0]}'", name)
    for key in v:
        _bool(f"{name}.{key}", v[key])
    return v


def _response_format(name, v):
    _obj(name, v)
    if v.get("type") != "text":
        raise _unsupported(f"{name}.type", f"= {v.get('type')!r} (constrained decoding)")
    return v


def _modalities(name, v):
    if v != ["text"]:
        raise _unsupported(name, f"= {v!r} (only [\"text\"])")
    return v


def _tools(name, v):
    if not isinstance(v, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in v
    ):
        raise _bad(f"'{name}' must be a list of {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", name)
    return v


def _tool_choice(name, v):
    if v in ("auto", "none"):
        return v
    raise _unsupported(name, f"= {json.dumps(v)} (forcing a call; use \"auto\" or \"none\")")


def _functions(name, v):
    """The deprecated `functions` list, honoured as `tools`."""
    if not isinstance(v, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in v):
        raise _bad(f"'{name}' must be a list of {{\"name\": ...}} objects", name)
    return [{"type": "function", "function": f} for f in v]


def _function_call(name, v):
    if v in ("auto", "none"):
        return v
    raise _unsupported(name, f"= {json.dumps(v)} (forcing a call; use \"auto\" or \"none\")")


def _refuse(why):
    def check(name, v):
        raise _unsupported(name, why)
    return check


def _content(name, v, allow_none=False):
    """A message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    if v is None and allow_none:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v
    ):
        return "".join(p["text"] for p in v)
    raise _bad(f"'{name}' must be a string or a list of text parts", name)


def _tool_calls(name, v):
    """Assistant tool calls, with `arguments` parsed for the chat template (as mlx-lm does)."""
    if not isinstance(v, list):
        raise _bad(f"'{name}' must be a list", name)
    out = []
    for j, call in enumerate(v):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"'{name}[{j}].function.name' must be a string", name)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise _bad(f"'{name}[{j}].function.arguments' is not valid JSON", name) from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal")


def _messages(name, v):
    if not isinstance(v, list) or not v:
        raise _bad(f"'{name}' must be a non-empty list", name)
    out = []
    for i, m in enumerate(v):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{where}' must be an object", name)
        unknown = sorted(set(m) - set(MESSAGE_FIELDS))
        if unknown:
            raise _bad(f"'{where}' has unsupported field '{unknown[0]}'", name)
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(ROLES)}", name)
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise _bad(f"'{where}' has no 'content'", name)
        msg = {"role": "system" if role == "developer" else role,
               "content": _content(f"{where}.content", m.get("content"), role == "assistant")}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                msg[key] = _str(f"{where}.{key}", m[key])
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(f"{where}.tool_calls", m["tool_calls"])
        out.append(msg)
    return out


def _prompt(name, v):
    """A completion prompt: a string or token ids, alone or as a list of one."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return v
    if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
        raise _unsupported(name, f"with {len(v)} prompts (a batch)")
    raise _bad(f"'{name}' must be a string, a list of token ids, or a list of one of these", name)


# Fields both endpoints share: OpenAI's, then mlx-lm's extensions.
COMMON = {
    "model": _str, "stream": _bool, "stream_options": _stream_options, "n": _n,
    "max_tokens": _int(1), "temperature": _number(0.0, 2.0), "top_p": _number(0.0, 1.0),
    "frequency_penalty": _number(-2.0, 2.0), "presence_penalty": _number(-2.0, 2.0),
    "logit_bias": _logit_bias, "seed": _int(0, 2**63 - 1), "stop": _stop,
    "user": _str, "metadata": _obj, "store": _bool, "service_tier": _str,
    "prompt_cache_key": _str, "safety_identifier": _str,
    # mlx-lm
    "adapters": _str, "top_k": _int(0), "min_p": _number(0.0, 1.0),
    "repetition_penalty": _number(0.0, 1e6), "repetition_context_size": _int(0),
    "presence_context_size": _int(0), "frequency_context_size": _int(0),
    "xtc_probability": _number(0.0, 1.0), "xtc_threshold": _number(0.0, 0.5),
    "draft_model": _refuse("(speculative decoding)"), "num_draft_tokens": _refuse("(speculative decoding)"),
}
CHAT = {
    **COMMON, "messages": _messages, "max_completion_tokens": _int(1),
    "logprobs": _bool, "top_logprobs": _int(0, MAX_TOP_LOGPROBS),
    "tools": _tools, "tool_choice": _tool_choice, "parallel_tool_calls": _bool,
    "functions": _functions, "function_call": _function_call,
    "response_format": _response_format, "modalities": _modalities,
    "chat_template_kwargs": _obj,
    "audio": _refuse("(audio output)"), "prediction": _refuse("(predicted outputs)"),
    "web_search_options": _refuse("(web search)"), "reasoning_effort": _refuse("(reasoning effort)"),
    "verbosity": _refuse("(verbosity)"), "role_mapping": _refuse("(mlx-lm role mapping)"),
}
COMPLETIONS = {
    **COMMON, "prompt": _prompt, "echo": _bool, "logprobs": _int(0, 5),
    "best_of": _n, "suffix": _type((str,), "a string"),
}


def parse_request(body: bytes, fields: dict = CHAT) -> dict:
    """Validate a request body against `fields` (CHAT or COMPLETIONS); APIError if bad."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"malformed JSON: {e}") from None
    except RecursionError:
        raise _bad("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _bad(f"unsupported field '{unknown[0]}'", unknown[0])
    required = "messages" if "messages" in fields else "prompt"
    if data.get(required) is None:
        raise _bad(f"'{required}' is required", required)
    req = {k: fields[k](k, v) for k, v in data.items() if v is not None}
    if req.get("top_p", 1.0) == 0.0:
        raise _bad("'top_p' must be in (0, 1]", "top_p")
    if req.get("suffix"):
        raise _unsupported("suffix", "(insertion)")
    if req.get("echo") and req.get("logprobs"):
        raise _unsupported("echo", "with 'logprobs' (prompt log-probabilities)")
    if "top_logprobs" in req and not req.get("logprobs"):
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if "functions" in req and "tools" not in req:
        req["tools"] = req.pop("functions")
    if req.get("tool_choice", req.get("function_call")) == "none":
        req.pop("tools", None)
    return req


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


# ---- adapters: one base, many adapters swapped in place ----

@dataclass
class Variant:
    """The base with one adapter: the modules that adapter replaces, and its KV cache."""
    name: str
    path: Path | None
    modules: dict = field(default_factory=dict)
    cache: PromptCache | None = None
    load_seconds: float = 0.0


class Adapters:
    """Every servable variant of the one loaded base; `activate` swaps modules in place."""

    def __init__(self, model, default_name: str, default_adapter=None, adapter_dir=None):
        self.model, self.default_name = model, default_name
        self.root = Path(adapter_dir).resolve() if adapter_dir is not None else None
        if self.root is not None and not self.root.is_dir():
            raise MissingFileError(f"{adapter_dir}: adapter directory not found")
        self.base = dict(model.named_modules())
        self.variants: dict[str, Variant] = {}
        self.active: Variant | None = None
        self.switch_seconds = 0.0
        self.default = self._load(Variant(default_name, Path(default_adapter) if default_adapter else None))

    def names(self) -> list[str]:
        """Ids of /v1/models: the default, then each adapter directly under the adapter dir."""
        if self.root is None:
            return [self.default_name]
        found = sorted(p.name for p in self.root.iterdir()
                       if (p / CONFIG).is_file() and p.resolve().parent == self.root)
        return [self.default_name] + [n for n in found if n != self.default_name]

    def resolve(self, name: str | None, param: str = "model") -> Variant:
        """The variant a request names; refuses paths that are not entries of the adapter dir."""
        if name is None or name in (self.default_name, "default_model"):
            return self.default
        if name in self.variants:
            return self.variants[name]
        if self.root is None:
            raise APIError(404, f"model '{name}' not found (this server has '{self.default_name}')",
                           "not_found_error", param)
        p = Path(name)
        if p.is_absolute() or len(p.parts) != 1 or p.name in ("", ".", ".."):
            raise _bad(f"'{param}' must name an adapter directly under the adapter directory, "
                       f"not the path {name!r}", param)
        path = self.root / p
        if path.resolve().parent != self.root:  # a symlink leading out of the directory
            raise _bad(f"'{param}': {name!r} leads outside the adapter directory", param)
        if not (path / CONFIG).is_file():
            raise APIError(404, f"model '{name}' not found (available: {', '.join(self.names())})",
                           "not_found_error", param)
        return self._load(Variant(name, path.resolve()))

    def _load(self, variant: Variant) -> Variant:
        """Build the adapter's layers on the bare base and keep the modules it replaced."""
        start = time.perf_counter()
        self._restore()
        if variant.path is not None:
            try:
                load_adapter(self.model, variant.path)
            except (ValueError, FileNotFoundError, KeyError) as e:
                self._restore_all()
                msg = e.args[0] if e.args else str(e)
                raise APIError(400, f"cannot load adapter '{variant.name}': {msg}",
                               param="model") from None
            self.model.eval()
            now = dict(self.model.named_modules())
            changed = [p for p, m in self.base.items() if now.get(p) is not m]
            variant.modules = {p: now[p] for p in changed if _parent(p) not in changed}
        variant.cache = PromptCache(self.model)
        variant.load_seconds = time.perf_counter() - start
        self.variants[variant.name] = self.active = variant
        return variant

    def _restore(self) -> None:
        if self.active is not None and self.active.modules:
            self.model.update_modules(tree_unflatten([(p, self.base[p]) for p in self.active.modules]))
        self.active = None

    def _restore_all(self) -> None:
        """Put back every base module (after a failed load, whatever it touched)."""
        now = dict(self.model.named_modules())
        changed = [p for p, m in self.base.items() if now.get(p) is not m]
        top = [p for p in changed if _parent(p) not in changed]
        if top:
            self.model.update_modules(tree_unflatten([(p, self.base[p]) for p in top]))

    def activate(self, variant: Variant) -> None:
        """Make the model compute `variant` (the caller holds the model lock)."""
        if self.active is variant:
            return
        start = time.perf_counter()
        self._restore()
        if variant.modules:
            self.model.update_modules(tree_unflatten(list(variant.modules.items())))
        self.active = variant
        self.switch_seconds = time.perf_counter() - start


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


# ---- generation ----

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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, model, tokenizer, model_name: str, verbose: bool = False,
                 adapter_path=None, adapter_dir=None, allowed_origins=(),
                 max_body: int = DEFAULT_MAX_BODY_MB << 20, defaults: dict | None = None,
                 chat_template_args: dict | None = None):
        self.model, self.tokenizer, self.model_name, self.verbose = model, tokenizer, model_name, verbose
        self.allowed_origins, self.max_body = tuple(allowed_origins), max_body
        self.defaults = {"temperature": DEFAULT_TEMP, "top_p": DEFAULT_TOP_P, "top_k": 0, "min_p": 0.0,
                         "max_tokens": DEFAULT_MAX_TOKENS, **(defaults or {})}
        self.chat_template_args = chat_template_args or {}
        self.lock = threading.Lock()
        self.adapters = Adapters(model, model_name, adapter_path, adapter_dir)
        self.fingerprint = f"smoa-mlx-{uuid.uuid4().hex[:8]}"
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        """A client that hangs up is routine; anything else is one line on stderr, not a traceback."""
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            print(f"error: {client_address[0]}: {type(e).__name__}: {e}", file=sys.stderr)

    @property
    def vocab(self) -> int:
        args = getattr(self.model, "args", None)
        return getattr(args, "vocab_size", None) or len(self.tokenizer.get_vocab())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def variant(self, req: dict) -> Variant:
        if "adapters" in req:
            return self.adapters.resolve(req["adapters"], "adapters")
        return self.adapters.resolve(req.get("model"))

    def prompt(self, req: dict) -> list[int]:
        if "messages" not in req:
            p = req["prompt"]
            tokens = list(self.tokenizer.encode(p)) if isinstance(p, str) else p
            if not all(0 <= t < self.vocab for t in tokens):
                raise _bad(f"'prompt' token ids must be in [0, {self.vocab})", "prompt")
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
            raise _bad(f"cannot apply the chat template: {e}", "messages") from None

    def _sampling(self, req: dict, vocab: int):
        get = lambda k: req.get(k, self.defaults.get(k))  # noqa: E731
        top_k = get("top_k")
        bias = req.get("logit_bias") or {}
        if not all(0 <= t < vocab for t in bias):
            raise _bad(f"'logit_bias' token ids must be in [0, {vocab})", "logit_bias")
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


def _logprobs_chat(tokenizer, entries):
    def item(prev, t, lp):
        s = _piece(tokenizer, prev, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**item(prev, t, lp), "top_logprobs": [item(prev, i, v) for i, v in top]}
                        for prev, t, lp, top in entries]}


def _logprobs_text(tokenizer, entries, offset):
    tokens, offsets = [], []
    for prev, t, _, _ in entries:
        tokens.append(_piece(tokenizer, prev, t))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for _, _, lp, _ in entries],
            "top_logprobs": [{_piece(tokenizer, prev, i): v for i, v in top} for prev, _, _, top in entries],
            "text_offset": offsets}


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    timeout = SOCKET_TIMEOUT

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _cors(self) -> None:
        origins = self.server.allowed_origins
        origin = self.headers.get("Origin")
        if "*" in origins:
            self.send_header("Access-Control-Allow-Origin", "*")
        elif origin in origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        else:
            return
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")

    def _send_json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._cors()
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method, ...) as JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9" or not hasattr(self, "headers"):
            self.request_version = "HTTP/1.1"  # answer with a status line, never bare HTML
            self.headers = {}
        self._error(APIError(code, message or self.responses.get(code, ("error",))[0], "invalid_request_error"))

    def _error(self, e: APIError) -> None:
        self._send_json(e.status, {"error": {"message": e.message, "type": e.kind,
                                             "param": e.param, "code": e.status}})

    def do_OPTIONS(self):
        self.send_response(204)
        self._cors()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            now = int(time.time())
            self._send_json(200, {"object": "list", "data": [
                {"id": n, "object": "model", "created": now, "owned_by": "smoa-mlx"}
                for n in self.server.adapters.names()]})
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(APIError(404, f"no such endpoint: GET {self.path}", "not_found_error"))

    def do_POST(self):
        try:
            path = self.path.split("?")[0].rstrip("/")
            if path in ("/v1/chat/completions", "/chat/completions"):
                fields = CHAT
            elif path in ("/v1/completions", "/completions"):
                fields = COMPLETIONS
            else:
                self.close_connection = True  # its body, if any, is left unread
                raise APIError(404, f"no such endpoint: POST {self.path}", "not_found_error")
            req = parse_request(self._body(), fields)
            if req.get("stream"):
                self._stream(req)
            else:
                self._complete(req)
        except APIError as e:
            self._error(e)
        except OSError:  # the client went away or stalled; the lock is released
            self.close_connection = True
        except Exception as e:  # a bug must not take the server down
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            self._error(APIError(500, f"{type(e).__name__}: {e}", "server_error"))

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length header (chunked bodies are not read)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise APIError(411, "a Content-Length header is required") from None
        if length < 0:
            self.close_connection = True
            raise _bad("Content-Length must be >= 0")
        if length > self.server.max_body:
            self.close_connection = True
            self._drain(length)
            raise APIError(413, f"the body is {length} bytes; this server accepts at most "
                                f"{self.server.max_body} (--max-body-mb)", "request_too_large")
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionResetError("body cut short")
        return body

    def _drain(self, length: int) -> None:
        """Read and drop an oversized body (in bounded memory) so the client sees the 413."""
        left = min(length, 64 * self.server.max_body)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)

    def _head(self, req: dict, kind: str) -> dict:
        prefix = "chatcmpl" if "messages" in req else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                # the adapter the request chose (mlx-lm's `adapters` field wins over `model`)
                "model": req["adapters"] if isinstance(req.get("adapters"), str)
                else req.get("model", self.server.model_name),
                "system_fingerprint": self.server.fingerprint}

    def _generate(self, req: dict):
        """Resolve, tokenize and start generating under the model lock; yields Chunks."""
        srv = self.server
        with srv.lock:
            variant = srv.variant(req)
            tokens = srv.prompt(req)
            yield from srv.completion(req, variant, tokens)

    def _tool_formatter(self, req, streaming: bool):
        """mlx-lm's: the tool parser's calls as OpenAI `tool_calls` (ids; indices when streaming)."""
        parser = self.server.tokenizer.tool_parser
        if parser is None:
            return lambda calls: []
        from mlx_lm.server import ToolCallFormatter

        return ToolCallFormatter(parser, req.get("tools"), streaming)

    def _complete(self, req: dict) -> None:
        tok = self.server.tokenizer
        chunks = list(self._generate(req))
        last = chunks[-1]
        text = "".join(c.text for c in chunks)
        entries = [e for c in chunks for e in c.logprobs]
        if "messages" in req:
            message = {"role": "assistant", "content": text or None}
            reasoning = "".join(c.reasoning for c in chunks)
            if reasoning:
                message["reasoning"] = reasoning
            calls = self._tool_formatter(req, False)([t for c in chunks for t in c.tool_calls])
            if calls:
                message["tool_calls"] = calls
            choice = {"index": 0, "message": message,
                      "logprobs": _logprobs_chat(tok, entries) if req.get("logprobs") else None,
                      "finish_reason": last.finish}
            head = self._head(req, "chat.completion")
        else:
            prompt = req["prompt"] if isinstance(req["prompt"], str) else tok.decode(req["prompt"])
            echo = prompt if req.get("echo") else ""
            choice = {"index": 0, "text": echo + text,
                      "logprobs": _logprobs_text(tok, entries, len(echo)) if "logprobs" in req else None,
                      "finish_reason": last.finish}
            head = self._head(req, "text_completion")
        self._send_json(200, {**head, "choices": [choice], "usage": last.usage})

    def _stream(self, req: dict) -> None:
        chat = "messages" in req
        tok = self.server.tokenizer
        head = self._head(req, "chat.completion.chunk" if chat else "text_completion")
        usage = req.get("stream_options", {}).get("include_usage", False)
        tool_calls = self._tool_formatter(req, True)

        def send(choice: dict | None, usage_obj=None):
            chunk = {**head, "choices": [] if choice is None else [{"index": 0, **choice}]}
            if usage:
                chunk["usage"] = usage_obj
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        chunks = self._generate(req)
        try:
            first = next(chunks)  # errors before any output still get a JSON error response
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream's end is the connection's end
            self._cors()
            self.end_headers()
            self.close_connection = True
            offset = 0
            if chat:
                send({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
            elif req.get("echo"):
                p = req["prompt"]
                echo = p if isinstance(p, str) else tok.decode(p)
                send({"text": echo, "logprobs": None, "finish_reason": None})
                offset = len(echo)
            last = first
            for c in _chain(first, chunks):
                last = c
                if chat:
                    delta = {}
                    if c.text:
                        delta["content"] = c.text
                    if c.reasoning:
                        delta["reasoning"] = c.reasoning
                    calls = tool_calls(c.tool_calls)
                    if calls:
                        delta["tool_calls"] = calls
                    lp = _logprobs_chat(tok, c.logprobs) if req.get("logprobs") else None
                    if delta or c.finish or lp:
                        send({"delta": delta, "logprobs": lp, "finish_reason": c.finish})
                else:
                    lp = _logprobs_text(tok, c.logprobs, offset) if "logprobs" in req else None
                    offset += len(c.text)
                    if c.text or c.finish or lp:
                        send({"text": c.text, "logprobs": lp, "finish_reason": c.finish})
            if usage:
                send(None, last.usage)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            chunks.close()


def _chain(first, rest):
    yield first
    yield from rest


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8080,
                model_name: str = "default", verbose: bool = False, **options) -> Server:
    """A bound, not yet serving server (port 0 picks a free port): call `serve_forever()`,
    then `shutdown()` and `server_close()`. `options`: adapter_path, adapter_dir,
    allowed_origins, max_body (bytes), defaults (sampling), chat_template_args."""
    return Server((host, port), model, tokenizer, model_name, verbose, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.serve",
        description="OpenAI-compatible server for a model and its SMoA / LoRA adapters.",
    )
    add_model_args(parser)
    parser.add_argument("--adapter-dir", default=None,
                        help="Also serve every adapter directory directly under this one, selected "
                             "per request by 'model' (or mlx-lm's 'adapters').")
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8080, help="Port (0 picks a free one)")
    parser.add_argument("--allowed-origins", type=lambda x: [o for o in x.split(",") if o], default=[],
                        help="Comma-separated origins allowed by CORS ('*' for any; default: none).")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help=f"Refuse request bodies larger than this with 413 (default: {DEFAULT_MAX_BODY_MB})")
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Default sampling temperature")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Default nucleus sampling top-p")
    parser.add_argument("--top-k", type=int, default=0, help="Default top-k (0 disables it)")
    parser.add_argument("--min-p", type=float, default=0.0, help="Default min-p (0 disables it)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"Default chat completion limit (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--chat-template-args", type=json.loads, default={},
                        help="JSON arguments for apply_chat_template, e.g. '{\"enable_thinking\": false}'")
    parser.add_argument("--verbose", action="store_true", help="Log every request to stderr.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.adapter_path is not None and not Path(args.adapter_path).is_dir():
        raise MissingFileError(f"{args.adapter_path}: adapter directory not found")
    if args.max_body_mb <= 0 or args.max_tokens < 1:
        raise ConfigError("--max-body-mb must be > 0 and --max-tokens >= 1")
    model, tokenizer = load_model(args.model)
    defaults = {"temperature": args.temp, "top_p": args.top_p, "top_k": args.top_k,
                "min_p": args.min_p, "max_tokens": args.max_tokens}
    try:
        server = make_server(model, tokenizer, args.host, args.port, args.model, args.verbose,
                             adapter_path=args.adapter_path, adapter_dir=args.adapter_dir,
                             allowed_origins=args.allowed_origins, max_body=int(args.max_body_mb * 2**20),
                             defaults=defaults, chat_template_args=args.chat_template_args)
    except APIError as e:
        raise AdapterError(e.message) from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    names = server.adapters.names()
    print(f"[serve] {args.model} at {server.url}/v1, models: {', '.join(names)} (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run(main)
