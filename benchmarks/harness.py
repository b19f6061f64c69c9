"""What every benchmark shares: alternating repeats, medians, the work check, peak RSS.

The rules (../shared/BENCHMARKS.md): each configuration runs in its own subprocess,
at least 3 times, in alternating order (A B C, C B A, A B C ...) so that drift in the
load of a shared machine hits every side alike; medians are compared; the work done
is recorded on every side, and a benchmark stops if it differs by more than 5%.
"""

from __future__ import annotations

import resource
import statistics
from collections.abc import Callable, Iterator, Sequence

WORK_TOLERANCE = 0.05


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def alternating(names: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, name) in the order A B C, C B A, A B C, ..."""
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else tuple(reversed(names)):
            yield repeat, name


def run_alternating(names: Sequence[str], repeats: int, run: Callable[[str, int], dict]) -> dict[str, list[dict]]:
    """Call ``run(name, repeat)`` for every configuration ``repeats`` times, alternating."""
    trials: dict[str, list[dict]] = {name: [] for name in names}
    for repeat, name in alternating(names, repeats):
        trials[name].append(run(name, repeat))
    return trials


def median_of(trials: list[dict], key: str) -> float:
    return statistics.median(t[key] for t in trials)


def check_same_work(work: dict[str, float], what: str, tolerance: float = WORK_TOLERANCE) -> None:
    """Stop with an error if any run's ``work`` differs from the first by more than ``tolerance``.

    Args:
        work: run label -> amount of work (tokens, pairs, response tokens ...).
        what: the unit, for the message.
    """
    (reference_name, reference), *_ = work.items()
    for name, amount in work.items():
        gap = abs(amount - reference) / max(abs(reference), 1e-9)
        if gap > tolerance:
            raise SystemExit(
                f"work differs: {name} did {amount:g} {what}, {reference_name} {reference:g} "
                f"({gap:.1%} > {tolerance:.0%}); the comparison would not be like for like"
            )


def check_same_work_of(runs: dict[str, list[dict]], key: str, what: str) -> None:
    """`check_same_work` over every run of every side: ``runs[side][i][key]``."""
    check_same_work({f"{side} run {i + 1}": r[key] for side, results in runs.items() for i, r in enumerate(results)}, what)


def set_threads(threads: int) -> None:
    """torch's thread count in a worker (0: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def token_rates(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per side: completion tokens/s of each run and their median, the median seconds
    and peak RSS (runs carry ``completion_tokens``, ``seconds``, ``peak_rss_mb``)."""
    summary = {}
    for side, results in runs.items():
        rates = [r["completion_tokens"] / r["seconds"] for r in results]
        summary[side] = {
            "rates": rates,
            "tokens_per_s": statistics.median(rates),
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
        }
    return summary


def time_calls(calls: Sequence[tuple[list[str], list[str]]], run_call: Callable[..., int]) -> dict:
    """A worker's timing of whole ``generate`` calls: one warm-up call (packing, cache
    allocation), then every call timed; ``run_call(rendered, keys)`` returns the
    completion tokens it produced. The work and time `calls_line` prints."""
    import time

    run_call(*calls[0])
    start = time.perf_counter()
    tokens = sum(run_call(*call) for call in calls)
    return {
        "seconds": time.perf_counter() - start,
        "completion_tokens": tokens,
        "rows": sum(len(rendered) for rendered, _ in calls),
        "calls": len(calls),
        "peak_rss_mb": peak_rss_mb(),
    }


def calls_line(side: str, summary: dict[str, dict], first: dict, width: int) -> str:
    """One side's line for a benchmark of whole ``generate`` calls: median tokens/s and
    seconds, each run's rate, peak RSS, and the work (``first``: one run's ``rows``,
    ``calls`` and ``completion_tokens``)."""
    measured = summary[side]
    rates = ", ".join(f"{x:.1f}" for x in measured["rates"])
    return (
        f"{side:{width}s} {measured['tokens_per_s']:7.1f} tokens/s, {measured['seconds']:6.1f} s "
        f"(runs: {rates} tokens/s) peak RSS {measured['peak_rss_mb']:6.0f} MB; "
        f"{first['rows']} rows in {first['calls']} generate calls, {first['completion_tokens']} completion tokens"
    )


def ratios_against_best(summary: dict[str, dict], ours: str, peers: Sequence[str]) -> tuple[str, float, float]:
    """(the fastest peer, our speed ratio over it, our peak-memory ratio over it)."""
    best = max(peers, key=lambda side: summary[side]["tokens_per_s"])
    return (
        best,
        summary[ours]["tokens_per_s"] / summary[best]["tokens_per_s"],
        summary[ours]["peak_rss_mb"] / summary[best]["peak_rss_mb"],
    )


def run_worker(script: str, side: str, options: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script --worker SIDE OPTIONS`` in its own process (its peak RSS its own) from
    the repository root and return the JSON of its last stdout line; stop with the
    worker's error output if it fails."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    command = [sys.executable, script, "--worker", side, *options]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env)
    if result.returncode != 0:
        sys.exit(f"{side} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
