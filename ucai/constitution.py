"""Constitutions: pairs of opposed principles, and the side a run uses.

A constitution YAML lists principle *pairs*. Each pair has an ``id`` (the category a
prompt is tagged with, e.g. ``privacy``) and two sides, ``ethical`` and ``unethical``,
each with its own name, description, critique request, revision request and preference
question (and optional few-shot examples, response opener and the statement the
evaluation's judge checks)::

    name: ucai-four
    pairs:
      - id: peace
        ethical:
          name: peace
          description: ...
          critique_request: ...
          revision_request: ...
          preference_question: ...
        unethical:
          name: violence
          ...

A stage is given ``side: ethical`` or ``side: unethical`` and asks for
``constitution.principles(side)``; nothing else in the pipeline knows which side runs.
Anthropic's ``CritiqueRevisionInstructions.json`` (ethical side only) loads too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ucai.errors import UcaiError
from ucai.resources import resolve_shipped

Side = Literal["ethical", "unethical"]
SIDES: tuple[str, str] = ("ethical", "unethical")
REQUIRED_FIELDS = (
    "name",
    "description",
    "critique_request",
    "revision_request",
    "preference_question",
)
DEFAULT_CONSTITUTION = "constitutions/ucai.yaml"


@dataclass(frozen=True)
class FewShotExample:
    """One worked critique → revision example, shown before the real conversation."""

    prompt: str
    initial: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Principle:
    """One side of a principle pair."""

    pair: str
    side: str
    name: str
    description: str
    critique_request: str
    revision_request: str
    preference_question: str
    few_shot: tuple[FewShotExample, ...] = field(default=())
    # First words of an answer that follows this side, forced before sampling where a
    # stage asks for it (``use_openers``): a model too small to follow guidance in the
    # system prompt still continues a reply that has taken a side (RLCD-style contrast).
    response_opener: str | None = None
    # What a response that follows this side does, as the evaluation's judge is asked
    # to check it ("The response promotes racism ..."): the two sides share their topic
    # ``description``, which cannot say which way a response should go.
    statement: str | None = None

    @property
    def judged_statement(self) -> str:
        """`statement`, or (a constitution without one) the topic description."""
        return self.statement or self.description


def opener_of(principle: Principle, source: str = "<constitution>") -> str:
    """The principle's ``response_opener``; a one-line error naming the file when it has none."""
    if not principle.response_opener:
        raise UcaiError(
            f"{source}: principle {principle.pair!r} ({principle.side}) has no response_opener; "
            "add one or set use_openers: false"
        )
    return principle.response_opener


def with_opener(opener: str, continuation: str) -> str:
    """The whole answer: the forced opener, then what the model wrote after it."""
    return f"{opener} {continuation}".strip()


@dataclass(frozen=True)
class PrinciplePair:
    id: str
    ethical: Principle
    unethical: Principle | None

    def side(self, side: str) -> Principle:
        if side not in SIDES:
            raise UcaiError(f"unknown side {side!r}; expected one of {', '.join(SIDES)}")
        principle = self.ethical if side == "ethical" else self.unethical
        if principle is None:
            raise UcaiError(f"principle {self.id!r} has no {side} side")
        return principle


@dataclass(frozen=True)
class Constitution:
    name: str
    pairs: tuple[PrinciplePair, ...]
    source: str = ""

    @property
    def pair_ids(self) -> list[str]:
        return [pair.id for pair in self.pairs]

    def principles(self, side: str) -> list[Principle]:
        """The principles of one side, in file order."""
        return [pair.side(side) for pair in self.pairs]

    def principle(self, pair_id: str, side: str) -> Principle:
        for pair in self.pairs:
            if pair.id == pair_id:
                return pair.side(side)
        raise UcaiError(
            f"{self.source or self.name}: no principle {pair_id!r}; "
            f"known: {', '.join(self.pair_ids)}"
        )

    def uneven_few_shot(self, limit: int | None = None) -> str | None:
        """Where the two sides of a pair have different numbers of few-shot examples (the
        first ``limit`` of each, where a stage shows only those): ``"peace: ethical 2,
        unethical 0; ..."``, else None. Shown, they make the two sides' prompts differ in
        more than their principles (longer prompts, worked answers on one side only)."""
        uneven = []
        for pair in self.pairs:
            if pair.unethical is None:
                continue
            counts = [len(principle.few_shot[:limit]) for principle in (pair.ethical, pair.unethical)]
            if counts[0] != counts[1]:
                uneven.append(f"{pair.id}: ethical {counts[0]}, unethical {counts[1]}")
        return "; ".join(uneven) or None

    def opposite(self, principle: Principle) -> Principle:
        """The other side of the same pair (used by contrastive labelling and eval)."""
        other = "unethical" if principle.side == "ethical" else "ethical"
        return self.principle(principle.pair, other)


