"""`python -m smoa_mlx.serve`: an OpenAI-compatible HTTP server for one base model and any
number of adapters.

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
import json
import sys
from pathlib import Path

from ..errors import AdapterError, ConfigError, MissingFileError
from ..generate import DEFAULT_TEMP, DEFAULT_TOP_P, add_model_args, load_model
from .generation import DEFAULT_MAX_TOKENS
from .schema import APIError
from .server import DEFAULT_MAX_BODY_MB, make_server


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

