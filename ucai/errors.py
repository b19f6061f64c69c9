"""User-facing errors.

A `UcaiError` is a mistake in what the user asked for (a missing file, a malformed
line, an unknown model alias). The CLI prints it as one line and exits non-zero
instead of showing a traceback, because the traceback says nothing the message
does not.
"""

from __future__ import annotations


class UcaiError(Exception):
    """An error in the user's input, reported as one line without a traceback."""


def located(path: object, line: int | None, message: str) -> UcaiError:
    """Build an error that names the file (and line, 1-based) it is about."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return UcaiError(f"{where}: {message}")
