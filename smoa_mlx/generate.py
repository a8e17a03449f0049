"""Generate text from a model plus an optional adapter (SMoA, mlx-lm LoRA/DoRA, or a fused dir).

Also the pieces `chat` and `serve` share, so the three never drift apart:
`load_model` (re-exported from `loader`), `prompt_tokens` (chat template
or raw text), `sampler_from` and `PromptCache` (a KV cache that remembers the
tokens it holds and feeds only what is new). Sampling, KV caches and decoding
are mlx-lm's own.

    python -m smoa_mlx.generate --model M --adapter-path A --prompt "Hello"
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .cli import run
from .data import common_prefix
from .errors import ConfigError
from .loader import load_model

DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="Local model directory or Hugging Face repo (a fused model is a plain model).")
    parser.add_argument("--adapter-path", default=None, help="Adapter directory (SMoA, or mlx-lm LoRA/DoRA).")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    parser.add_argument("--max-tokens", "-m", type=int, default=max_tokens,
                        help=f"Maximum number of tokens to generate (default: {max_tokens})")
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Sampling top-p")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument("--ignore-chat-template", action="store_true",
                        help="Use the raw text even when the tokenizer has a chat template.")


def sampler_from(temp: float = DEFAULT_TEMP, top_p: float = DEFAULT_TOP_P, seed: int | None = None):
    """mlx-lm's sampler; seeds MLX's global PRNG first when a seed is given."""
    if temp < 0:
        raise ConfigError(f"temperature must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top-p must be in (0, 1], got {top_p}")
    if seed is not None:
        mx.random.seed(seed)
    return make_sampler(temp, top_p)


def sampler_from_args(args: argparse.Namespace):
    """Check the sampling flags of `add_sampling_args`, then build the sampler."""
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return sampler_from(args.temp, args.top_p, args.seed)


def make_messages(prompt: str, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return messages + [{"role": "user", "content": prompt}]


def prompt_tokens(tokenizer, messages: list[dict], use_chat_template: bool = True) -> list[int]:
    """Token ids of a conversation, ready for the assistant's reply.

    With the tokenizer's chat template when it has one (and it is wanted);
    otherwise `raw_text(messages)` encoded with BOS, so a single prompt is
    exactly the raw text, as `mlx_lm.generate` encodes it.
    """
    if use_chat_template and tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return list(tokenizer.encode(raw_text(messages)))


def raw_text(messages: list[dict]) -> str:
    """A conversation as one running text, for models without a chat template: each
    reply continues the text it answers; other turns start after a blank line."""
    text = ""
    for m in messages:
        text += ("" if m["role"] == "assistant" or not text else "\n\n") + m["content"]
    return text


class PromptCache:
    """A KV cache plus the tokens it holds.

    Each `stream` call trims the cache back to the longest common prefix with
    the new prompt and feeds only the rest, so a chat (or a front-end that
    re-sends the whole conversation) never re-encodes what it already saw, and
    the result equals a fresh generation on the full prompt.
    """

    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self.tokens: list[int] = []

    def stream(self, tokenizer, tokens: list[int], max_tokens: int, sampler=None, logits_processors=None):
        """Yield mlx-lm `GenerationResponse`s for the reply to `tokens`."""
        if not tokens:
            raise ConfigError("the prompt is empty")
        keep = min(common_prefix(self.tokens, tokens), len(tokens) - 1)  # feed >= 1 token
        if keep < len(self.tokens):
            if can_trim_prompt_cache(self.cache):
                trim_prompt_cache(self.cache, len(self.tokens) - keep)
            else:
                self.reset()
                keep = 0
        self.tokens = list(tokens[:keep])
        if logits_processors and keep:  # penalties see the whole prompt, as in a fresh generation
            prefix = mx.array(tokens[:keep])
            logits_processors = [lambda t, x, p=p: p(mx.concatenate([prefix, t]), x) for p in logits_processors]
        generated: list[int] = []
        try:
            for response in stream_generate(
                self.model, tokenizer, mx.array(tokens[keep:]), max_tokens=max_tokens,
                sampler=sampler, logits_processors=logits_processors, prompt_cache=self.cache,
            ):
                generated.append(response.token)
                yield response
        finally:
            self._sync(list(tokens) + generated)

    def _sync(self, tokens: list[int]) -> None:
        """Make `self.tokens` describe exactly what the cache holds."""
        offset = self.cache[0].offset
        if offset > len(tokens):
            trim_prompt_cache(self.cache, offset - len(tokens))
        self.tokens = tokens[:offset]
        if offset:
            mx.eval([c.state for c in self.cache])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.generate",
        description="Generate text with a model and an optional SMoA / LoRA adapter.",
    )
    add_model_args(parser)
    parser.add_argument("--prompt", "-p", required=True,
                        help="The message ('-' reads it from stdin; '\\n' is a newline).")
    add_prompt_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--verbose", action="store_true", help="Print speed and token counts to stderr.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sampler = sampler_from_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n")
    model, tokenizer = load_model(args.model, args.adapter_path, inference=True)
    tokens = prompt_tokens(tokenizer, make_messages(prompt, args.system_prompt), not args.ignore_chat_template)
    response = None
    for response in PromptCache(model).stream(tokenizer, tokens, args.max_tokens, sampler):
        print(response.text, end="", flush=True)
    print()
    if args.verbose and response is not None:
        print(f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s; "
              f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
