"""Interactive terminal chat with a model plus an optional adapter.

The conversation is kept; the KV cache is reused across turns, so each turn
encodes only its new tokens (`generate.PromptCache`). Reads stdin line by
line, so it also runs with stdin piped. `/reset` starts over, `/exit` or EOF quits.

    python -m smoa_mlx.chat --model M --adapter-path A
"""

from __future__ import annotations

import argparse
import sys

from .cli import run
from .generate import (
    PromptCache, add_model_args, add_prompt_args, add_sampling_args, load_model, prompt_tokens,
    sampler_from_args,
)

DEFAULT_MAX_TOKENS = 256
HELP = "/reset clears the conversation, /exit or Ctrl-D quits."


class ChatSession:
    """A conversation: its messages and the KV cache that already holds them."""

    def __init__(self, model, tokenizer, system_prompt=None, use_chat_template=True,
                 max_tokens=DEFAULT_MAX_TOKENS, sampler=None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.use_chat_template = use_chat_template
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.cache = PromptCache(model)
        self.last = None
        self.reset()

    def reset(self) -> None:
        sp = self.system_prompt
        self.messages = [] if sp is None else [{"role": "system", "content": sp}]
        self.cache.reset()

    def reply(self, text: str):
        """Yield the reply to `text` piece by piece; the finished reply joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        tokens = prompt_tokens(self.tokenizer, self.messages, self.use_chat_template)
        pieces = []
        try:
            for response in self.cache.stream(self.tokenizer, tokens, self.max_tokens, self.sampler):
                self.last = response  # its prompt_tokens counts only the tokens fed this turn
                pieces.append(response.text)
                yield response.text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.chat",
        description=f"Chat with a model and an optional SMoA / LoRA adapter. {HELP}",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    add_sampling_args(parser, DEFAULT_MAX_TOKENS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sampler = sampler_from_args(args)
    model, tokenizer = load_model(args.model, args.adapter_path, inference=True)
    session = ChatSession(model, tokenizer, args.system_prompt, not args.ignore_chat_template,
                          args.max_tokens, sampler)
    print(f"[chat] {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            session.reset()
            print("[conversation reset]", flush=True)
            continue
        if line in ("/help", "/?"):
            print(HELP, flush=True)
            continue
        try:
            for piece in session.reply(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            pass
        print(flush=True)


if __name__ == "__main__":
    run(main)
