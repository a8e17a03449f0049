"""An OpenAI-compatible HTTP server for a model plus an optional adapter.

`POST /v1/chat/completions` (with or without `"stream": true`, as SSE chunks
ending in `data: [DONE]`) and `GET /v1/models`, so existing chat front-ends
can talk to a fine-tune. Requests are validated strictly: malformed JSON, an
unknown field or a wrong type is a 400 with a JSON error body. Model calls
are serialised by one lock and share one `PromptCache`, so a front-end that
re-sends the whole conversation only pays for the new turn.

    python -m smoa_mlx.serve --model M --adapter-path A [--host 127.0.0.1 --port 8080]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .cli import run
from .generate import (
    DEFAULT_TEMP, DEFAULT_TOP_P, PromptCache, add_model_args, load_model,
    prompt_tokens, sampler_from,
)

DEFAULT_MAX_TOKENS = 512  # when a request sets no limit (mlx-lm's server default)
MAX_BODY = 16 * 1024 * 1024
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _int(name, lo):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(f"'{name}' must be an integer")
        if lo is not None and v < lo:
            raise _bad(f"'{name}' must be >= {lo}")
        return v
    return check


def _number(name, lo, hi):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(f"'{name}' must be a number")
        if not lo <= v <= hi:
            raise _bad(f"'{name}' must be in [{lo}, {hi}]")
        return float(v)
    return check


def _bool(v):
    if not isinstance(v, bool):
        raise _bad("'stream' must be a boolean")
    return v


def _str(name):
    def check(v):
        if not isinstance(v, str):
            raise _bad(f"'{name}' must be a string")
        return v
    return check


def _stop(v):
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of non-empty strings")
    return stops


def _content(i, v):
    """A message's text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        and set(p) == {"type", "text"} for p in v
    ):
        return "".join(p["text"] for p in v)
    raise _bad(f"'messages[{i}].content' must be a string or a list of text parts")


def _messages(v):
    if not isinstance(v, list) or not v:
        raise _bad("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _bad(f"'messages[{i}]' must be an object")
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise _bad(f"'messages[{i}]' has unsupported field '{unknown[0]}'")
        if m.get("role") not in ROLES:
            raise _bad(f"'messages[{i}].role' must be one of {', '.join(ROLES)}")
        if "content" not in m:
            raise _bad(f"'messages[{i}]' has no 'content'")
        out.append({"role": m["role"], "content": _content(i, m["content"])})
    return out


FIELDS = {
    "model": _str("model"),
    "messages": _messages,
    "max_tokens": _int("max_tokens", 1),
    "max_completion_tokens": _int("max_completion_tokens", 1),
    "temperature": _number("temperature", 0.0, 2.0),
    "top_p": _number("top_p", 0.0, 1.0),
    "stream": _bool,
    "seed": _int("seed", 0),
    "stop": _stop,
}


def parse_request(body: bytes) -> dict:
    """Validate a chat-completion request body; returns the checked fields (APIError if bad)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise _bad("the request body must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise _bad(f"unsupported field '{unknown[0]}' (supported: {', '.join(FIELDS)})")
    if "messages" not in data:
        raise _bad("'messages' is required")
    req = {k: FIELDS[k](v) for k, v in data.items() if v is not None or k == "messages"}
    if req.get("top_p", 1.0) == 0.0:
        raise _bad("'top_p' must be in (0, 1]")
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


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model, tokenizer, model_name: str, verbose: bool = False):
        self.model, self.tokenizer, self.model_name, self.verbose = model, tokenizer, model_name, verbose
        self.lock = threading.Lock()
        self.cache = PromptCache(model)
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def completion(self, req: dict):
        """Yield (text piece, finish_reason or None, usage); the caller holds `self.lock`."""
        try:
            tokens = prompt_tokens(self.tokenizer, req["messages"])
        except Exception as e:  # the chat template rejects this conversation (e.g. role order)
            raise _bad(f"cannot apply the chat template: {e}") from None
        max_tokens = req.get("max_completion_tokens", req.get("max_tokens", DEFAULT_MAX_TOKENS))
        sampler = sampler_from(req.get("temperature", DEFAULT_TEMP), req.get("top_p", DEFAULT_TOP_P),
                               req.get("seed"))
        stops = req.get("stop", [])
        text, sent, count = "", 0, 0
        usage = lambda: {"prompt_tokens": len(tokens), "completion_tokens": count,  # noqa: E731
                         "total_tokens": len(tokens) + count}
        with contextlib.closing(self.cache.stream(self.tokenizer, tokens, max_tokens, sampler)) as responses:
            for r in responses:
                text += r.text
                count = r.generation_tokens
                end, stopped = stop_position(text, stops)
                if stopped:
                    yield text[sent:end], "stop", usage()
                    return
                if r.finish_reason is not None:
                    yield text[sent:], r.finish_reason, usage()
                    return
                if end > sent:
                    yield text[sent:end], None, None
                    sent = end


class Handler(BaseHTTPRequestHandler):
    server: Server

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send_json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, e: APIError) -> None:
        self._send_json(e.status, {"error": {"message": e.message, "type": e.kind, "code": e.status}})

    def do_GET(self):
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": int(time.time()),
                 "owned_by": "smoa-mlx"}]})
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(APIError(404, f"no such endpoint: GET {self.path}", "not_found_error"))

    def do_POST(self):
        try:
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                raise APIError(404, f"no such endpoint: POST {self.path}", "not_found_error")
            req = parse_request(self._body())
            with self.server.lock:
                if req.get("stream", False):
                    self._stream(req)
                else:
                    self._complete(req)
        except APIError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the lock is released and the cache stays consistent
        except Exception as e:  # a bug must not take the server down
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            self._error(APIError(500, f"{type(e).__name__}: {e}", "server_error"))

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _bad("a Content-Length header is required") from None
        if not 0 <= length <= MAX_BODY:
            raise _bad(f"the body must be at most {MAX_BODY} bytes")
        return self.rfile.read(length)

    def _head(self, chunk: bool) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if chunk
                else "chat.completion", "created": int(time.time()), "model": self.server.model_name}

    def _complete(self, req: dict) -> None:
        pieces, finish, usage = [], None, None
        for piece, finish, usage in self.server.completion(req):
            pieces.append(piece)
        self._send_json(200, {
            **self._head(False),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": finish}],
            "usage": usage,
        })

    def _stream(self, req: dict) -> None:
        head = self._head(True)

        def send(delta: dict, finish=None):
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        with contextlib.closing(self.server.completion(req)) as chunks:
            first = next(chunks)  # errors before any output still get a JSON error response
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            send({"role": "assistant", "content": ""})
            for piece, finish, _ in itertools.chain([first], chunks):
                if piece:
                    send({"content": piece})
                if finish is not None:
                    send({}, finish)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8080,
                model_name: str = "default", verbose: bool = False) -> Server:
    """A bound, not yet serving server (port 0 picks a free port): call `serve_forever()`,
    then `shutdown()` and `server_close()`."""
    return Server((host, port), model, tokenizer, model_name, verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.serve",
        description="OpenAI-compatible chat server for a model and an optional SMoA / LoRA adapter.",
    )
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8080, help="Port (0 picks a free one)")
    parser.add_argument("--verbose", action="store_true", help="Log every request to stderr.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_model(args.model, args.adapter_path)
    try:
        server = make_server(model, tokenizer, args.host, args.port, args.model, args.verbose)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    print(f"[serve] {args.model} at {server.url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    run(main)
