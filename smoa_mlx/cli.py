"""What every command line shares: one-line errors instead of tracebacks."""

from __future__ import annotations

import sys

from .errors import ConfigError, SMoAError

# TRANSITIONAL (issue 17): modules not yet converted to the typed errors still raise
# these for bad input. Remove once every module raises SMoAError; then anything else
# is a bug and keeps its traceback.
_UNCONVERTED = (ValueError, FileNotFoundError)


class UsageError(ConfigError):
    """Flags that do not go together (kept for the commands that raise it)."""


def run(main, argv=None) -> None:
    """Run `main(argv)`; a `SMoAError` (bad input, named precisely) becomes `error: ...`
    on stderr and exit 1. Anything else is a bug and keeps its traceback."""
    from .blas import warn_if_reference

    warn_if_reference()
    try:
        code = main(argv)
    except (SMoAError, *_UNCONVERTED) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
