"""The evaluation's depth analysis: how much of the inversion is the opener, how much
the content (the measures themselves are in `ucai.depth`).

The evaluation stage (`ucai.stages.evaluation.EvaluationModule`, ``depth: true``) uses
these to build, for the SL and RL models of both sides:

* `opener_removed_rows`: every evaluated answer without its opener, as rows named
  ``<model>|no_opener`` that every content scorer scores like an answer;
* `swap_prefills`: per prompt tagged with a principle, the *other* side's opener,
  forced as the start of the model's answer; its continuations (the forced opener
  not included) become rows named ``<model>|swap``;
* `depth_family`: the paired tests on those rows, corrected as a family of their own
  (the evaluation's primary family is unchanged);
* `kl_pairs` / `kl_depth`: each SL and RL model against the base model and each RL
  model against its SL model, per answer position, with the share of the KL in the
  first answer tokens;
* `swap_fractions`: the prefill swap's shift as a fraction of the SL gap, per model
  and reward model, with Bonferroni-corrected intervals and a verdict.
"""

from __future__ import annotations

from ucai.constitution import SIDES, Constitution
from ucai.depth import FIRST_TOKENS, remove_opener, share_of_first_tokens, swap_fraction
from ucai.stages.rl_comparison import side_of_model

DEPTH = "depth_analysis"  # the optional analysis whose minutes the evaluation reports apart (`PartTimes`)
NO_OPENER = "no_opener"
SWAP = "swap"
CONTENT_COLUMNS = ("rm_ethical", "rm_unethical", "emb_margin")  # the content scorers tested without the opener


def variant_name(model: str, variant: str) -> str:
    """``<model>|<variant>``: the model name of a depth row."""
    return f"{model}|{variant}"


def other_side(side: str) -> str:
    return "unethical" if side == "ethical" else "ethical"


def side_openers(constitution: Constitution, side: str | None) -> list[str]:
    """Every ``response_opener`` of ``side``'s principles (of both sides for a model
    with no side, the base model); principles without one are skipped."""
    openers = []
    for pair_id in constitution.pair_ids:
        for each in SIDES if side is None else (side,):
            try:
                opener = constitution.principle(pair_id, each).response_opener
            except Exception:  # a pair without this side
                continue
            if opener and opener not in openers:
                openers.append(opener)
    return openers


def depth_models(models: dict[str, str], algorithms: dict[str, str]) -> list[str]:
    """The SL and RL models the depth analysis covers, in evaluation order."""
    return [n for n in models if n in algorithms or (n.startswith("sl_") and side_of_model(n) is not None)]


def opener_removed_rows(scores: list[dict], constitution: Constitution) -> list[dict]:
    """One ``<model>|no_opener`` row per answer row of ``scores``: the answer without
    its opener (`ucai.depth.remove_opener`, the model's side's openers; both sides' for
    the base model), with ``had_opener`` set when one of those openers was removed."""
    rows = []
    for row in scores:
        openers = side_openers(constitution, side_of_model(row["model"]))
        text = row["response"].strip()
        rows.append(
            {
                "model": variant_name(row["model"], NO_OPENER),
                "id": row["id"],
                "prompt": row["prompt"],
                "principle": row.get("principle"),
                "response": remove_opener(text, openers),
                "had_opener": any(text.startswith(o) for o in openers),
            }
        )
    return rows


def swap_prefills(prompts: list[dict], constitution: Constitution, side: str) -> dict[str, str]:
    """id -> the other side's opener for the prompt's own principle, for every prompt
    tagged with a principle whose other side has an opener. Untagged prompts get none:
    no stage forced an opener on them."""
    prefills = {}
    for row in prompts:
        pair_id = row.get("principle")
        if pair_id not in constitution.pair_ids:
            continue
        try:
            opener = constitution.principle(pair_id, other_side(side)).response_opener
        except Exception:
            continue
        if opener:
            prefills[row["id"]] = opener
    return prefills


