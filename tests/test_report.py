"""Report building from evaluation files and TensorBoard event files (no models)."""

from __future__ import annotations

import json
import math

import pytest

from ucai.data.io import write_jsonl
from ucai.report import latest_event_dir, read_scalars, win_matrix, write_report


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
