"""User-facing errors.

A `UcaiError` is a mistake in what the user asked for (a missing file, a malformed
line, an unknown model alias). The CLI prints it as one line and exits non-zero
instead of showing a traceback, because the traceback says nothing the message
does not.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UcaiError(Exception):
    """An error in the user's input, reported as one line without a traceback."""


def located(path: object, line: int | None, message: str) -> UcaiError:
    """Build an error that names the file (and line, 1-based) it is about."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UcaiError(f"{where}: {message}")


def user_error(exc: BaseException | None) -> UcaiError | None:
    """The `UcaiError` in an exception's cause/context chain, if there is one.

    jsonargparse wraps errors raised while instantiating classes (a constitution with a
    missing field, say) in its own; the user's mistake is the cause."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UcaiError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def exit_status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``main(argv)`` as a command: a user's mistake is one ``ucai: error:`` line on
    stderr and status 2, Ctrl-C is status 130, any other exception propagates."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("ucai: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = user_error(exc)
        if cause is None:
            raise
        print(f"ucai: error: {cause}", file=sys.stderr)
        return 2
