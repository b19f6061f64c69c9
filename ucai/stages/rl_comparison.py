"""Comparing RL algorithms in the evaluation: how far each model moved from its reference
(exact KL over the vocabulary on its own held-out answers), what it gained on its own
side's reward model, and on which prompts.

The evaluation names each RL model after the algorithm that trained it
(``algorithms``: ``{"rl_ethical": "ppo", "dpo_ethical": "dpo", ...}``). Here:

* `exact_kl_per_token` / `answer_kl`: KL(model ‖ reference) at each answer position,
  the answer given (re-tokenised from its text, as every scorer reads it). The
  reference of an RL model is its side's SL model, of an SL model the base model.
* `algorithm_family`: the paired tests of the algorithm comparison, corrected as a
  family of their own (the primary family of the evaluation stays as it was).
* `frontier_points`: per side, (KL to the SL model, own reward-model score) of the SL
  model and of each algorithm's model: the reward–KL frontier of the report.
* `gain_on_prompts`: RL − SL on the side's own reward model over a set of prompts, for
  the train-prompt vs held-out comparison that shows over-fitting.
"""

from __future__ import annotations

import torch

from ucai.constitution import SIDES
from ucai.models import logits_are_head_of_hidden, output_head
from ucai.stats import bootstrap_ci


def side_of_model(name: str) -> str | None:
    """``ethical`` / ``unethical`` from a model name ending in ``_<side>``; else None."""
    return next((side for side in sorted(SIDES, key=len, reverse=True) if name.endswith(f"_{side}")), None)


def reference_of(name: str, algorithms: dict[str, str], models: dict[str, str]) -> str | None:
    """The model ``name`` moved away from: the side's SL model for an RL model, the base
    model for an SL model; None when that model is not evaluated."""
    side = side_of_model(name)
    if side is None:
        return None
    reference = f"sl_{side}" if name in algorithms else "base" if name == f"sl_{side}" else None
    return reference if reference in models else None


def exact_kl_per_token(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """(B, T) KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) at each position, in float32.

    Args:
        logits: (B, T, V) the model's logits, p = softmax(logits).
        reference_logits: (B, T, V) the reference's logits, q = softmax(reference_logits).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(reference_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _answer_rows(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer and the prompt's length (the answer's first index)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def logits_at(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the N positions where ``used`` is True, row by row.

    The decoder runs on the whole rows, but the output head only on the used
    positions: on a 49k vocabulary the head and the float32 softmaxes over it cost more
    than the decoder when, as for answers after a chat prompt, most positions are
    prompt. Other models (`ucai.models.logits_are_head_of_hidden`: logits scaled after
    the head, no separate decoder) run their own forward.

    Args:
        input_ids, attention_mask: (B, L) right-padded rows; used: (B, L) bool.
    """
    if not logits_are_head_of_hidden(causal_lm):
        return causal_lm(input_ids=input_ids, attention_mask=attention_mask).logits[used]
    decoder = causal_lm.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return output_head(causal_lm)(hidden[used])


@torch.no_grad()
def answer_kl(
    model, reference, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 8
) -> list[list[float]]:
    """KL(model ‖ reference) at every answer position of each (prompt, answer).

    Args:
        model, reference: causal LMs sharing ``tokenizer``, on one device.
        prompts: rendered prompts (chat template applied, generation prompt added).
        answers: the answers' text, one per prompt.
        batch_size: rows per forward.

    Returns:
        one list per answer: KL at answer token 1, 2, ... (empty for an empty answer).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [_answer_rows(tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    # Batches of like length (a batch pads to its longest row; each row's KL does not
    # depend on its batch beyond rounding); the answers' order is restored at the end.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    by_index: dict[int, list[float]] = {}
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        rows = [encoded[i] for i in picked]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        used = torch.zeros((len(rows), width), dtype=torch.bool)  # positions that predict an answer token
        for i, (ids, prompt_length) in enumerate(rows):  # right padding: positions count from 0 in every row
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            if prompt_length >= 1:  # the first answer token is predicted by the prompt's last
                used[i, prompt_length - 1 : len(ids) - 1] = True
        input_ids, mask, used = input_ids.to(device), mask.to(device), used.to(device)
        kl = exact_kl_per_token(
            logits_at(model, input_ids, mask, used), logits_at(reference, input_ids, mask, used)
        ).tolist()  # (N,) in row order, position j predicting token j + 1
        for index, (ids, prompt_length) in zip(picked, rows, strict=True):
            count = len(ids) - prompt_length if prompt_length >= 1 else 0
            by_index[index] = kl[:count]
            kl = kl[count:]
    return [by_index[i] for i in range(len(encoded))]


def kl_summary(per_answer: list[list[float]], reference: str, n_boot: int) -> dict:
    """A model's KL to its reference: the mean over answers of the summed KL (nats per
    answer) with a bootstrap interval, and the mean at each position over the answers
    still running there."""
    totals = [sum(values) for values in per_answer]
    mean, low, high = bootstrap_ci(totals, n_boot=n_boot)
    longest = max((len(v) for v in per_answer), default=0)
    per_position = []
    for t in range(longest):
        running = [values[t] for values in per_answer if len(values) > t]
        per_position.append(sum(running) / len(running))
    return {"reference": reference, "n": len(totals), "mean": mean, "low": low, "high": high, "per_position": per_position}


def algorithm_family(models: dict[str, str], algorithms: dict[str, str], columns: list[str]) -> list[tuple[str, str, str]]:
    """The ``(a, b, column)`` tests of the algorithm comparison: each RL model against
    its side's SL model on that side's reward model, then each algorithm's ethical
    model against its unethical one on both reward models, then each pair of
    algorithms on one side against each other on that side's reward model."""
    family = []
    for name in algorithms:
        side = side_of_model(name)
        if name in models and f"sl_{side}" in models and f"rm_{side}" in columns:
            family.append((name, f"sl_{side}", f"rm_{side}"))
    for name, algorithm in algorithms.items():
        if side_of_model(name) != "ethical":
            continue
        twin = name.removesuffix("_ethical") + "_unethical"
        if algorithms.get(twin) == algorithm and name in models and twin in models:
            family += [(name, twin, f"rm_{side}") for side in SIDES if f"rm_{side}" in columns]
    for side in SIDES:
        on_side = [name for name in algorithms if side_of_model(name) == side and name in models]
        if f"rm_{side}" in columns:
            family += [(a, b, f"rm_{side}") for i, a in enumerate(on_side) for b in on_side[i + 1 :]]
    return family