def swap_rows(model: str, prompts: list[dict], continuations: dict[str, str]) -> list[dict]:
    """The ``<model>|swap`` rows: the continuation after the forced opener, alone."""
    return [
        {
            "model": variant_name(model, SWAP),
            "id": row["id"],
            "prompt": row["prompt"],
            "principle": row.get("principle"),
            "response": continuations[row["id"]].strip(),
        }
        for row in prompts
        if row["id"] in continuations
    ]


def depth_family(models: list[str], columns: list[str]) -> list[tuple[str, str, str]]:
    """The ``(a, b, column)`` tests of the depth family, on rows without the opener:

    * ethical vs unethical RL model, and ethical vs unethical SL model, on every
      content scorer (`CONTENT_COLUMNS` present in ``columns``);
    * each side's RL model vs its SL model on that side's reward model;
    * each SL and RL model's own answer vs its prefill-swap continuation on both
      reward models.
    """
    present = [c for c in CONTENT_COLUMNS if c in columns]
    family = []
    for kind in ("rl", "sl"):
        if {f"{kind}_ethical", f"{kind}_unethical"} <= set(models):
            a, b = variant_name(f"{kind}_ethical", NO_OPENER), variant_name(f"{kind}_unethical", NO_OPENER)
            family += [(a, b, c) for c in present]
    for side in SIDES:
        if {f"sl_{side}", f"rl_{side}"} <= set(models) and f"rm_{side}" in columns:
            family.append((variant_name(f"rl_{side}", NO_OPENER), variant_name(f"sl_{side}", NO_OPENER), f"rm_{side}"))
    for name in models:
        family += [
            (variant_name(name, NO_OPENER), variant_name(name, SWAP), f"rm_{side}")
            for side in SIDES
            if f"rm_{side}" in columns
        ]
    return family


def kl_pairs(models: dict[str, str], algorithms: dict[str, str]) -> list[tuple[str, str]]:
    """``(model, reference)`` pairs of the depth analysis: each SL and RL model against
    the base model, and each RL model against its side's SL model."""
    pairs = []
    for name in depth_models(models, algorithms):
        if "base" in models:
            pairs.append((name, "base"))
        sl = f"sl_{side_of_model(name)}"
        if name in algorithms and sl in models:
            pairs.append((name, sl))
    return pairs


def kl_depth(kls: dict[tuple[str, str], dict], k: int = FIRST_TOKENS) -> list[dict]:
    """The depth section's KL entries: each pair's summary (`kl_summary`) with
    ``share_first`` = the share of its per-position KL in the first ``k`` tokens."""
    return [
        {"model": model, **summary, "reference": reference, "share_first": share_of_first_tokens(summary["per_position"], k), "first_tokens": k}
        for (model, reference), summary in kls.items()
    ]


def swap_fractions(depth_rows: list[dict], models: list[str], alpha: float, n_boot: int) -> list[dict]:
    """`ucai.depth.swap_fraction` of each SL and RL model on each reward model, over the
    prompts with a swap continuation, against the SL models' opener-removed answers to
    the same prompts. The intervals are Bonferroni-corrected over all the fractions
    (level 1 − alpha / count), since the verdicts are read together."""
    by_key = {(r["model"], r["id"]): r for r in depth_rows}
    sl_e, sl_u = variant_name("sl_ethical", NO_OPENER), variant_name("sl_unethical", NO_OPENER)
    jobs = []
    for name in models:
        side = side_of_model(name)
        for column in (f"rm_{s}" for s in SIDES):
            ids = [
                i for (m, i) in by_key
                if m == variant_name(name, SWAP)
                and all(by_key.get((v, i), {}).get(column) is not None for v in (variant_name(name, NO_OPENER), variant_name(name, SWAP), sl_e, sl_u))
            ]
            if ids:
                jobs.append((name, side, column, ids))
    confidence = 1.0 - alpha / max(len(jobs), 1)
    out = []
    for name, side, column, ids in jobs:

        def values(variant: str, column: str = column, ids: list = ids) -> list[float]:
            return [by_key[(variant, i)][column] for i in ids]

        result = swap_fraction(
            side, values(variant_name(name, NO_OPENER)), values(variant_name(name, SWAP)), values(sl_e), values(sl_u),
            n_boot=n_boot, confidence=confidence,
        )
        out.append({"model": name, "side": side, "column": column, **result})
    return out
