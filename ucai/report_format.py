"""Formatting shared by the report's sections: numbers, intervals and Markdown tables,
and the PNG plots' matplotlib set-up."""

from __future__ import annotations

import math
from pathlib import Path

from ucai.data.io import atomic_output


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    with atomic_output(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def with_ci(stats: dict | None) -> str:
    if not stats:
        return "–"
    if "low" not in stats:
        return fmt(stats["mean"])
    return f"{fmt(stats['mean'])} [{fmt(stats['low'])}, {fmt(stats['high'])}]"


def interval(low, high, digits: int = 3) -> str:
    """``[low, high]``; a None end is unbounded (too few prompts to bound it at that level)."""
    return f"[{'−∞' if low is None else fmt(low, digits)}, {'∞' if high is None else fmt(high, digits)}]"


def p_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def signed(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"
