"""Reward–KL frontier: how much reward model (RM) score a policy-gradient run gains at
a given KL to its reference. Pure Python, no torch, no models.

A run gives one point per iteration: ``kl`` (the mean per-sequence KL of that
iteration's rollouts to the reference policy, in nats) and ``score`` (their mean RM
score, in whatever unit the caller chooses; the PPO benchmark passes RM std units).
Comparing two trainers at a fixed KL coefficient mixes how fast each moves with how good
its direction is; reading both at the same KL separates the two: the one with the
higher score gain at 2 nats found better reward for the same drift.

How a run's gain at a KL level is read (`gain_at_kl`):

1. Smooth both curves with the same centred moving average (`moving_average`, window
   5 in the benchmark, truncated at the ends). One iteration's batch of 8 responses
   puts a noise of about a third of an RM std on its mean score, and the k1 KL
   estimate jumps from batch to batch; on the raw curve the first crossing of a KL
   level would often be decided by one noisy batch. Smoothing KL and score with the
   same window keeps each point a (KL, score) pair of the same rollouts (an average of
   neighbouring iterations), so a lag or a chord under a curved frontier hits both
   coordinates, and both trainers, alike. A monotone envelope (running maximum of the
   score) is biased upwards by that very noise; a parametric fit (score against
   sqrt(KL)) imposes a shape: neither is used.
2. Walk the smoothed points in iteration order, joined by straight lines
   (piecewise-linear interpolation), and take the score where the path *first*
   reaches the level (`score_at_first_crossing`). KL need not be monotone (k1 can dip,
   and a run can drift back); the first crossing is the score the run had when it had
   first spent that much KL, which is what the frontier asks, and it ignores later
   dips below the level. A path that never reaches the level gives None.
3. Subtract the run's starting score, the mean raw score of its first
   ``baseline_window`` iterations (the baseline of the benchmark's plain gain).

Over seeds (`median_over_runs`): the median of the runs that reached a level, given
only when more than half of them did (the median of the few fastest seeds would be a
biased pick); otherwise None, and `reached_count` says how many did. Over several
settings (learning rates) of one trainer (`best_setting`): the best setting's
median at each level, the rule of "the peer's best" applied to both sides.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Mapping, Sequence


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average, the window truncated at the ends.

    Args:
        values: (N,) one value per iteration.
        window: odd number of iterations averaged (1: unchanged).
    Returns:
        (N,) point ``i`` is the mean of ``values[i - h : i + h + 1]`` within range,
        ``h = window // 2``.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number, got {window}")
    half = window // 2
    return [statistics.fmean(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def score_at_first_crossing(kls: Sequence[float], scores: Sequence[float], level: float) -> float | None:
    """The score where the piecewise-linear path through ``(kls[i], scores[i])``, in
    order, first reaches KL ``level``; None if it never does.

    Args:
        kls: (N,) KL per point, nats; need not be monotone.
        scores: (N,) score per point, any unit.
        level: KL in nats.
    Returns:
        The score at the crossing (the first point's score if it already starts at or
        above ``level``), in the unit of ``scores``.
    """
    if len(kls) != len(scores):
        raise ValueError(f"{len(kls)} KL values but {len(scores)} scores")
    if not kls:
        return None
    if kls[0] >= level:
        return scores[0]
    for i in range(1, len(kls)):
        if kls[i] >= level:  # kls[i - 1] < level: the first segment that reaches it
            fraction = (level - kls[i - 1]) / (kls[i] - kls[i - 1])
            return scores[i - 1] + fraction * (scores[i] - scores[i - 1])
    return None


def gain_at_kl(
    kls: Sequence[float],
    scores: Sequence[float],
    levels: Sequence[float],
    window: int = 5,
    baseline_window: int = 5,
) -> dict[float, float | None]:
    """One run's score gain at each KL level (steps 1–3 of the module docstring).

    Args:
        kls: (N,) mean per-sequence KL to the reference per iteration, nats.
        scores: (N,) mean RM score per iteration (e.g. in RM std units).
        levels: KL levels, nats.
        window: smoothing window (odd), iterations.
        baseline_window: the starting score is the mean raw score of this many first
            iterations (at most N).
    Returns:
        level -> smoothed score at the first crossing minus the starting score, in the
        unit of ``scores``; None where the smoothed KL never reaches the level.
    """
    if not scores or baseline_window < 1:
        raise ValueError("need at least one iteration and a baseline window of at least 1")
    start = statistics.fmean(scores[:baseline_window])
    smooth_kl, smooth_score = moving_average(kls, window), moving_average(scores, window)
    gains: dict[float, float | None] = {}
    for level in levels:
        score = score_at_first_crossing(smooth_kl, smooth_score, level)
        gains[level] = None if score is None else score - start
    return gains


def reached_count(values: Sequence[float | None]) -> int:
    """How many runs reached a level (gave a value)."""
    return sum(value is not None for value in values)


def median_over_runs(values: Sequence[float | None]) -> float | None:
    """Median over the runs (seeds) that reached a level; None unless more than half did.

    Args:
        values: one gain per run, None for a run that never reached the level.
    """
    reached = [value for value in values if value is not None]
    if not values or 2 * len(reached) <= len(values):
        return None
    return statistics.median(reached)


def best_setting(values: Mapping[Hashable, float | None]) -> tuple[Hashable | None, float | None]:
    """(setting, value) with the highest value, settings without one skipped;
    (None, None) when none has a value.

    Args:
        values: setting (e.g. a learning rate) -> its median gain at one KL level.
    """
    present = {setting: value for setting, value in values.items() if value is not None}
    if not present:
        return None, None
    setting = max(present, key=present.__getitem__)
    return setting, present[setting]
