"""What every command line shares: one-line errors instead of tracebacks."""

from __future__ import annotations

import sys

from .errors import ConfigError, SMoAError


class UsageError(ConfigError):
    """Flags that do not go together (kept for the commands that raise it)."""


def run(main, argv=None) -> None:
    """Run `main(argv)`; a `SMoAError` (bad input, named precisely) becomes `error: ...`
    on stderr and exit 1. Anything else is a bug and keeps its traceback."""
    from .blas import warn_if_reference

    warn_if_reference()
    try:
        code = main(argv)
    except SMoAError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


def _console_script(command: str):
    """A console-script entry point (`smoa_mlx.train`, ... as mlx-lm 0.32 ships its commands)
    that runs the command's `main` exactly as `python -m smoa_mlx.<command>` does."""
    def entry() -> None:
        import importlib

        module = importlib.import_module(f"smoa_mlx.{command}")
        run(getattr(module, "main", None) or importlib.import_module(f"smoa_mlx.{command}.__main__").main)

    entry.__name__ = command
    return entry


# pyproject.toml's [project.scripts] points at these.
train, generate, chat, serve, evaluate, fuse, convert, lm_eval = map(
    _console_script, ("train", "generate", "chat", "serve", "evaluate", "fuse", "convert", "lm_eval"))
