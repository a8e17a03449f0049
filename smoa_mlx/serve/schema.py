"""The OpenAI request schema: every field of `/v1/chat/completions` and `/v1/completions`
(OpenAI's and mlx-lm's extensions) with its checker; `parse_request` turns a body into a
checked request or an `APIError` (a precise 400 naming the field)."""

from __future__ import annotations

import json

MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _unsupported(name: str, why: str) -> APIError:
    return bad_request(f"'{name}' {why} is not supported by this server", name)


# ---- field checkers: each takes (name, value) and returns the checked value ----

def _int(lo=None, hi=None):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad_request(f"'{name}' must be an integer", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad_request(f"'{name}' must be in [{lo}, {hi}]" if hi is not None
                       else f"'{name}' must be >= {lo}", name)
        return v
    return check


def _number(lo, hi):
    def check(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_request(f"'{name}' must be a number", name)
        if not lo <= v <= hi:  # also refuses NaN
            raise bad_request(f"'{name}' must be in [{lo}, {hi}]", name)
        return float(v)
    return check


def _type(kind, label):
    def check(name, v):
        if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
            raise bad_request(f"'{name}' must be {label}", name)
        return v
    return check


_str, _bool, _obj = _type(str, "a string"), _type(bool, "a boolean"), _type(dict, "an object")


def _stop(name, v):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad_request(f"'{name}' must be a non-empty string or a list of at most 4 non-empty strings", name)
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
        raise bad_request(f"'{name}' must map token ids to numbers", name) from None
    if not all(-100 <= b <= 100 for b in bias.values()):
        raise bad_request(f"'{name}' values must be in [-100, 100]", name)
    return bias


def _stream_options(name, v):
    _obj(name, v)
    unknown = sorted(set(v) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise bad_request(f"'{name}' has unsupported field '{unknown[0]}'", name)
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
        raise bad_request(f"'{name}' must be a list of {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}", name)
    return v


def _tool_choice(name, v):
    if v in ("auto", "none"):
        return v
    raise _unsupported(name, f"= {json.dumps(v)} (forcing a call; use \"auto\" or \"none\")")


def _functions(name, v):
    """The deprecated `functions` list, honoured as `tools`."""
    if not isinstance(v, list) or not all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in v):
        raise bad_request(f"'{name}' must be a list of {{\"name\": ...}} objects", name)
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
    raise bad_request(f"'{name}' must be a string or a list of text parts", name)


def _tool_calls(name, v):
    """Assistant tool calls, with `arguments` parsed for the chat template (as mlx-lm does)."""
    if not isinstance(v, list):
        raise bad_request(f"'{name}' must be a list", name)
    out = []
    for j, call in enumerate(v):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"'{name}[{j}].function.name' must be a string", name)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise bad_request(f"'{name}[{j}].function.arguments' is not valid JSON", name) from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "refusal")


def _messages(name, v):
    if not isinstance(v, list) or not v:
        raise bad_request(f"'{name}' must be a non-empty list", name)
    out = []
    for i, m in enumerate(v):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object", name)
        unknown = sorted(set(m) - set(MESSAGE_FIELDS))
        if unknown:
            raise bad_request(f"'{where}' has unsupported field '{unknown[0]}'", name)
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"'{where}.role' must be one of {', '.join(ROLES)}", name)
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise bad_request(f"'{where}' has no 'content'", name)
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
    raise bad_request(f"'{name}' must be a string, a list of token ids, or a list of one of these", name)


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
        raise bad_request(f"malformed JSON: {e}") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise bad_request(f"unsupported field '{unknown[0]}'", unknown[0])
    required = "messages" if "messages" in fields else "prompt"
    if data.get(required) is None:
        raise bad_request(f"'{required}' is required", required)
    req = {k: fields[k](k, v) for k, v in data.items() if v is not None}
    if req.get("top_p", 1.0) == 0.0:
        raise bad_request("'top_p' must be in (0, 1]", "top_p")
    if req.get("suffix"):
        raise _unsupported("suffix", "(insertion)")
    if req.get("echo") and req.get("logprobs"):
        raise _unsupported("echo", "with 'logprobs' (prompt log-probabilities)")
    if "top_logprobs" in req and not req.get("logprobs"):
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if "functions" in req and "tools" not in req:
        req["tools"] = req.pop("functions")
    if req.get("tool_choice", req.get("function_call")) == "none":
        req.pop("tools", None)
    return req
