"""Judge quality check: score a feedback model on multiple-choice questions.

    ucai test --config configs/judge_check.yaml --model.init_args.model MODEL

Items use the format of Anthropic's published Constitutional AI evaluations, one JSON
object per line::

    {"prompt": "... (A) text\\n (B) text\\n\\nThe answer is:", "corrects": [" (B)"], "incorrects": [" (A)"]}

The prompt lists its options as lines `` (A) text``, `` (B) text`` ... (any number,
two or more) and ends just before the answer label; every option is in ``corrects`` or
``incorrects``. Scoring reuses the judge labeller's code (`ucai.scoring`): the next-token
probabilities of the option labels normalised over the options, asked once in each
cyclic order of the options (the option texts are rotated through the option lines, so
every option sits in every position once) and averaged in log space, which cancels a
pure position bias. Labels such as `` (A)`` and `` (B)`` share their first tokens
(`` (``), so that shared prefix is moved into the prompt and the token that differs
(``A``, ``B``) is scored; `answer_split` checks the split against the tokenizer.

With ``chat``, the question (the prompt up to its last blank line) becomes the user
turn of the model's chat template and the rest (``The answer is:``) opens the assistant
turn, as the judge labeller asks its questions; without, the prompt is read as plain
text, as the format was published.

An item counts as right when its most probable option (after order averaging) is a
correct one; options tied for the top share the credit, so a judge that only has a
position bias scores chance exactly. `JudgeCheckResult` holds the accuracy with a
Wilson 95% interval, the chance level (mean over items of corrects / options) and the
first-position bias before debiasing (mean probability of the first slot minus 1/K,
as `ucai.scoring.position_bias`). The judge passes when the interval's lower bound is
above chance.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ucai.chat import render_chat
from ucai.data.io import read_jsonl
from ucai.errors import UcaiError
from ucai.resources import resolve_shipped
from ucai.scoring import (
    average_over_orders,
    cyclic_orders,
    option_probabilities,
    option_token_ids,
    position_bias,
)

SHIPPED_ITEMS = "data/judge_check.jsonl"
Z_95 = 1.959963984540054  # standard normal quantile at 0.975

# An option line: optional indentation, "(X)", a space or tab, the option text.
_OPTION_LINE = re.compile(r"^[ \t]*\(([A-Z])\)[ \t]", re.MULTILINE)
_LABEL = re.compile(r"^\s*\(([A-Z])\)\s*$")
# Credit ties within this of the top probability (the log-average of a pure position
# bias gives equal options up to rounding).
_TIE = 1e-6


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
    """

    prompt: str
    labels: tuple[str, ...]
    correct: tuple[bool, ...]
    spans: tuple[tuple[int, int], ...]
    source: str = ""

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
    return MultipleChoiceItem(
        prompt=prompt,
        labels=tuple(label_of[x] for x in letters),
        correct=tuple(x in correct_letters for x in letters),
        spans=tuple((s, e) for _, s, e in spans),
        source=source,
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


def as_chat(item: MultipleChoiceItem, tokenizer, system_prompt: str | None) -> MultipleChoiceItem:
    """The item with its question as a chat user turn and its answer lead after the
    assistant header: ``<user>question</user><assistant>The answer is:``.

    The question is the prompt up to the first blank line after the last option (the
    whole prompt when there is none); the option spans move with it.
    """
    cut = item.prompt.find("\n\n", item.spans[-1][1])
    body, lead = (item.prompt, "") if cut < 0 else (item.prompt[:cut], item.prompt[cut + 2 :])
    rendered = render_chat(tokenizer, [{"role": "user", "content": body}], system_prompt)
    offset = rendered.find(body)
    if offset < 0:
        raise UcaiError(f"{item.source}: the chat template rewrites the question text; score it without chat")
    spans = tuple((start + offset, end + offset) for start, end in item.spans)
    return MultipleChoiceItem(rendered + lead, item.labels, item.correct, spans, item.source)


# --------------------------------------------------------------------------- labels


def _common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def answer_split(tokenizer, prompt: str, labels: tuple[str, ...]) -> tuple[str, list[str]]:
    """Split the labels into a shared prefix (appended to the prompt) and what follows.

    ``(" (", ["A)", "B)"])`` for ``" (A)"``, ``" (B)"``: the model reads the prompt and
    `` (`` and is scored on the first token of each remainder. The longest shared prefix
    is used for which, with this tokenizer and this prompt, (1) the tokens of
    ``prompt + prefix`` are a prefix of those of ``prompt + label`` for every label,
    (2) the token that follows is the first token of the remainder tokenised alone
    (what `option_probabilities` scores) and (3) those tokens differ between labels.
    A tokenizer that merges the prefix with the letter falls back to a shorter prefix.
    """
    shared = _common_prefix(list(labels))
    for cut in range(len(shared), -1, -1):
        prefix = shared[:cut]
        rests = [label[cut:] for label in labels]
        if any(not rest for rest in rests):
            continue
        try:
            standalone = option_token_ids(tokenizer, rests)
        except ValueError:  # remainders whose first tokens coincide
            continue
        head = tokenizer(prompt + prefix, add_special_tokens=False)["input_ids"]
        ok = True
        for rest, token in zip(rests, standalone):
            full = tokenizer(prompt + prefix + rest, add_special_tokens=False)["input_ids"]
            if full[: len(head)] != head or len(full) <= len(head) or full[len(head)] != token:
                ok = False
                break
        if ok:
            return prefix, rests
    raise UcaiError(f"the tokenizer cannot score the labels {list(labels)} by distinct next tokens")


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ItemScore:
    """One item's outcome.

    Attributes:
        credit: 1 if the top option is correct, 0 if not; a share when options tie.
        chance: corrects / options.
        first_position: mean over orders of the probability of the first slot, minus 1/K.
        probabilities: K order-averaged option probabilities (prompt order).
    """

    credit: float
    chance: float
    first_position: float
    probabilities: tuple[float, ...]


def item_credit(probabilities: torch.Tensor, correct: tuple[bool, ...]) -> float:
    """Share of the top-probability options (ties within 1e-6) that are correct.

    Args:
        probabilities: (K,) order-averaged option probabilities.
    """
    top = probabilities.max()
    tied = [i for i, p in enumerate(probabilities.tolist()) if p >= float(top) - _TIE]
    return sum(correct[i] for i in tied) / len(tied)


@torch.no_grad()
def score_items(
    model,
    tokenizer,
    items: list[MultipleChoiceItem],
    batch_size: int = 8,
    max_length: int | None = None,
    chat: bool = False,
    system_prompt: str | None = None,
) -> list[ItemScore]:
    """Ask every item in every cyclic option order and score it (see the module docs).

    Items that share their scored label remainders are batched together: one
    `option_probabilities` call scores one label list. ``chat``: render each item with
    `as_chat` and ``system_prompt`` first.
    """
    if chat:
        items = [as_chat(item, tokenizer, system_prompt) for item in items]
    texts_of: dict[tuple[str, ...], list[tuple[int, int, str]]] = defaultdict(list)  # rests -> (item, order, text)
    for i, item in enumerate(items):
        try:
            prefix, rests = answer_split(tokenizer, item.prompt, item.labels)
        except UcaiError as error:
            raise UcaiError(f"{item.source}: {error}") from None
        for s, order in enumerate(cyclic_orders(item.k)):
            texts_of[tuple(rests)].append((i, s, item.reordered(order) + prefix))
    probs: dict[tuple[int, int], torch.Tensor] = {}
    for rests, rows in texts_of.items():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            out = option_probabilities(model, tokenizer, [t for _, _, t in chunk], list(rests), max_length)  # (b, K)
            for (i, s, _), row in zip(chunk, out):
                probs[i, s] = row
    scores = []
    for i, item in enumerate(items):
        orders = cyclic_orders(item.k)
        per_order = [probs[i, s].unsqueeze(0) for s in range(item.k)]  # K tensors (1, K), column = position
        averaged = average_over_orders(per_order, orders)[0]  # (K,), column = option
        scores.append(
            ItemScore(
                credit=item_credit(averaged, item.correct),
                chance=item.chance,
                first_position=position_bias(per_order),
                probabilities=tuple(round(float(p), 6) for p in averaged),
            )
        )
    return scores


# --------------------------------------------------------------------------- result


def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (valid near 0 and 1, unlike p ± z·se).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; a fractional success
    count (tie credit) is used as is.
    """
    if n <= 0:
        return math.nan, math.nan
    denominator = 1.0 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class JudgeCheckResult:
    """Accuracy of a judge on multiple-choice items, with its 95% interval and chance."""

    n: int
    accuracy: float
    ci: tuple[float, float]
    chance: float
    first_position_bias: float

    @property
    def passed(self) -> bool:
        """Better than chance: the interval's lower bound is above the chance level."""
        return self.ci[0] > self.chance

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": round(self.accuracy, 6),
            "ci": [round(self.ci[0], 6), round(self.ci[1], 6)],
            "chance": round(self.chance, 6),
            "first_position_bias": round(self.first_position_bias, 6),
            "passed": self.passed,
        }

    def line(self) -> str:
        verdict = "above chance" if self.passed else "NOT above chance"
        return (
            f"judge check: n={self.n} accuracy={self.accuracy:.3f} "
            f"95% CI [{self.ci[0]:.3f}, {self.ci[1]:.3f}] chance={self.chance:.3f} "
            f"first_position_bias={self.first_position_bias:+.3f} ({verdict})"
        )


def summarise(scores: list[ItemScore]) -> JudgeCheckResult:
    """Aggregate item scores: mean credit with a Wilson interval, mean chance and bias."""
    if not scores:
        raise UcaiError("judge check: no items to score")
    n = len(scores)
    accuracy = sum(s.credit for s in scores) / n
    return JudgeCheckResult(
        n=n,
        accuracy=accuracy,
        ci=wilson_interval(accuracy, n),
        chance=sum(s.chance for s in scores) / n,
        first_position_bias=sum(s.first_position for s in scores) / n,
    )


def check_judge(
    model,
    tokenizer,
    items: list[MultipleChoiceItem],
    batch_size: int = 8,
    max_length: int | None = None,
    chat: bool = False,
    system_prompt: str | None = None,
) -> JudgeCheckResult:
    """Score ``model`` on ``items``: accuracy, Wilson 95% CI, chance and position bias
    (``chat``: asked as a chat turn with ``system_prompt``, see `as_chat`)."""
    return summarise(score_items(model, tokenizer, items, batch_size, max_length, chat, system_prompt))
