"""The evaluation report: ``report.md`` and its PNG plots, built from files on disk.

`write_report(output_dir, ppo_logs)` reads what the evaluation stage wrote
(``scores.jsonl``, ``pairwise.jsonl``, ``summary.json``) and the PPO runs' TensorBoard
event files, and writes into ``output_dir``:

* ``ppo_curves.png`` — PPO reward-model score and KL per step, one line per side
  (tags ``objective/scores`` and ``objective/kl``, read with tensorboard's
  ``EventAccumulator``);
* ``score_distributions.png`` — box plots of the main scorers per model;
* ``win_rates.png`` — the win-rate matrix as a heatmap (row model beats column model);
* ``report.md`` — headline table, all scorer means with 95% intervals, win rates,
  Elo, ethical-vs-unethical significance, the plots, and example answers side by side.

It is a separate module so a report can be rebuilt without rerunning any model.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ucai.data.io import atomic_output, load_jsonl, read_jsonl

log = logging.getLogger(__name__)

PPO_TAGS = {"objective/scores": "RM score", "objective/kl": "KL(policy || SL)"}
HEADLINE_COLUMNS = ("rm_ethical", "rm_unethical", "judge_mean", "emb_margin", "refusal", "length_words", "repetition_4")
DISTRIBUTION_COLUMNS = ("rm_ethical", "rm_unethical", "judge_mean", "emb_margin", "length_words", "repetition_4")


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_output(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    _matplotlib().close(fig)
    return path


# --------------------------------------------------------------------------- TensorBoard


def latest_event_dir(root: str | Path) -> Path | None:
    """The folder of the newest TensorBoard event file under ``root`` (a run's version dir)."""
    root = Path(root)
    if not root.exists():
        return None
    files = sorted(root.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    return files[-1].parent if files else None


def read_scalars(root: str | Path, tags=tuple(PPO_TAGS)) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the newest run under ``root``; missing tags are left out."""
    folder = latest_event_dir(root)
    if folder is None:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags().get("scalars", []))
    return {tag: [(e.step, float(e.value)) for e in accumulator.Scalars(tag)] for tag in tags if tag in available}


def plot_ppo_curves(ppo_logs: dict[str, str], path: Path) -> Path | None:
    curves = {side: read_scalars(folder) for side, folder in (ppo_logs or {}).items()}
    curves = {side: c for side, c in curves.items() if c}
    if not curves:
        return None
    plt = _matplotlib()
    fig, axes = plt.subplots(1, len(PPO_TAGS), figsize=(5 * len(PPO_TAGS), 3.4))
    for axis, (tag, label) in zip(axes, PPO_TAGS.items(), strict=True):
        for side, series in curves.items():
            if tag in series:
                steps, values = zip(*series[tag], strict=True)
                axis.plot(steps, values, marker="o", markersize=2, label=side)
        axis.set_title(label)
        axis.set_xlabel("PPO step")
        axis.grid(alpha=0.3)
        axis.legend()
    return _save(fig, path)


# --------------------------------------------------------------------------- plots


def plot_distributions(scores: list[dict], models: list[str], path: Path) -> Path | None:
    columns = [c for c in DISTRIBUTION_COLUMNS if c in scores[0]]
    if not columns:
        return None
    plt = _matplotlib()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for axis, column in zip(axes[0], columns, strict=True):
        data = [[r[column] for r in scores if r["model"] == m] for m in models]
        axis.boxplot(data, showmeans=True)
        axis.set_xticks(range(1, len(models) + 1), models, rotation=45, ha="right", fontsize=8)
        axis.set_title(column, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def win_matrix(win_rates: list[dict], models: list[str]) -> list[list[float]]:
    """M[i][j] = rate at which model i beats model j (nan where they did not meet)."""
    index = {m: i for i, m in enumerate(models)}
    matrix = [[math.nan] * len(models) for _ in models]
    for entry in win_rates:
        i, j = index[entry["a"]], index[entry["b"]]
        matrix[i][j] = entry["win_rate"]
        matrix[j][i] = 1.0 - entry["win_rate"]
    return matrix


def plot_win_matrix(win_rates: list[dict], models: list[str], path: Path) -> Path | None:
    if not win_rates:
        return None
    import numpy as np

    plt = _matplotlib()
    matrix = np.array(win_matrix(win_rates, models))
    fig, axis = plt.subplots(figsize=(1.2 * len(models) + 2, 1.0 * len(models) + 1.5))
    image = axis.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="RdYlGn")
    axis.set_xticks(range(len(models)), models, rotation=45, ha="right")
    axis.set_yticks(range(len(models)), models)
    for i in range(len(models)):
        for j in range(len(models)):
            if not math.isnan(matrix[i, j]):
                axis.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9)
    axis.set_title("win rate of row over column")
    fig.colorbar(image, ax=axis, fraction=0.046)
    return _save(fig, path)


# --------------------------------------------------------------------------- markdown


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|") or "(empty)"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _with_ci(stats: dict | None) -> str:
    if not stats:
        return "–"
    if "low" not in stats:
        return _fmt(stats["mean"])
    return f"{_fmt(stats['mean'])} [{_fmt(stats['low'])}, {_fmt(stats['high'])}]"


def render_markdown(summary: dict, scores: list[dict], plots: dict[str, Path | None], examples: int) -> str:
    models = list(summary["models"])
    lines = ["# ucai evaluation report", ""]
    lines.append(
        f"{summary['prompts']} held-out prompts, {len(models)} models. Judge: {summary.get('judge') or 'none'}; "
        f"pairwise judgements and `judge_*` columns use the **{summary['criterion_side']}** principles. "
        "Intervals are 95% bootstrap intervals (win rates resample prompts)."
    )
    lines += ["", "## Headline", ""]
    head_cols = [c for c in HEADLINE_COLUMNS if c in summary.get("columns", [])]
    elo = summary.get("elo", {})
    header = ["model", *head_cols] + (["Elo"] if elo else [])
    rows = []
    for m in models:
        row = [m] + [_with_ci(summary["models"][m].get(c)) for c in head_cols]
        if elo:
            row.append(_fmt(elo.get(m), 0))
        rows.append(row)
    lines += _table(header, rows)
    if summary.get("win_rates"):
        lines += ["", "## Win rates (judge, per principle)", ""]
        lines += _table(
            ["A", "B", "judgements", "A wins", "95% CI", "mean P(A better)"],
            [
                [w["a"], w["b"], str(w["n"]), _fmt(w["win_rate"]), f"[{_fmt(w['low'])}, {_fmt(w['high'])}]", _fmt(w["mean_p_a"])]
                for w in summary["win_rates"]
            ],
        )
    if elo:
        lines += ["", "## Elo (Bradley–Terry fit to all pairwise judgements, mean 1000)", ""]
        lines += _table(["model", "Elo"], [[m, _fmt(r, 0)] for m, r in sorted(elo.items(), key=lambda kv: -kv[1])])
    if summary.get("differences"):
        lines += ["", "## Ethical RL vs unethical RL, per scorer (paired bootstrap)", ""]
        lines += _table(
            ["scorer", "mean(A − B)", "95% CI", "significant"],
            [
                [d["column"], _fmt(d["diff"]), f"[{_fmt(d['low'])}, {_fmt(d['high'])}]", "yes" if d["significant"] else "no"]
                for d in summary["differences"]
            ],
        )
    lines += ["", "## All scorers (mean [95% CI])", ""]
    columns = summary.get("columns", [])
    lines += _table(["scorer", *models], [[c] + [_with_ci(summary["models"][m].get(c)) for m in models] for c in columns])
    bias = {k: v for k, v in (summary.get("judge_position_bias") or {}).items() if v is not None}
    if bias:
        lines += ["", "Judge first-position bias (mean P(first option) − ½, before order averaging): "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in bias.items())]
    lines += ["", "## Plots", ""]
    titles = {"ppo": "PPO score and KL", "distributions": "Score distributions", "win": "Win-rate matrix"}
    for key, title in titles.items():
        path = plots.get(key)
        lines.append(f"![{title}]({path.name})" if path else f"_{title}: no data._")
        lines.append("")
    lines += ["## Example answers", ""]
    by_prompt: dict[str, dict[str, dict]] = {}
    for row in scores:
        by_prompt.setdefault(row["id"], {})[row["model"]] = row
    for pid in list(by_prompt)[:examples]:
        answers = by_prompt[pid]
        first = next(iter(answers.values()))
        lines += [f"**{_cell(first['prompt'], 300)}** (`{pid}`, {first.get('principle') or 'untagged'})", ""]
        score_cols = [c for c in ("rm_ethical", "rm_unethical", "judge_mean") if c in first]
        lines += _table(
            ["model", "answer", *score_cols],
            [[m, _cell(answers[m]["response"]), *[_fmt(answers[m][c], 2) for c in score_cols]] for m in models if m in answers],
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def write_report(output_dir: str | Path, ppo_logs: dict[str, str] | None = None, examples: int = 3) -> Path:
    """Build the plots and ``report.md`` from the evaluation files in ``output_dir``."""
    output_dir = Path(output_dir)
    summary = json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))
    scores = load_jsonl(output_dir / "scores.jsonl", required=("model", "id", "prompt", "response"))
    pairwise_path = output_dir / "pairwise.jsonl"
    pairwise = [row for _, row in read_jsonl(pairwise_path)] if pairwise_path.exists() else []
    models = list(summary["models"])
    plots = {
        "ppo": plot_ppo_curves(ppo_logs or {}, output_dir / "ppo_curves.png"),
        "distributions": plot_distributions(scores, models, output_dir / "score_distributions.png"),
        "win": plot_win_matrix(summary.get("win_rates", []), models, output_dir / "win_rates.png") if pairwise else None,
    }
    text = render_markdown(summary, scores, plots, examples)
    path = output_dir / "report.md"
    with atomic_output(path) as handle:
        handle.write(text)
    return path
