"""lm-evaluation-harness on a base model plus an adapter (SMoA, HiRA, mlx-lm LoRA/DoRA).

lm-eval (0.4) finds models only in its own registry and reads no plugin entry points,
so this front end registers the `smoa_mlx` model (`model.SMoALM`) and runs lm-eval's
own command line with the same flags (`--model` defaults to `smoa_mlx`):

    python -m smoa_mlx.lm_eval --model_args model=M,adapter_path=A --tasks arc_easy --batch_size 8

From Python, `import smoa_mlx.lm_eval.model` registers it for `lm_eval.simple_evaluate(
model="smoa_mlx", model_args={...})`. Needs `pip install 'smoa-mlx[lmeval]'`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from ..errors import ConfigError

MODEL = "smoa_mlx"


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'smoa-mlx[lmeval]' "
                          "(or pip install lm-eval)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.lm_eval", allow_abbrev=False,
        description="lm-evaluation-harness on a model plus an optional SMoA / HiRA / LoRA / DoRA "
                    "adapter: lm-eval's own command line (every flag of `lm-eval run --help`) "
                    "with the smoa_mlx model registered. --model_args keys: model (a directory, "
                    "hub id, .gguf or ollama:NAME), adapter_path, max_tokens, use_chat_template, "
                    "trust_remote_code.",
        epilog="e.g. python -m smoa_mlx.lm_eval --model_args model=M,adapter_path=A "
               "--tasks arc_easy --batch_size 8")
    parser.add_argument("--model", default=MODEL, help=f"lm-eval's model name (default: {MODEL})")
    return parser


def main(argv=None) -> int:
    """lm-eval's `run` command with the `smoa_mlx` model registered."""
    args, rest = build_parser().parse_known_args(argv)
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    from . import model  # noqa: F401  (registers MODEL with lm-eval)

    # lm-eval's parser reads sys.argv; "run" is its evaluation command.
    sys.argv = ["lm-eval", "run", "--model", args.model, *rest]
    cli_evaluate()
    return 0
