"""JSON Lines and CSV files: strict reading, atomic writing.

Every file between stages is JSONL (one object per line, UTF-8); some stages also write
a CSV twin. Reading is strict: a malformed line, a non-UTF-8 byte or a missing field is
one `UcaiError` naming the file and the 1-based line. Writing goes through a temporary
file in the same folder and ``os.replace``, so a reader sees the old file or the new
one, never half of one.
"""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ucai.errors import UcaiError, located
from ucai.file_modes import as_ordinary_file


def read_text(path: str | Path) -> str:
    """The whole file as text (``.gz`` un-gzipped); a bad byte names its line."""
    return "".join(line + "\n" for _, line in iter_lines(path))


def _open_binary(path: Path):
    if not path.exists():
        raise UcaiError(f"{path}: file not found")
    if path.is_dir():
        raise UcaiError(f"{path}: is a folder, expected a file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` with the newline removed.

    Lines are decoded one at a time so that a non-UTF-8 byte is reported on its own
    line rather than wherever a decoding buffer happened to end.
    """
    path = Path(path)
    line_number = 0
    with _open_binary(path) as handle:
        try:
            for line_number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise located(path, line_number, f"not valid UTF-8 ({exc.reason})") from None
                yield line_number, text.rstrip("\r\n")
        except (OSError, EOFError) as exc:  # truncated or corrupt gzip
            raise located(path, line_number + 1, f"could not be read ({exc})") from None


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises `UcaiError` ``file:line: ...`` for invalid JSON, a value that is not an
    object, or a missing required field.
    """
    for line_number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise located(path, line_number, f"invalid JSON ({exc.msg}: column {exc.colno})") from None
        if not isinstance(row, dict):
            raise located(path, line_number, f"expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            raise located(path, line_number, f"missing field(s) {', '.join(map(repr, missing))}")
        yield line_number, row


def load_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """All rows of a JSONL file (see `read_jsonl`); an empty file is an error."""
    rows = [row for _, row in read_jsonl(path, required)]
    if not rows:
        raise UcaiError(f"{path}: file is empty")
    return rows


def require_writable(path: str | Path, field: str, folder: bool = False) -> None:
    """Fail with one `UcaiError` naming ``field`` and ``path`` unless the stage will be
    able to write there: ``path`` is not the wrong kind (a folder where a file goes, or
    the reverse), and the nearest part of it that exists is a folder that accepts new
    entries. Checked by creating and removing an unnamed file there, because permission
    bits do not tell (root may write anywhere except where the filesystem refuses, as
    in ``/proc``). Nothing is left behind.

    Args:
        path: the output as configured.
        field: the setting it came from, as the user writes it
            (``--model.init_args.output``).
        folder: the output is a folder (else a file).
    """
    target = Path(path).expanduser()

    def fail(reason: str) -> UcaiError:
        return UcaiError(f"{field}: cannot write {path}: {reason}")

    if target.exists() and target.is_dir() != folder:
        raise fail("it is a folder, expected a file" if target.is_dir() else "it is a file, expected a folder")
    existing = target if folder and target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"{existing} is a file, so nothing can be created under it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        # ENOENT here means a filesystem that creates nothing on request (/proc).
        detail = "" if exc.errno == errno.ENOENT else f" ({exc.strerror or exc})"
        raise fail(f"{existing} does not accept new files{detail}") from None


@contextmanager
def atomic_output(path: str | Path, mode: str = "w"):
    """Open a temporary file beside ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8", newline="" if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        as_ordinary_file(tmp)  # mkstemp's file is private; the output is an ordinary one
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def dumps_row(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows atomically; returns the number written."""
    count = 0
    with atomic_output(path) as handle:
        for row in rows:
            handle.write(dumps_row(row) + "\n")
            count += 1
    return count


def _csv_cell(value: Any) -> Any:
    # Lists and dicts (critiques, revisions) go in as JSON so the CSV stays one row each.
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return value


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> int:
    """Write rows as CSV atomically; nested values are JSON-encoded."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_output(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_cell(row.get(key)) for key in columns})
    return len(rows)


def read_csv(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` from a CSV with a header; missing columns are an error."""
    path = Path(path)
    reader = csv.DictReader(line + "\n" for _, line in iter_lines(path))
    try:
        header = reader.fieldnames or []
        missing = [key for key in required if key not in header]
        if missing:
            raise located(path, 1, f"missing column(s) {', '.join(map(repr, missing))}; header is {header}")
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        raise located(path, reader.line_num, f"malformed CSV ({exc})") from None


class ResumableJsonl:
    """An append-only JSONL file that survives ``kill -9``.

    Each append writes whole lines and fsyncs. On open, a trailing partial line (the
    process died mid-write) is cut off, so the file always holds complete rows; the
    ids already present are available as `done_ids` for a rerun to skip.
    """

    def __init__(self, path: str | Path, id_field: str = "id"):
        self.path = Path(path)
        self.id_field = id_field
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [row for _, row in read_jsonl(self.path)]

    def done_ids(self) -> set:
        return {row.get(self.id_field) for row in self.rows()}

    def append(self, rows: Iterable[dict]) -> None:
        text = "".join(dumps_row(row) + "\n" for row in rows)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
