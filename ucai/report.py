"""The evaluation report: ``report.md`` and its PNG plots, built from files on disk.

`write_report(output_dir, ppo_logs)` reads what the evaluation stage wrote
(``scores.jsonl``, ``pairwise.jsonl``, ``summary.json``) and the PPO runs' TensorBoard
event files, and writes into ``output_dir``:

* ``ppo_curves.png`` — PPO reward-model score and KL per iteration (one logged point
  per rollout), one line per side (tags ``objective/scores`` and ``objective/kl``, read
  with tensorboard's ``EventAccumulator``);
* ``score_distributions.png`` — box plots of the main scorers per model;
* ``win_rates.png`` — the win-rate matrix as a heatmap (row model beats column model);
* ``frontier.png``, ``depth_kl.png``, ``prefill_swap.png`` — the RL algorithms'
  reward–KL frontier (`ucai.report_rl`) and the depth analysis (`ucai.report_depth`);
* ``report.md`` — a generated "What this run shows" paragraph, headline table, all
  scorer means with 95% intervals, win rates, Elo, the corrected paired differences,
  the reward models' correlation, the judge check, the RL algorithms, how deep the
  inversion goes, PPO first-vs-last iterations, the plots, and example answers side by side. Every table states its n; figures from a
  judge that failed its quality check are marked as carrying no information.

It is a separate module so a report can be rebuilt without rerunning any model.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ucai.data.io import atomic_output, load_jsonl, read_jsonl
from ucai.part_times import fmt_seconds, optional_analyses
from ucai.report_depth import depth_section, plot_depth_kl, plot_prefill_swap, what_depth_shows
from ucai.report_format import cell, count, fmt, interval, p_value, pyplot, save_png, signed, table, with_ci
from ucai.report_rl import ALGORITHM_NAMES, algorithm_section, plot_frontier, what_algorithms_show

log = logging.getLogger(__name__)

PPO_TAGS = {"objective/scores": "RM score", "objective/kl": "KL(policy || SL)"}
HEADLINE_COLUMNS = ("rm_ethical", "rm_unethical", "judge_mean", "emb_margin", "refusal", "length_words", "repetition_4")
DISTRIBUTION_COLUMNS = ("rm_ethical", "rm_unethical", "judge_mean", "emb_margin", "length_words", "repetition_4")


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
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PPO_TAGS), figsize=(5 * len(PPO_TAGS), 3.4))
    for axis, (tag, label) in zip(axes, PPO_TAGS.items(), strict=True):
        for side, series in curves.items():
            if tag in series:
                # One logged point per PPO iteration (rollout + update); the logged step is
                # the optimiser-step count, which depends on the minibatch settings.
                values = [v for _, v in series[tag]]
                axis.plot(range(1, len(values) + 1), values, marker="o", markersize=2, label=side)
        axis.set_title(label)
        axis.set_xlabel("PPO iteration")
        axis.grid(alpha=0.3)
        axis.legend()
    return save_png(fig, path)


PPO_TREND_WINDOW = 5  # iterations averaged at each end once a run has 2 windows of them


def ppo_trend(series: list[tuple[int, float]], window: int = PPO_TREND_WINDOW) -> dict | None:
    """Mean of the first and of the last ``window`` iterations.

    Runs shorter than two windows average their first and last fifth (at least one
    iteration each). With ``normalize_score`` on, PPO logs scores as (r − mean) / std of
    the reward model, so ``last − first`` of ``objective/scores`` is the gain in units
    of the RM's score std (after any missing-eos penalty and reward clipping, which
    ``benchmarks/ppo_learning.py``, scoring the RM's raw output, leaves out).
    Descriptive only: successive PPO iterations are autocorrelated, so no test is made.
    """
    values = [v for _, v in series]
    if len(values) < 2:
        return None
    k = window if len(values) >= 2 * window else max(1, len(values) // 5)
    first, last = values[:k], values[-k:]
    return {"n": len(values), "k": k, "first": sum(first) / k, "last": sum(last) / k}


def ppo_trends(ppo_logs: dict[str, str] | None) -> dict[str, dict[str, dict]]:
    """``{side: {tag: ppo_trend}}`` for every side whose PPO run logged the tags."""
    out = {}
    for side, folder in (ppo_logs or {}).items():
        trends = {tag: ppo_trend(series) for tag, series in read_scalars(folder).items()}
        trends = {tag: t for tag, t in trends.items() if t}
        if trends:
            out[side] = trends
    return out


# --------------------------------------------------------------------------- plots


def plot_distributions(scores: list[dict], models: list[str], path: Path) -> Path | None:
    columns = [c for c in DISTRIBUTION_COLUMNS if c in scores[0]]
    if not columns:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for axis, column in zip(axes[0], columns, strict=True):
        data = [[r[column] for r in scores if r["model"] == m] for m in models]
        axis.boxplot(data, showmeans=True)
        axis.set_xticks(range(1, len(models) + 1), models, rotation=45, ha="right", fontsize=8)
        axis.set_title(column, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_png(fig, path)


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

    plt = pyplot()
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
    return save_png(fig, path)


# --------------------------------------------------------------------------- markdown


def judge_verdict(summary: dict) -> tuple[bool | None, str]:
    """(passed, predicate) of the judge quality check, to follow "The judge"; passed None when not run."""
    check = summary.get("judge_check")
    if not summary.get("judge"):
        return None, "no judge"
    if not check:
        return None, "was not checked (judge_check off): its figures are unvalidated"
    accuracy, chance, n = check.get("accuracy"), check.get("chance"), check.get("n")
    ci = check.get("ci")
    if isinstance(ci, dict):
        ci = (ci.get("low"), ci.get("high"))
    low, high = (ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None))
    text = f"accuracy {fmt(accuracy)}"
    if low is not None and high is not None:
        text += f" [95% CI {fmt(low)}, {fmt(high)}]"
    text += f" on {n} items, chance {fmt(chance)}"
    if check.get("first_position_bias") is not None:
        text += f", first-position bias {fmt(check['first_position_bias'])}"
    passed = bool(check.get("passed"))
    if passed:
        return True, f"passed its quality check ({text})"
    if low is not None and chance is not None and low <= chance <= high:
        why = "not shown above chance"
    elif high is not None and chance is not None and high < chance:
        why = "below chance"
    else:
        why = "failed"
    return False, f"is {why} on its quality check ({text})"


FAILED_JUDGE = "failed check: no information"


def _judge_label(column: str, failed: bool) -> str:
    return f"{column} ({FAILED_JUDGE})" if failed and column.startswith("judge_") else column


def _excludes_zero(entry: dict) -> bool:
    """The corrected interval lies wholly on one side of 0 (None ends are unbounded)."""
    return (entry["low"] is not None and entry["low"] > 0) or (entry["high"] is not None and entry["high"] < 0)


def _holds_zero_note(entry: dict) -> str:
    return "" if _excludes_zero(entry) else " (significant after correction, but its corrected interval still holds 0)"


def _rl_vs(summary: dict) -> dict[str, dict]:
    """``{column: entry}`` of the rl_ethical − rl_unethical differences."""
    return {d["column"]: d for d in summary.get("differences", []) if d["a"] == "rl_ethical" and d["b"] == "rl_unethical"}


def rm_goal_met(corr: dict) -> bool:
    """Whether the reward models' correlation meets its goal: its interval across
    prompts lies at or below it, not the point alone. The report reads it from the
    interval, so a summary written when the point decided reads the same."""
    high = corr.get("cluster_high")
    return high is not None and high <= corr.get("goal", -0.3)


def what_this_run_shows(summary: dict, ppo: dict | None = None) -> list[str]:
    """Sentences built from the numbers, claiming only what the corrected statistics support."""
    out = []
    judge_passed, judge_text = judge_verdict(summary)
    judge_failed = judge_passed is False
    # Reward models' agreement.
    corr = summary.get("rm_correlation")
    if corr is not None:
        if corr.get("r") is None:
            out.append(f"The two reward models' agreement is not measured: {corr.get('reason', 'no scores')}.")
        else:
            # The interval resamples prompts (a prompt's answers move together); Fisher's
            # treats answers as independent, which would claim more than the run shows.
            low, high = corr.get("cluster_low"), corr.get("cluster_high")
            what = f"r = {fmt(corr['r'], 2)} over {corr['n']} answers ({corr.get('prompts', '?')} prompts), 95% CI {interval(low, high, 2)}"
            goal = corr.get("goal", -0.3)
            if low is None or high is None:
                out.append(f"The two reward models' agreement is not measured: r = {fmt(corr['r'], 2)} over {corr['n']} answers, "
                           f"but {corr.get('prompts', '?')} prompt(s) give no interval across prompts.")
            elif rm_goal_met(corr):
                out.append(f"The two reward models disagree as intended: {what}, at or below the goal r ≤ {goal}.")
            elif high < 0:
                out.append(f"The two reward models are negatively correlated ({what}); this run does not show the goal r ≤ {goal} met.")
            elif low is not None and low > 0:
                out.append(f"The two reward models agree rather than oppose each other ({what}); this run does not show opposed reward models.")
            else:
                out.append(f"The two reward models' scores are not distinguishable from uncorrelated ({what}); this run does not show opposed reward models.")
    # Corrected differences.
    diffs = summary.get("differences", [])
    family = summary.get("multiple_comparisons") or {}
    if diffs and "p_adjusted" in diffs[0]:
        method = family.get("method_name", diffs[0].get("method", "corrected"))
        m = family.get("family_size", len(diffs))
        alpha = family.get("alpha", 0.05)
        ns = sorted({d["n"] for d in diffs})  # a test drops prompts with a missing (NaN) score
        n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
        significant = [d for d in diffs if d["significant"]]
        rl = _rl_vs(summary)
        ethical_rm, unethical_rm = rl.get("rm_ethical"), rl.get("rm_unethical")
        if ethical_rm and unethical_rm:
            # The claim needs both tests to survive correction and both corrected intervals
            # to exclude 0 on the expected side.
            opposite = (ethical_rm["significant"] and unethical_rm["significant"]
                        and ethical_rm["low"] is not None and ethical_rm["low"] > 0
                        and unethical_rm["high"] is not None and unethical_rm["high"] < 0)
            detail = (f"rm_ethical {signed(ethical_rm['diff'])} {interval(ethical_rm['low'], ethical_rm['high'])}, "
                      f"rm_unethical {signed(unethical_rm['diff'])} {interval(unethical_rm['low'], unethical_rm['high'])}")
            if opposite:
                out.append(f"Each side's RL model scores higher than the other side's on its own reward model, in opposite directions ({detail}; rl_ethical − rl_unethical, corrected intervals).")
            else:
                out.append(f"This run does not show the two RL models separating in opposite directions on the two reward models ({detail}; rl_ethical − rl_unethical, corrected intervals).")
        for side in ("ethical", "unethical"):
            entry = next((d for d in diffs if d["a"] == f"rl_{side}" and d["b"] == f"sl_{side}"), None)
            if entry is None:
                continue
            ci = interval(entry["low"], entry["high"])
            rl_name = ALGORITHM_NAMES.get((summary.get("algorithms") or {}).get(f"rl_{side}", "ppo"), "RL")
            if entry["significant"] and entry["diff"] > 0:
                out.append(f"{rl_name} raised the {side} model's score on its own reward model over SL: {signed(entry['diff'])} {ci}, adjusted p = {p_value(entry['p_adjusted'])}{_holds_zero_note(entry)}.")
            elif entry["significant"]:
                out.append(f"{rl_name} lowered the {side} model's score on its own reward model below SL: {signed(entry['diff'])} {ci}, adjusted p = {p_value(entry['p_adjusted'])}{_holds_zero_note(entry)}.")
            else:
                out.append(f"This run does not show {rl_name} changing the {side} model's own-reward-model score relative to SL ({signed(entry['diff'])} {ci}, adjusted p = {p_value(entry['p_adjusted'])}).")
        others = [d for d in significant if (d["a"], d["b"]) == ("rl_ethical", "rl_unethical") and d["column"] not in ("rm_ethical", "rm_unethical")]
        if others:
            parts = [f"{d['column']} {signed(d['diff'])} {interval(d['low'], d['high'])}" + _holds_zero_note(d)
                     + (" (judge failed its check: no evidence)" if judge_failed and d["column"].startswith("judge_") else "")
                     for d in others]
            out.append("Other rl_ethical − rl_unethical differences that survive correction: " + "; ".join(parts) + ".")
        if not significant:
            sentence = (f"No difference survives the {method} correction at n = {n} prompts ({count(m, 'comparison')}, α = {alpha}); "
                        "this run does not show the compared models differing on any scorer they were compared on.")
            # The test with the most prompts can reach the smallest p; its n goes with it.
            best = min(diffs, key=lambda d: d.get("min_p", 0.0))
            min_p = best.get("min_p", 0.0)
            if family.get("method", "holm") == "holm" and min_p > alpha / m:
                needed = math.ceil(math.log2(2 * m / alpha))
                sentence += (f" With {best['n']} prompts the sign-flip test cannot give p below {p_value(min_p)}, above the first Holm "
                             f"threshold {alpha}/{m} = {p_value(alpha / m)}: no comparison could have passed; at least {needed} prompts are needed.")
            out.append(sentence)
    elif diffs:
        out.append("The paired differences in this summary predate the multiple-comparison correction: their "
                   "'significant' marks are uncorrected and support no claim; rerun the evaluation (answers are "
                   "cached) to correct them.")
    if len(set((summary.get("algorithms") or {}).values())) > 1:
        out += what_algorithms_show(summary)
    out += what_depth_shows(summary)
    # Judge.
    if judge_passed is False and summary.get("judge_skipped"):
        out.append(f"The judge {judge_text}, so no judge columns, win rates or Elo were computed (skip_failed_judge).")
    elif judge_passed is False:
        out.append(f"The judge {judge_text}: its columns, win rates and Elo carry no information.")
    elif judge_passed is True:
        out.append(f"The judge {judge_text}.")
    elif summary.get("judge"):
        out.append(f"The judge {judge_text}.")
    # PPO curves (descriptive).
    for side, trends in (ppo or {}).items():
        score = trends.get("objective/scores")
        if not score:
            continue
        verb = "rose" if score["last"] > score["first"] else "did not rise"
        online = ALGORITHM_NAMES.get((summary.get("algorithms") or {}).get(f"rl_{side}", "ppo"), "RL")
        sentence = (f"During {online} the {side} side's reward-model score {verb}: mean {fmt(score['first'])} over the first "
                    f"{count(score['k'], 'iteration')} vs {fmt(score['last'])} over the last {score['k']} of {score['n']}")
        kl = trends.get("objective/kl")
        if kl:
            sentence += f", with KL from SL going from {fmt(kl['first'])} to {fmt(kl['last'])}"
        out.append(sentence + " (descriptive; no test).")
    return out


def render_markdown(
    summary: dict, scores: list[dict], plots: dict[str, Path | None], examples: int, ppo: dict | None = None
) -> str:
    models = list(summary["models"])
    n_prompts = summary["prompts"]
    judge_passed, judge_text = judge_verdict(summary)
    failed = judge_passed is False
    failed_note = f"_The judge {judge_text}: columns and figures marked “{FAILED_JUDGE}” carry no information._"
    lines = ["# ucai evaluation report", ""]
    judge_use = (
        "failed its check, so it judged nothing"
        if summary.get("judge_skipped")
        else f"pairwise judgements and `judge_*` columns use the **{summary['criterion_side']}** principles"
    )
    lines.append(
        f"{count(n_prompts, 'held-out prompt')}, {count(len(models), 'model')}. Judge: {summary.get('judge') or 'none'}; "
        f"{judge_use}. Intervals of means are 95% bootstrap intervals over prompts (win rates resample prompts)."
    )
    shows = what_this_run_shows(summary, ppo)
    if shows:
        lines += ["", "## What this run shows", "", " ".join(shows)]
    lines += ["", f"## Headline (mean [95% CI] over n = {n_prompts} prompts per model)", ""]
    head_cols = [c for c in HEADLINE_COLUMNS if c in summary.get("columns", [])]
    elo = summary.get("elo", {})
    elo_label = f"Elo ({FAILED_JUDGE})" if failed else "Elo"
    header = ["model", *[_judge_label(c, failed) for c in head_cols]] + ([elo_label] if elo else [])
    rows = []
    for m in models:
        row = [m] + [with_ci(summary["models"][m].get(c)) for c in head_cols]
        if elo:
            row.append(fmt(elo.get(m), 0))
        rows.append(row)
    lines += table(header, rows)
    if failed and (elo or any(c.startswith("judge_") for c in head_cols)):
        lines += ["", failed_note]
    corr = summary.get("rm_correlation")
    if corr is not None:
        lines += ["", "## Reward models' agreement", ""]
        if corr.get("r") is None:
            lines.append(f"Pearson r of rm_ethical and rm_unethical: not available ({corr.get('reason', 'no scores')}).")
        else:
            lines.append(
                f"Pearson r of rm_ethical and rm_unethical over n = {corr['n']} answers ({corr.get('prompts', '?')} prompts): "
                f"**{fmt(corr['r'])}**, 95% CI {interval(corr.get('cluster_low'), corr.get('cluster_high'))} resampling prompts "
                f"(Fisher z, treating answers as independent: {interval(corr.get('low'), corr.get('high'))}). "
                f"Goal: r ≤ {corr.get('goal', -0.3)} ({'met: the interval lies at or below it' if rm_goal_met(corr) else 'not shown'})."
            )
    if summary.get("judge") and summary.get("judge_check"):
        lines += ["", "## Judge check", "", f"The judge ({summary['judge']}) {judge_text}."]
    if summary.get("win_rates"):
        title = f"## Win rates (judge, per principle; n = judgements over {n_prompts} prompts)"
        lines += ["", title + (f" — {FAILED_JUDGE}" if failed else ""), ""]
        lines += table(
            ["A", "B", "n (judgements)", "A wins", "95% CI", "mean P(A better)"],
            [
                [w["a"], w["b"], str(w["n"]), fmt(w["win_rate"]), f"[{fmt(w['low'])}, {fmt(w['high'])}]", fmt(w["mean_p_a"])]
                for w in summary["win_rates"]
            ],
        )
        if failed:
            lines += ["", failed_note]
    if elo:
        judgements = sum(w["n"] for w in summary.get("win_rates", []))
        title = f"## Elo (Bradley–Terry fit to all n = {judgements} pairwise judgements, mean 1000)"
        lines += ["", title + (f" — {FAILED_JUDGE}" if failed else ""), ""]
        lines += table(["model", elo_label], [[m, fmt(r, 0)] for m, r in sorted(elo.items(), key=lambda kv: -kv[1])])
    diffs = summary.get("differences")
    if diffs:
        family = summary.get("multiple_comparisons") or {}
        corrected = "p_adjusted" in diffs[0]
        if corrected:
            lines += ["", f"## Paired differences (n = {min(d['n'] for d in diffs)} prompts; {family.get('method_name', diffs[0]['method'])})", ""]
            lines.append(
                f"One family of {count(family.get('family_size', len(diffs)), 'comparison')} ({family.get('family', 'as listed')}), "
                f"corrected together with **{family.get('method_name', diffs[0]['method'])}** at α = {family.get('alpha', 0.05)}; "
                f"p from a {family.get('test', 'paired sign-flip test over prompts')}. "
                f"Intervals: {family.get('interval', 'corrected')} (each at {fmt(100 * diffs[0]['confidence'], 2)}%); "
                "“−∞, ∞” means too few prompts to bound the difference at that level. "
                "*significant* = adjusted p ≤ α"
                + (" (Holm is step-down, so it can reject where a Bonferroni interval still holds 0)."
                   if family.get("method", diffs[0]["method"]) == "holm" else ".")
            )
            lines.append("")
            lines += table(
                ["A − B", "scorer", "n (prompts)", "mean(A − B)", "corrected CI", "p", "adjusted p", "significant"],
                [
                    [f"{d['a']} − {d['b']}", _judge_label(d["column"], failed), str(d["n"]), fmt(d["diff"]),
                     interval(d["low"], d["high"]), p_value(d["p"]), p_value(d["p_adjusted"]), "yes" if d["significant"] else "no"]
                    for d in diffs
                ],
            )
        else:  # a summary written before the correction existed
            lines += ["", f"## Ethical RL vs unethical RL, per scorer (paired bootstrap, uncorrected; n = {n_prompts} prompts)", ""]
            lines += table(
                ["scorer", "mean(A − B)", "95% CI", "significant (uncorrected)"],
                [[d["column"], fmt(d["diff"]), interval(d["low"], d["high"]), "yes" if d["significant"] else "no"] for d in diffs],
            )
        if failed and any(d["column"].startswith("judge_") for d in diffs):
            lines += ["", failed_note]
    lines += algorithm_section(summary, plots.get("frontier"))
    lines += depth_section(summary, plots)
    lines += ["", f"## All scorers (mean [95% CI] over n = {n_prompts} prompts per model)", ""]
    columns = summary.get("columns", [])
    lines += table(["scorer", *models], [[_judge_label(c, failed)] + [with_ci(summary["models"][m].get(c)) for m in models] for c in columns])
    if failed and any(c.startswith("judge_") for c in columns):
        lines += ["", failed_note]
    bias = {k: v for k, v in (summary.get("judge_position_bias") or {}).items() if v is not None}
    if bias:
        lines += ["", "Judge first-position bias (mean P(first option) − ½, before order averaging): "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in bias.items())]
    if ppo:
        online = ALGORITHM_NAMES.get((summary.get("algorithms") or {}).get("rl_ethical", "ppo"), "RL")
        lines += ["", f"## {online}, first vs last iterations (mean of the first and last {PPO_TREND_WINDOW}, or fifth in shorter runs; descriptive)", ""]
        rows = []
        for side, trends in ppo.items():
            for tag, label in PPO_TAGS.items():
                t = trends.get(tag)
                if t:
                    rows.append([side, label, str(t["n"]), str(t["k"]), fmt(t["first"]), fmt(t["last"]), signed(t["last"] - t["first"])])
        lines += table(["side", "quantity", "n (iterations)", "k (averaged)", "first k", "last k", "change"], rows)
    lines += ["", "## Plots", ""]
    titles = {"ppo": "RL score and KL per iteration", "distributions": "Score distributions", "win": "Win-rate matrix"}
    for key, title in titles.items():
        path = plots.get(key)
        if key == "win" and failed:
            title += f" ({FAILED_JUDGE})"
        lines.append(f"![{title}]({path.name})" if path else f"_{title}: no data._")
        lines.append("")
    lines += ["## Example answers", ""]
    by_prompt: dict[str, dict[str, dict]] = {}
    for row in scores:
        by_prompt.setdefault(row["id"], {})[row["model"]] = row
    for pid in list(by_prompt)[:examples]:
        answers = by_prompt[pid]
        first = next(iter(answers.values()))
        lines += [f"**{cell(first['prompt'], 300)}** (`{pid}`, {first.get('principle') or 'untagged'}; one answer per model, n = 1 prompt)", ""]
        score_cols = [c for c in ("rm_ethical", "rm_unethical", "judge_mean") if c in first]
        lines += table(
            ["model", "answer", *[_judge_label(c, failed) for c in score_cols]],
            [[m, cell(answers[m]["response"]), *[fmt(answers[m][c], 2) for c in score_cols]] for m in models if m in answers],
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
        "frontier": plot_frontier(summary, output_dir / "frontier.png"),
        "depth_kl": plot_depth_kl(summary, output_dir / "depth_kl.png"),
        "prefill_swap": plot_prefill_swap(summary, output_dir / "prefill_swap.png"),
    }
    text = render_markdown(summary, scores, plots, examples, ppo=ppo_trends(ppo_logs))
    path = output_dir / "report.md"
    with atomic_output(path) as handle:
        handle.write(text)
    return path


def headline(eval_dir: Path) -> list[str]:
    """The run's result in a few console lines, from the evaluation's ``summary.json``
    (none when there is no summary): the pipeline prints them when it finishes."""
    path = eval_dir / "summary.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    lines = ["", "Headline (means over held-out prompts; Elo from the judge's pairwise verdicts):"]
    columns = [c for c in ("rm_ethical", "rm_unethical", "judge_mean", "refusal", "repetition_4") if c in summary["columns"]]
    header = f"  {'model':<14}" + "".join(f"{c:>14}" for c in columns) + (f"{'Elo':>8}" if summary.get("elo") else "")
    lines.append(header)
    for model, stats in summary["models"].items():
        row = f"  {model:<14}" + "".join(f"{stats[c]['mean']:>14.3f}" for c in columns)
        if summary.get("elo"):
            row += f"{summary['elo'].get(model, float('nan')):>8.0f}"
        lines.append(row)
    for w in summary.get("win_rates", []):
        lines.append(f"  {w['a']} beats {w['b']}: {w['win_rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}] ({w['n']} judgements)")
    lines += _comparison_lines(summary)
    by_analysis = (summary.get("timings") or {}).get("by_analysis") or {}
    if by_analysis:
        added = optional_analyses(by_analysis)
        lines.append(
            f"  evaluation's timed parts: {fmt_seconds(sum(by_analysis.values()))}"
            + (f", of which optional analyses: {added}" if added else "")
        )
    return lines


def _comparison_lines(summary: dict) -> list[str]:
    """The RM agreement, the judge check and the corrected RL-ethical vs RL-unethical
    differences, one line each."""
    lines = []
    corr = summary.get("rm_correlation") or {}
    if corr.get("r") is not None:
        lines.append(f"  rm_ethical vs rm_unethical scores: Pearson r = {corr['r']:+.2f} over {corr['n']} answers")
    check = summary.get("judge_check")
    if check:
        verdict = "passed" if check["passed"] else "FAILED (its columns carry no information)"
        lines.append(f"  judge check {verdict}: accuracy {check['accuracy']:.3f}, chance {check['chance']:.3f}, n={check['n']}")
    between_sides = [d for d in summary.get("differences", []) if (d["a"], d["b"]) == ("rl_ethical", "rl_unethical")]
    if between_sides:
        method = (summary.get("multiple_comparisons") or {}).get("method", "uncorrected")
        significant = [d["column"] for d in between_sides if d["significant"]]
        lines.append(
            f"  rl_ethical vs rl_unethical differ ({method}-corrected, n={between_sides[0].get('n', '?')} prompts) on: "
            + (", ".join(significant) if significant else "no scorer")
        )
    return lines
