"""Multiple-choice items for the judge quality check: reading, validating, and
`MultipleChoiceDataModule`, which serves them to the judge check stage.

Items use the format of Anthropic's published Constitutional AI evaluations, one JSON
object per line::

    {"prompt": "... (A) text\\n (B) text\\n\\nThe answer is:", "corrects": [" (B)"], "incorrects": [" (A)"]}

The prompt lists its options as lines `` (A) text``, `` (B) text`` ... (any number,
two or more) and ends just before the answer label; every option is in ``corrects`` or
``incorrects``. A bad row is one `UcaiError` naming ``file:line``. Batches are lists of
items, each tagged with its index in the file so that results gathered from several
devices can be put back in order and de-duplicated. `ucai.judge_accuracy` scores them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader

from ucai.data.io import read_jsonl
from ucai.data.prompt_datamodule import RowDataset, collate_rows
from ucai.errors import UcaiError
from ucai.resources import resolve_shipped
from ucai.value_ranges import PositiveInt

SHIPPED_ITEMS = "data/judge_check.jsonl"

# An option line: optional indentation, "(X)", a space or tab, the option text.
_OPTION_LINE = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]", re.MULTILINE)
_LABEL = re.compile(r"^\s*\(([A-Z])\)\s*$")


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question.

    Attributes:
        prompt: the question text, ending just before the answer label.
        labels: K answer labels as the continuation writes them (``" (A)"``), in the
            order of the prompt's option lines.
        correct: K flags, whether each option is a correct answer.
        spans: K ``(start, end)`` character spans of the option texts in ``prompt``.
        source: ``file:line`` the item came from (for messages).
        side: ``ethical`` or ``unethical`` where the row names the side whose principle
            makes its correct answers correct (the shipped items do), else None.
    """

    prompt: str
    labels: tuple[str, ...]
    correct: tuple[bool, ...]
    spans: tuple[tuple[int, int], ...]
    source: str = ""
    side: str | None = None  # whose principles make the correct answer correct, where the file says

    @property
    def k(self) -> int:
        return len(self.labels)

    @property
    def chance(self) -> float:
        """Expected accuracy of a judge that picks an option at random."""
        return sum(self.correct) / self.k

    def reordered(self, order: list[int]) -> str:
        """The prompt with option ``order[position]``'s text on the line of ``position``."""
        texts = [self.prompt[s:e] for s, e in self.spans]
        pieces, cursor = [], 0
        for position, (start, end) in enumerate(self.spans):
            pieces += [self.prompt[cursor:start], texts[order[position]]]
            cursor = end
        return "".join(pieces) + self.prompt[cursor:]


def _option_spans(prompt: str) -> list[tuple[str, int, int]]:
    """``(letter, start, end)`` of each option text: from after ``(X) `` up to the next
    option line, the last one up to the first blank line after it (or the end)."""
    matches = list(_OPTION_LINE.finditer(prompt))
    spans = []
    for n, match in enumerate(matches):
        start = match.end()
        if n + 1 < len(matches):
            end = matches[n + 1].start()
            end = end - 1 if prompt[end - 1 : end] == "\n" else end
        else:
            blank = prompt.find("\n\n", start)
            end = len(prompt) if blank < 0 else blank
        spans.append((match.group(1), start, end))
    return spans