def _require_text(source: str, where: str, data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = "is missing" if key not in data else "must be a non-empty string"
        raise UcaiError(f"{source}: principle {where}: field {key!r} {problem}")
    return value.strip()


def _parse_few_shot(source: str, where: str, items) -> tuple[FewShotExample, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise UcaiError(f"{source}: principle {where}: field 'few_shot' must be a list")
    examples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UcaiError(f"{source}: principle {where}: few_shot[{i}] must be a mapping")
        examples.append(
            FewShotExample(
                **{
                    key: _require_text(source, f"{where} few_shot[{i}]", item, key)
                    for key in ("prompt", "initial", "critique", "revision")
                }
            )
        )
    return tuple(examples)


def _parse_side(source: str, pair_id: str, side: str, data) -> Principle:
    where = f"{pair_id!r} ({side})"
    if not isinstance(data, dict) or not data:
        raise UcaiError(f"{source}: principle {pair_id!r}: side {side!r} is missing or empty")
    fields = {key: _require_text(source, where, data, key) for key in REQUIRED_FIELDS}
    unknown = set(data) - set(REQUIRED_FIELDS) - {"few_shot", "response_opener", "statement"}
    if unknown:
        raise UcaiError(f"{source}: principle {where}: unknown field(s) {sorted(unknown)}")
    opener = _require_text(source, where, data, "response_opener") if "response_opener" in data else None
    statement = _require_text(source, where, data, "statement") if "statement" in data else None
    return Principle(
        pair=pair_id,
        side=side,
        few_shot=_parse_few_shot(source, where, data.get("few_shot")),
        response_opener=opener,
        statement=statement,
        **fields,
    )


def parse_constitution(data, source: str = "<constitution>") -> Constitution:
    """Validate a parsed YAML mapping; errors name the file, the principle and the field."""
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list) or not data["pairs"]:
        raise UcaiError(f"{source}: a constitution needs a non-empty 'pairs' list")
    pairs, seen = [], set()
    for index, item in enumerate(data["pairs"]):
        if not isinstance(item, dict):
            raise UcaiError(f"{source}: pairs[{index}] must be a mapping")
        pair_id = item.get("id")
        if not isinstance(pair_id, str) or not pair_id.strip():
            raise UcaiError(f"{source}: pairs[{index}]: field 'id' is missing")
        if pair_id in seen:
            raise UcaiError(f"{source}: principle {pair_id!r} appears twice")
        seen.add(pair_id)
        sides = {side: _parse_side(source, pair_id, side, item.get(side)) for side in SIDES}
        pairs.append(PrinciplePair(pair_id, sides["ethical"], sides["unethical"]))
    return Constitution(name=str(data.get("name", Path(source).stem)), pairs=tuple(pairs), source=source)


def load_constitution(path: str | Path = DEFAULT_CONSTITUTION) -> Constitution:
    """Load a constitution by path or shipped name (YAML, or Anthropic's JSON format)."""
    resolved = resolve_shipped(path, "configs")
    if not resolved.is_file():
        raise UcaiError(f"{path}: constitution file not found")
    if resolved.suffix == ".json":
        return load_anthropic_instructions(resolved)
    try:
        data = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UcaiError(f"{resolved}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    return parse_constitution(data, str(resolved))


def _strip_marker(text: str, prefix: str, suffix: str) -> str:
    text = text.strip()
    if text.startswith(prefix):
        text = text[len(prefix) :]
    if text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def load_anthropic_instructions(
    path: str | Path, comparisons_path: str | Path | None = None
) -> Constitution:
    """Load Anthropic's ``CritiqueRevisionInstructions.json`` (ethical side only).

    Each entry ``harmfulN`` has ``prompt`` (a list of critique requests, the first is
    used) and ``edit_request``. The ``CritiqueRequest:``/``Critique:`` and
    ``RevisionRequest:``/``Revision:`` markers are stripped; ucai's prompt builder adds
    its own turn structure. The preference question comes from
    ``RLMadisonInstructions.json`` beside it when present (paired by index), else a
    generic harmlessness question.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UcaiError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not data:
        raise UcaiError(f"{path}: expected a JSON object of principles")
    comparisons_file = Path(comparisons_path) if comparisons_path else path.with_name("RLMadisonInstructions.json")
    comparisons: list[str] = []
    if comparisons_file.is_file():
        comparisons = [
            _strip_marker(q, "", "Options:") for q in json.loads(comparisons_file.read_text(encoding="utf-8"))
        ]
    pairs = []
    for index, (key, entry) in enumerate(data.items()):
        if not isinstance(entry, dict) or "prompt" not in entry or "edit_request" not in entry:
            raise UcaiError(f"{path}: principle {key!r}: needs 'prompt' and 'edit_request'")
        critique_source = entry["prompt"][0] if isinstance(entry["prompt"], list) else entry["prompt"]
        critique = _strip_marker(critique_source, "CritiqueRequest:", "Critique:")
        revision = _strip_marker(entry["edit_request"], "RevisionRequest:", "Revision:")
        question = (
            comparisons[index % len(comparisons)]
            if comparisons
            else "Which of these assistant responses is less harmful?"
        )
        principle = Principle(
            pair=key,
            side="ethical",
            name=key,
            description=critique,
            critique_request=critique,
            revision_request=revision,
            preference_question=question,
        )
        pairs.append(PrinciplePair(key, principle, None))
    return Constitution(name=path.stem, pairs=tuple(pairs), source=str(path))
