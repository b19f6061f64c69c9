"""Paired differences between models over prompts, tested as one corrected family: the
evaluation's primary family, its RL-algorithm family and its depth family all use it.

`paired_differences` takes score rows (``model``, ``id`` and one column per scorer)
and ``(a, b, column)`` tests, runs a paired sign-flip test of mean(A − B) over the
prompts both answered for each (`ucai.stats.sign_flip_test`), corrects the family
(Holm or Benjamini–Hochberg, `ucai.stats.adjust_p`) and inverts each test at the
corrected level for its interval.
"""

from __future__ import annotations

import math
import numbers

from ucai.stats import CORRECTIONS, adjust_p, corrected_confidence, sign_flip_test


def paired_differences(
    scores: list[dict],
    family_tests: list[tuple[str, str, str]],
    description: str,
    correction: str = "holm",
    alpha: float = 0.05,
    n_perm: int = 10_000,
) -> tuple[list[dict], dict]:
    """Paired sign-flip tests of mean(A - B) over prompts for each ``(a, b, column)``
    of ``family_tests``, corrected together; returns the entries and a description
    of the family.

    ``significant`` is ``p_adjusted <= alpha``; ``low``/``high`` is the interval at the
    corrected per-comparison level (None where unbounded: too few prompts to reject
    any shift at that level).
    """
    by_key = {(r["model"], r["id"]): r for r in scores}
    tests = []
    for a, b, column in family_tests:
        # A prompt counts where both scores are numbers: a NaN (an empty answer's judge
        # score) would make every sign pattern compare false, p 0, and "significant".
        ids = [
            r["id"] for r in scores
            if r["model"] == a and (b, r["id"]) in by_key
            and _finite(r.get(column)) and _finite(by_key[(b, r["id"])].get(column))
        ]
        if not ids:
            continue
        diffs = [by_key[(a, i)][column] - by_key[(b, i)][column] for i in ids]
        tests.append((a, b, column, diffs))
    first = [sign_flip_test(d, confidence=1.0 - alpha, n_perm=n_perm) for *_, d in tests]
    adjusted = adjust_p([t.p for t in first], correction)
    m = len(tests)
    rejected = sum(q <= alpha for q in adjusted)
    level = corrected_confidence(1.0 - alpha, m, correction, rejected)
    out = []
    for (a, b, column, diffs), test, q in zip(tests, first, adjusted, strict=True):
        ci = sign_flip_test(diffs, confidence=level, n_perm=n_perm)
        out.append(
            {
                "a": a,
                "b": b,
                "column": column,
                "n": test.n,
                "diff": test.mean,
                "p": test.p,
                "p_adjusted": q,
                "method": correction,
                "confidence": level,
                "low": ci.low if math.isfinite(ci.low) else None,
                "high": ci.high if math.isfinite(ci.high) else None,
                "significant": bool(q <= alpha),
                "min_p": 2.0 / 2**test.n if test.exact else 1.0 / (n_perm + 1),
            }
        )
    family = {
        "method": correction,
        "method_name": CORRECTIONS[correction],
        "alpha": alpha,
        "family_size": m,
        "confidence": level,
        "test": "paired sign-flip test over prompts (exact up to 16 prompts, else Monte Carlo)",
        "interval": (
            "sign-flip test inverted at the corrected level: "
            + ("simultaneous (Bonferroni) coverage" if correction == "holm" else "Benjamini–Yekutieli false-coverage-rate")
            + f" {1.0 - alpha:.0%} over the family"
        ),
        "family": description,
    }
    return out, family


def _finite(value) -> bool:
    """A finite number, NumPy's scalars included (``np.float32`` is no ``float``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
