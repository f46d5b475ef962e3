"""A user's mistake, and how the CLIs report it: one line, exit status 2."""

from __future__ import annotations

import functools
import sys

__all__ = ["UsageError", "command"]


class UsageError(Exception):
    """A user's mistake (a file, a flag, a checkpoint): the CLIs print it as one line naming the
    cause and the fix, and exit with status 2. A genuine bug keeps its traceback."""


def command(prog: str):
    """Decorate a CLI ``main(argv)``: a :class:`UsageError` becomes ``error: prog: ...`` on
    stderr and exit status 2 (as argparse's own errors)."""

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            try:
                return main(argv)
            except UsageError as exc:
                print(f"error: {prog}: {exc}", file=sys.stderr)
                raise SystemExit(2) from None

        return wrapper

    return decorate
