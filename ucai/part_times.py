"""Wall-clock seconds of a stage's parts, summed by part and by the analysis that asked
for them.

The evaluation times its parts so that its log line and ``summary.json`` say where its
minutes went and how many of them each optional analysis added (the depth analysis, the
train-prompt answers): what a run costs without them is its time minus theirs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

CORE = "core"  # parts every evaluation runs


class PartTimes:
    """Seconds by part name, each part belonging to one analysis.

    >>> times = PartTimes()
    >>> with times.part("answers"):
    ...     pass
    >>> sorted(times.by_analysis())
    ['core']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.analysis: dict[str, str] = {}

    @contextmanager
    def part(self, name: str, analysis: str = CORE) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``name`` (also when it raises)."""
        known = self.analysis.setdefault(name, analysis)
        if known != analysis:
            raise ValueError(f"part {name!r} belongs to analysis {known!r}, not {analysis!r}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def by_analysis(self) -> dict[str, float]:
        """Seconds summed per analysis, in the order the analyses first ran."""
        out: dict[str, float] = {}
        for name, seconds in self.seconds.items():
            key = self.analysis[name]
            out[key] = out.get(key, 0.0) + seconds
        return out

    def to_json(self) -> dict:
        """``{"seconds": {part: s}, "analysis": {part: analysis}, "by_analysis": {analysis: s}}``."""
        return {
            "seconds": {name: round(s, 3) for name, s in self.seconds.items()},
            "analysis": dict(self.analysis),
            "by_analysis": {name: round(s, 3) for name, s in self.by_analysis().items()},
        }

    def describe(self) -> str:
        """One line: every part's time, then what each optional analysis added."""
        parts = ", ".join(f"{name} {fmt_seconds(s)}" for name, s in self.seconds.items())
        extra = optional_analyses(self.by_analysis())
        return parts + (f"; added by optional analyses: {extra}" if extra else "")


def part_name(base: str, analysis: str) -> str:
    """``base`` for the core analysis, ``base_<analysis>`` for an optional one."""
    return base if analysis == CORE else f"{base}_{analysis}"


def optional_analyses(by_analysis: dict[str, float]) -> str:
    """``"depth 3.0 min, train_prompts 74.0 s"``: the optional analyses' times ("" if none)."""
    return ", ".join(f"{name} {fmt_seconds(s)}" for name, s in by_analysis.items() if name != CORE)


def fmt_seconds(seconds: float) -> str:
    """Seconds under two minutes, else minutes, one decimal (the pipeline's stage times too)."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
