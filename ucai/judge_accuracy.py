"""A judge's accuracy on multiple-choice questions: the scoring behind the judge quality
check, which the judge check stage (`ucai.stages.judge_check`), the preferences stage's
judge labeller and the evaluation stage run.

Items are `ucai.data.multiple_choice.MultipleChoiceItem` (the format of Anthropic's
published Constitutional AI evaluations). Scoring reuses the judge labeller's code
(`ucai.scoring`): the next-token probabilities of the option labels normalised over
the options, asked once in each
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

from collections import defaultdict
from dataclasses import dataclass

import torch

from ucai.chat import render_chat
from ucai.data.multiple_choice import MultipleChoiceItem
from ucai.errors import UcaiError
from ucai.scoring import (
    average_over_orders,
    cyclic_orders,
    option_probabilities,
    option_token_ids,
    position_bias,
)
from ucai.stats import wilson_interval

# Credit ties within this of the top probability (the log-average of a pure position
# bias gives equal options up to rounding).
_TIE = 1e-6


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