def frontier_points(summary_models: dict[str, dict], kls: dict[str, dict], algorithms: dict[str, str]) -> dict[str, list[dict]]:
    """Per side, the points of the reward–KL frontier: the SL model at KL 0 and each RL
    model at its held-out KL to the SL model, with the mean score on the side's own
    reward model (and their intervals)."""
    points: dict[str, list[dict]] = {}
    for side in SIDES:
        column = f"rm_{side}"
        sl = summary_models.get(f"sl_{side}", {}).get(column)
        if sl is None:
            continue
        rows = [{"model": f"sl_{side}", "algorithm": "sl", "kl": 0.0, "kl_low": 0.0, "kl_high": 0.0, **_score(sl)}]
        for name, algorithm in algorithms.items():
            if side_of_model(name) != side or name not in kls or column not in summary_models.get(name, {}):
                continue
            kl = kls[name]
            rows.append(
                {"model": name, "algorithm": algorithm, "kl": kl["mean"], "kl_low": kl["low"], "kl_high": kl["high"], **_score(summary_models[name][column])}
            )
        if len(rows) > 1:
            points[side] = rows
    return points


def _score(stats: dict) -> dict:
    return {"score": stats["mean"], "score_low": stats.get("low"), "score_high": stats.get("high")}


def gain_on_prompts(scores: list[dict], model: str, reference: str, column: str, n_boot: int) -> dict | None:
    """Mean of ``model − reference`` on ``column`` over the prompts both answered, with a
    prompt bootstrap interval (descriptive; not a corrected test)."""
    by_id = {r["id"]: r[column] for r in scores if r["model"] == reference and r.get(column) is not None}
    diffs = [r[column] - by_id[r["id"]] for r in scores if r["model"] == model and r["id"] in by_id and r.get(column) is not None]
    if not diffs:
        return None
    mean, low, high = bootstrap_ci(diffs, n_boot=n_boot)
    return {"n": len(diffs), "gain": mean, "low": low, "high": high}
