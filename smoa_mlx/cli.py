"""What every command line shares: one-line errors instead of tracebacks."""

from __future__ import annotations

import sys


class UsageError(ValueError):
    """Bad input from the user: printed as one line, never a traceback."""


def run(main, argv=None) -> None:
    """Run `main(argv)`; user-facing errors become `error: ...` on stderr and exit 1."""
    from .blas import warn_if_reference

    warn_if_reference()
    try:
        code = main(argv)
    except (UsageError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
