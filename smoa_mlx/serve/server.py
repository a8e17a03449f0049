"""The HTTP side of the server: `Server` (threads per connection, CORS, body limits) and
`Handler`, which turns `Chunk`s into OpenAI JSON responses and SSE streams."""

from __future__ import annotations

import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .generation import Engine, logprobs_chat, logprobs_text
from .registry import Adapters
from .schema import CHAT, COMPLETIONS, APIError, bad_request, parse_request

DEFAULT_MAX_BODY_MB = 8
SOCKET_TIMEOUT = 60.0  # seconds a client may stall mid-request before it is dropped


class Server(ThreadingHTTPServer):
    """The HTTP side: one thread per connection, model calls through `engine` (one at a time)."""
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, model, tokenizer, model_name: str, verbose: bool = False,
                 adapter_path=None, adapter_dir=None, allowed_origins=(),
                 max_body: int = DEFAULT_MAX_BODY_MB << 20, defaults: dict | None = None,
                 chat_template_args: dict | None = None):
        self.model, self.tokenizer, self.model_name, self.verbose = model, tokenizer, model_name, verbose
        self.allowed_origins, self.max_body = tuple(allowed_origins), max_body
        self.adapters = Adapters(model, model_name, adapter_path, adapter_dir)
        self.engine = Engine(model, tokenizer, self.adapters, defaults, chat_template_args)
        self.fingerprint = f"smoa-mlx-{uuid.uuid4().hex[:8]}"
        super().__init__(address, Handler)

    def handle_error(self, request, client_address):
        """A client that hangs up is routine; anything else is one line on stderr, not a traceback."""
        e = sys.exc_info()[1]
        if not isinstance(e, OSError):
            print(f"error: {client_address[0]}: {type(e).__name__}: {e}", file=sys.stderr)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


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
            raise bad_request("Content-Length must be >= 0")
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

    def _tool_formatter(self, req, streaming: bool):
        """mlx-lm's: the tool parser's calls as OpenAI `tool_calls` (ids; indices when streaming)."""
        parser = self.server.tokenizer.tool_parser
        if parser is None:
            return lambda calls: []
        from mlx_lm.server import ToolCallFormatter

        return ToolCallFormatter(parser, req.get("tools"), streaming)

    def _complete(self, req: dict) -> None:
        tok = self.server.tokenizer
        chunks = list(self.server.engine.generate(req))
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
                      "logprobs": logprobs_chat(tok, entries) if req.get("logprobs") else None,
                      "finish_reason": last.finish}
            head = self._head(req, "chat.completion")
        else:
            prompt = req["prompt"] if isinstance(req["prompt"], str) else tok.decode(req["prompt"])
            echo = prompt if req.get("echo") else ""
            choice = {"index": 0, "text": echo + text,
                      "logprobs": logprobs_text(tok, entries, len(echo)) if "logprobs" in req else None,
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

        chunks = self.server.engine.generate(req)
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
                    lp = logprobs_chat(tok, c.logprobs) if req.get("logprobs") else None
                    if delta or c.finish or lp:
                        send({"delta": delta, "logprobs": lp, "finish_reason": c.finish})
                else:
                    lp = logprobs_text(tok, c.logprobs, offset) if "logprobs" in req else None
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