def parse_item(row: dict, source: str) -> MultipleChoiceItem:
    """Validate one JSON row; errors are one line starting with ``source`` (``file:line``)."""

    def fail(message: str) -> UcaiError:
        return UcaiError(f"{source}: {message}")

    for key in ("prompt", "corrects", "incorrects"):
        if key not in row:
            raise fail(f"missing field {key!r} (expected prompt, corrects, incorrects)")
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise fail("'prompt' must be a non-empty string")
    for key in ("corrects", "incorrects"):
        if not isinstance(row[key], list) or not all(isinstance(x, str) for x in row[key]):
            raise fail(f"{key!r} must be a list of labels like \" (A)\"")
    spans = _option_spans(prompt)
    letters = [letter for letter, _, _ in spans]
    if len(spans) < 2:
        raise fail(f"the prompt lists {len(spans)} option line(s) like ' (A) text'; at least 2 are needed")
    if len(set(letters)) != len(letters):
        raise fail(f"the prompt lists an option letter twice ({', '.join(letters)})")
    label_of: dict[str, str] = {}
    correct_letters: set[str] = set()
    for key in ("corrects", "incorrects"):
        for label in row[key]:
            match = _LABEL.match(label)
            if match is None or match.group(1) not in letters:
                raise fail(f"{key} label {label!r} is not one of the prompt's options ({', '.join(f'({x})' for x in letters)})")
            letter = match.group(1)
            if letter in label_of:
                raise fail(f"option ({letter}) is listed twice in corrects/incorrects")
            label_of[letter] = label
            if key == "corrects":
                correct_letters.add(letter)
    if not correct_letters:
        raise fail("'corrects' is empty: an item needs a correct answer")
    unlisted = [x for x in letters if x not in label_of]
    if unlisted:
        raise fail(f"option(s) {', '.join(f'({x})' for x in unlisted)} of the prompt are in neither corrects nor incorrects")
    if len(correct_letters) == len(letters):
        raise fail("every option is correct, so the item cannot tell judges apart")
    side = row.get("side")
    if side not in (None, "ethical", "unethical"):
        raise fail(f"'side' must be 'ethical' or 'unethical', got {side!r}")
    return MultipleChoiceItem(
        prompt=prompt,
        labels=tuple(label_of[x] for x in letters),
        correct=tuple(x in correct_letters for x in letters),
        spans=tuple((s, e) for _, s, e in spans),
        source=source,
        side=side,
    )


def load_items(path: str | Path = SHIPPED_ITEMS) -> list[MultipleChoiceItem]:
    """Read and validate a multiple-choice JSONL file (a bare name finds the shipped one)."""
    resolved = resolve_shipped(path, "data")
    if not resolved.exists():
        raise UcaiError(f"{path}: multiple-choice file not found")
    items = [parse_item(row, f"{resolved}:{line}") for line, row in read_jsonl(resolved)]
    if not items:
        raise UcaiError(f"{resolved}: file is empty")
    return items


def items_of_side(items: list[MultipleChoiceItem], side: str | None) -> list[MultipleChoiceItem]:
    """The items that test ``side`` and those that name no side; every item for None.

    A judge is checked on the side it judges for: pooled over the shipped items' two
    sides, one that answers as the ethical side whatever it is asked scores 24/48 = 0.5,
    above their chance of 0.36."""
    return [item for item in items if side is None or item.side in (None, side)]


class MultipleChoiceDataModule(L.LightningDataModule):
    """Items from a JSONL file of ``prompt`` / ``corrects`` / ``incorrects`` rows.

    Args:
        path: the file; the default is the shipped ``data/judge_check.jsonl``.
        batch_size: items per batch (each item is asked in K option orders).
        limit: keep the first this many items (quick runs).
        side: only the items of this side (and those naming none), as the preference
            stage checks its judge; null: every item.
    """

    def __init__(
        self,
        path: str = SHIPPED_ITEMS,
        batch_size: PositiveInt = 8,
        limit: PositiveInt | None = None,
        side: Literal["ethical", "unethical"] | None = None,
    ):
        super().__init__()
        self.path = path
        self.batch_size = batch_size
        self.limit = limit
        self.side = side
        self.items: list[MultipleChoiceItem] | None = None

    def load(self) -> list[MultipleChoiceItem]:
        if self.items is None:
            items = items_of_side(load_items(self.path), self.side)
            self.items = items[: self.limit] if self.limit is not None else items
        return self.items

    def setup(self, stage: str) -> None:
        self.load()

    def test_dataloader(self) -> DataLoader:
        rows = [{"index": i, "item": item} for i, item in enumerate(self.load())]
        return DataLoader(RowDataset(rows), batch_size=self.batch_size, shuffle=False, collate_fn=collate_rows)

    predict_dataloader = test_dataloader

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # items are text; the stage tokenises them for its model
