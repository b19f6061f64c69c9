"""Prompt readers: red-team transcripts, hh-rlhf preference files, JSONL/CSV, plain text.

`read_prompts(path)` picks the reader from the file name and content and returns a
list of `PromptRecord` — stripped, de-duplicated, empty prompts dropped, optional length
bounds, and a stable id (the file's own ``id`` if it has one, else a hash of the text,
so ids survive reordering and re-reading).

Formats:
* ``.json`` — a JSON array: hh-rlhf ``red-team-attempts`` objects (``transcript``,
  ``min_harmlessness_score_transcript``, ``rating``, ``task_description`` ...) or
  objects with a ``prompt`` field;
* ``.jsonl`` / ``.jsonl.gz`` — objects with ``prompt``, or hh-rlhf ``chosen``/``rejected``
  transcripts, or red-team ``transcript`` objects (first human turn is the prompt);
* ``.csv`` — a ``prompt`` column (and optional ``id``, ``principle``);
* ``.txt`` (or anything else) — one prompt per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ucai.data.io import iter_lines, read_csv, read_jsonl, read_text
from ucai.errors import UcaiError, located
from ucai.resources import resolve_shipped

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = "data/red_team_prompts.jsonl"
_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PromptRecord:
    id: str
    prompt: str
    principle: str | None = None
    source: str | None = None
    score: float | None = None

    def to_row(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def stable_id(text: str, prefix: str = "p") -> str:
    """A short id derived from the prompt text only."""
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def parse_transcript(transcript: str) -> list[dict[str, str]]:
    """Split an hh-rlhf transcript into chat messages (``user``/``assistant``)."""
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript
    pieces = _TURN.split(text)
    messages = []
    # pieces: [preamble, role, content, role, content, ...]
    for role, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def first_human_turn(transcript: str) -> str:
    for message in parse_transcript(transcript):
        if message["role"] == "user":
            return message["content"]
    return ""


def _require_string(path, line, row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise located(path, line, f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _records_from_object(path, line, row: dict, source: str) -> PromptRecord:
    if "prompt" in row:
        prompt = _require_string(path, line, row, "prompt")
        origin = row.get("source") or source
    elif "transcript" in row:
        prompt = first_human_turn(_require_string(path, line, row, "transcript"))
        origin = "hh-rlhf/red-team-attempts"
    elif "chosen" in row:
        prompt = first_human_turn(_require_string(path, line, row, "chosen"))
        origin = "hh-rlhf"
    else:
        raise located(path, line, "missing field 'prompt' (or hh-rlhf 'transcript'/'chosen')")
    principle = row.get("principle")
    if principle is not None and not isinstance(principle, str):
        raise located(path, line, "field 'principle' must be a string")
    score = row.get("score", row.get("min_harmlessness_score_transcript"))
    record_id = row.get("id")
    if record_id is not None and not isinstance(record_id, (str, int)):
        raise located(path, line, "field 'id' must be a string or an integer")
    return PromptRecord(
        id=str(record_id) if record_id is not None else "",
        prompt=prompt,
        principle=principle,
        source=origin,
        score=float(score) if isinstance(score, (int, float)) else None,
    )


def _iter_raw(path: Path) -> Iterator[tuple[int | None, PromptRecord]]:
    name = path.name.lower()
    source = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        for line, row in read_jsonl(path):
            yield line, _records_from_object(path, line, row, source)
    elif name.endswith((".json", ".json.gz")):
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise located(path, exc.lineno, f"invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise located(path, None, "expected a JSON array of objects")
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise located(path, None, f"item {index} is not an object")
            yield None, _records_from_object(f"{path} item {index}", None, row, source)
    elif name.endswith((".csv", ".csv.gz")):
        for line, row in read_csv(path, required=("prompt",)):
            record = PromptRecord(
                id=row.get("id") or "",
                prompt=row["prompt"] or "",
                principle=row.get("principle") or None,
                source=row.get("source") or source,
            )
            yield line, record
    else:
        for line, text in iter_lines(path):
            yield line, PromptRecord(id="", prompt=text, source=source)


def read_prompts(
    path: str | Path = DEFAULT_PROMPTS,
    min_chars: int = 1,
    max_chars: int | None = None,
    empty: Literal["drop", "error"] = "drop",
    principles: list[str] | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Read prompts from any supported file, cleaned and with stable ids.

    Args:
        path: the file; a shipped name such as ``data/red_team_prompts.jsonl`` resolves
            to the file inside the installed package when it is not found locally.
        min_chars / max_chars: keep prompts whose stripped length is in this range.
        empty: ``drop`` silently skips empty prompts (transcripts with no human turn);
            ``error`` reports the first one with its file and line.
        principles: keep only prompts tagged with one of these principles.
        limit: keep at most this many (after filtering), in file order.
    """
    resolved = resolve_shipped(path, "data")
    if not resolved.exists():
        raise UcaiError(f"{path}: prompt file not found")
    records: list[PromptRecord] = []
    seen_text: set[str] = set()
    seen_ids: dict[str, int | None] = {}
    for line, record in _iter_raw(resolved):
        record.prompt = record.prompt.strip()
        if not record.prompt:
            if empty == "error":
                raise located(resolved, line, "empty prompt")
            continue
        length = len(record.prompt)
        if length < min_chars or (max_chars is not None and length > max_chars):
            continue
        key = " ".join(record.prompt.lower().split())
        if key in seen_text:
            continue
        seen_text.add(key)
        record.id = record.id or stable_id(record.prompt)
        if record.id in seen_ids:
            raise located(resolved, line, f"duplicate id {record.id!r} (first seen on line {seen_ids[record.id]})")
        seen_ids[record.id] = line
        if principles is not None and record.principle not in principles:
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise UcaiError(f"{resolved}: no prompts left after reading and filtering")
    return records
