"""Report building from evaluation files and TensorBoard event files (no models)."""

from __future__ import annotations

import json
import math

import pytest

from ucai.data.io import write_jsonl
from ucai.report import (
    latest_event_dir,
    ppo_trend,
    read_scalars,
    render_markdown,
    what_this_run_shows,
    win_matrix,
    write_report,
)


def _write_events(folder, values):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for step, (score, kl) in enumerate(values):
        writer.add_scalar("objective/scores", score, step)
        writer.add_scalar("objective/kl", kl, step)
    writer.close()


def test_read_scalars_takes_the_newest_run(tmp_path):
    _write_events(tmp_path / "ppo_ethical" / "version_0", [(0.1, 0.0)])
    _write_events(tmp_path / "ppo_ethical" / "version_1", [(0.2, 0.01), (0.4, 0.03), (0.5, 0.05)])
    assert latest_event_dir(tmp_path / "ppo_ethical").name == "version_1"
    scalars = read_scalars(tmp_path / "ppo_ethical")
    assert [s for s, _ in scalars["objective/scores"]] == [0, 1, 2]
    assert [v for _, v in scalars["objective/kl"]] == pytest.approx([0.01, 0.03, 0.05])
    assert read_scalars(tmp_path / "absent") == {}


def test_win_matrix_fills_both_directions():
    m = win_matrix([{"a": "x", "b": "y", "win_rate": 0.75}], ["x", "y", "z"])
    assert m[0][1] == 0.75 and m[1][0] == 0.25
    assert math.isnan(m[0][2]) and math.isnan(m[2][2])


