"""The OpenAI-compatible server (`python -m smoa_mlx.serve`; what it does: `cli.py`):
`schema` checks requests, `registry` swaps adapters, `generation` makes chunks, `server` speaks HTTP."""

from .cli import build_parser, main
from .generation import DEFAULT_COMPLETION_TOKENS, DEFAULT_MAX_TOKENS, Chunk, Engine, stop_position
from .registry import Adapters, Variant
from .schema import CHAT, COMPLETIONS, MAX_TOP_LOGPROBS, APIError, parse_request
from .server import DEFAULT_MAX_BODY_MB, SOCKET_TIMEOUT, Handler, Server, make_server

__all__ = [
    "CHAT", "COMPLETIONS", "DEFAULT_COMPLETION_TOKENS", "DEFAULT_MAX_BODY_MB", "DEFAULT_MAX_TOKENS",
    "MAX_TOP_LOGPROBS", "SOCKET_TIMEOUT", "APIError", "Adapters", "Chunk", "Engine", "Handler",
    "Server", "Variant", "build_parser", "main", "make_server", "parse_request", "stop_position",
]