def test_write_report_with_curves_tables_and_examples(tmp_path):
    _write_events(tmp_path / "logs" / "ppo_ethical" / "version_0", [(0.1, 0.0), (0.3, 0.02)])
    models = ["sl_ethical", "rl_ethical"]
    scores = [
        {"model": m, "id": f"p{i}", "prompt": f"prompt {i} | with pipe", "principle": "peace",
         "response": f"answer of {m}\nsecond line", "rm_ethical": 0.5 + 0.1 * j, "judge_mean": 0.4, "refusal": 0.0}
        for i in range(3) for j, m in enumerate(models)
    ]
    write_jsonl(tmp_path / "scores.jsonl", scores)
    write_jsonl(tmp_path / "pairwise.jsonl", [{"a": "sl_ethical", "b": "rl_ethical", "id": "p0", "principle": "peace", "p_a": 0.3, "outcome": 0.0}])
    stat = {"mean": 0.5, "low": 0.4, "high": 0.6}
    summary = {
        "criterion_side": "ethical",
        "models": {m: {"rm_ethical": stat, "judge_mean": stat, "refusal": stat} for m in models},
        "prompts": 3,
        "win_rates": [{"a": "sl_ethical", "b": "rl_ethical", "n": 1, "win_rate": 0.0, "low": 0.0, "high": 0.0, "mean_p_a": 0.3}],
        "elo": {"sl_ethical": 950.0, "rl_ethical": 1050.0},
        "differences": [],
        "judge": "tiny-llama",
        "judge_position_bias": {"peace": 0.1, "pairwise": None},
        "columns": ["rm_ethical", "judge_mean", "refusal"],
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    path = write_report(tmp_path, ppo_logs={"ethical": str(tmp_path / "logs" / "ppo_ethical"), "unethical": str(tmp_path / "none")})
    text = path.read_text()
    for png in ("ppo_curves.png", "score_distributions.png", "win_rates.png"):
        assert f"]({png})" in text
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| rl_ethical | 1050 |" in text  # Elo table, best first
    assert text.index("| rl_ethical | 1050 |") < text.index("| sl_ethical | 950 |")
    # answers are flattened to one line and pipes escaped so the table stays intact
    assert "answer of sl_ethical second line" in text
    assert "prompt 0 \\| with pipe" in text
    assert "peace 0.100" in text and "pairwise" not in text.split("Judge first-position bias")[1].split("\n")[0]
    # PPO: 2 iterations, k = max(1, int(2 * 0.2)) = 1 -> first 0.100, last 0.300, change +0.200.
    assert "| ethical | RM score | 2 | 1 | 0.100 | 0.300 | +0.200 |" in text
    assert "ethical side's reward-model score rose" in text
    # Every table states its n.
    assert "n = 3 prompts per model" in text and "n (judgements)" in text and "n = 1 pairwise judgements" in text


def test_ppo_trend_first_and_last_window():
    # 10 iterations 1..10 (two windows of 5): first (1+2+3+4+5)/5 = 3, last (6+...+10)/5 = 8.
    assert ppo_trend([(s, float(s + 1)) for s in range(10)]) == {"n": 10, "k": 5, "first": 3.0, "last": 8.0}
    # 24 iterations 1..24: first 3, last (20+...+24)/5 = 22.
    assert ppo_trend([(s, float(s + 1)) for s in range(24)]) == {"n": 24, "k": 5, "first": 3.0, "last": 22.0}
    # Shorter than two windows: the first and last fifth, at least one each.
    assert ppo_trend([(s, float(s + 1)) for s in range(9)]) == {"n": 9, "k": 1, "first": 1.0, "last": 9.0}
    assert ppo_trend([(s, float(s + 1)) for s in range(3)]) == {"n": 3, "k": 1, "first": 1.0, "last": 3.0}
    assert ppo_trend([(0, 1.0)]) is None


def _diff(a, b, column, diff, low, high, p, p_adjusted, n=20, significant=None):
    return {"a": a, "b": b, "column": column, "n": n, "diff": diff, "p": p, "p_adjusted": p_adjusted, "method": "holm",
            "confidence": 0.99, "low": low, "high": high,
            "significant": p_adjusted <= 0.05 if significant is None else significant, "min_p": 2 / 2**n}


def _summary(differences, family_size, judge_check, rm_correlation):
    stat = {"mean": 0.5, "low": 0.4, "high": 0.6}
    models = ["sl_ethical", "rl_ethical", "sl_unethical", "rl_unethical"]
    return {
        "criterion_side": "ethical",
        "models": {m: {"rm_ethical": stat, "judge_mean": stat} for m in models},
        "prompts": differences[0]["n"],
        "win_rates": [{"a": "rl_ethical", "b": "rl_unethical", "n": 14, "win_rate": 0.6, "low": 0.4, "high": 0.8, "mean_p_a": 0.55}],
        "elo": {m: 1000.0 for m in models},
        "differences": differences,
        "multiple_comparisons": {"method": "holm", "method_name": "Holm (step-down, family-wise error rate)",
                                 "alpha": 0.05, "family_size": family_size, "confidence": 1 - 0.05 / family_size},
        "rm_correlation": rm_correlation,
        "judge": "tiny-llama",
        "judge_check": judge_check,
        "columns": ["rm_ethical", "judge_mean"],
    }


def test_paragraph_for_a_run_with_an_effect():
    summary = _summary(
        [
            _diff("rl_ethical", "rl_unethical", "rm_ethical", 0.3, 0.1, 0.5, 1e-4, 4e-4),
            _diff("rl_ethical", "rl_unethical", "rm_unethical", -0.25, -0.4, -0.1, 1e-4, 4e-4),
            _diff("rl_ethical", "rl_unethical", "refusal", 0.2, 0.05, 0.35, 0.005, 0.01),
            # Holm rejects (adjusted p 0.04) but the Bonferroni interval holds 0: said so.
            _diff("rl_ethical", "rl_unethical", "distinct_2", -0.1, -0.2, 0.01, 0.008, 0.04),
            _diff("rl_ethical", "sl_ethical", "rm_ethical", 0.1, 0.02, 0.2, 0.004, 0.012),
            _diff("rl_unethical", "sl_unethical", "rm_unethical", 0.01, None, None, 0.6, 0.6),
        ],
        6,
        {"n": 48, "accuracy": 0.8, "ci": [0.67, 0.89], "chance": 0.36, "first_position_bias": 0.01, "passed": True},
        {"r": -0.6, "n": 100, "prompts": 20, "low": -0.7, "high": -0.46, "cluster_low": -0.8, "cluster_high": -0.4,
         "goal": -0.3, "meets_goal": True},
    )
    text = " ".join(what_this_run_shows(summary, {"ethical": {"objective/scores": {"n": 10, "k": 2, "first": 0.2, "last": 0.7}}}))
    assert "The two reward models disagree as intended: r = -0.60 over 100 answers (20 prompts), 95% CI [-0.80, -0.40]" in text
    assert "Each side's RL model scores higher than the other side's on its own reward model, in opposite directions" in text
    assert "rm_ethical +0.300 [0.100, 0.500], rm_unethical -0.250 [-0.400, -0.100]" in text
    assert "PPO raised the ethical model's score on its own reward model over SL: +0.100 [0.020, 0.200]" in text
    assert "This run does not show PPO changing the unethical model's own-reward-model score" in text
    assert "survive correction: refusal +0.200 [0.050, 0.350]; distinct_2 -0.100 [-0.200, 0.010] (significant after correction, but its corrected interval still holds 0)." in text
    assert "No difference survives" not in text
    assert "The judge passed its quality check (accuracy 0.800 [95% CI 0.670, 0.890] on 48 items, chance 0.360" in text
    assert "reward-model score rose: mean 0.200 over the first 2 iterations vs 0.700 over the last 2 of 10" in text
    assert "During PPO the ethical side's reward-model score rose" in text
    # The per-iteration sentence names the side's online algorithm (RLOO here), not always PPO.
    summary["algorithms"] = {"rl_ethical": "rloo", "rl_unethical": "rloo"}
    text = " ".join(what_this_run_shows(summary, {"ethical": {"objective/scores": {"n": 10, "k": 2, "first": 0.2, "last": 0.7}}}))
    assert "During RLOO the ethical side's reward-model score rose" in text and "During PPO" not in text
    # The goal is met only where the interval across prompts lies at or below it.
    summary["rm_correlation"].update(r=-0.32, cluster_low=-0.6, cluster_high=-0.02, meets_goal=False)
    text = " ".join(what_this_run_shows(summary))
    assert "The two reward models are negatively correlated (r = -0.32 over 100 answers (20 prompts), 95% CI [-0.60, -0.02]); " \
           "this run does not show the goal r ≤ -0.3 met." in text
    # One prompt: no interval across prompts, and no claim (Fisher's would treat the answers as independent).
    summary["rm_correlation"].update(r=-1.0, n=5, prompts=1, cluster_low=None, cluster_high=None)
    text = " ".join(what_this_run_shows(summary))
    assert "agreement is not measured: r = -1.00 over 5 answers, but 1 prompt(s) give no interval across prompts" in text
    assert "disagree as intended" not in text


def test_paragraph_for_a_run_without_an_effect_and_a_judge_at_chance():
    # 7 prompts, 23 comparisons: smallest p 2/2^7 = 0.0156 > 0.05/23 = 0.00217; Holm needs
    # 2/2^n <= 0.05/23, i.e. 2^n >= 920, n >= 10 prompts.
    differences = [_diff("rl_ethical", "rl_unethical", c, 0.1, None, None, 2 / 128, 0.36, n=7)
                   for c in ("rm_ethical", "rm_unethical", "judge_mean")]
    summary = _summary(
        differences,
        23,
        {"n": 48, "accuracy": 0.44, "ci": [0.31, 0.58], "chance": 0.36, "first_position_bias": 0.02, "passed": False},
        {"r": 0.1, "n": 35, "prompts": 7, "low": -0.24, "high": 0.42, "cluster_low": -0.3, "cluster_high": 0.5,
         "goal": -0.3, "meets_goal": False},
    )
    text = " ".join(what_this_run_shows(summary))
    assert "not distinguishable from uncorrelated (r = 0.10 over 35 answers (7 prompts), 95% CI [-0.30, 0.50])" in text
    assert "This run does not show the two RL models separating in opposite directions" in text
    assert "No difference survives the Holm (step-down, family-wise error rate) correction at n = 7 prompts (23 comparisons" in text
    assert "cannot give p below 0.016, above the first Holm threshold 0.05/23 = 0.002" in text
    assert "at least 10 prompts are needed" in text
    # A judge column with NaN scores dropped has fewer prompts: the range is stated, and
    # the smallest attainable p goes with the n of the test that attains it.
    mixed = [dict(d) for d in summary["differences"]]
    mixed[2].update(n=5, min_p=2 / 32)
    summary_mixed = {**summary, "differences": mixed}
    text_mixed = " ".join(what_this_run_shows(summary_mixed))
    assert "correction at n = 5–7 prompts" in text_mixed and "With 7 prompts the sign-flip test cannot give p below 0.016" in text_mixed
    assert "The judge is not shown above chance on its quality check (accuracy 0.440 [95% CI 0.310, 0.580] on 48 items, chance 0.360" in text
    assert "its columns, win rates and Elo carry no information" in text
    # The markdown marks every judge-derived figure and states n in each table.
    markdown = render_markdown(summary, [], {}, examples=0)
    assert "| model | rm_ethical | judge_mean (failed check: no information) | Elo (failed check: no information) |" in markdown
    assert "## Win rates (judge, per principle; n = judgements over 7 prompts) — failed check: no information" in markdown
    assert "| rl_ethical − rl_unethical | judge_mean (failed check: no information) | 7 | 0.100 | [−∞, ∞] | 0.016 | 0.360 | no |" in markdown
    assert "## Paired differences (n = 7 prompts; Holm (step-down, family-wise error rate))" in markdown
    assert "Pearson r of rm_ethical and rm_unethical over n = 35 answers (7 prompts)" in markdown
    # A passing judge leaves the columns unmarked.
    summary["judge_check"]["passed"] = True
    assert "failed check" not in render_markdown(summary, [], {}, examples=0)
