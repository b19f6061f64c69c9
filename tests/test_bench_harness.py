"""The benchmark harness: the alternating order and the 5% work check that every
benchmark in benchmarks/ relies on for a like-for-like ratio."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import alternating, check_same_work, run_alternating, run_worker  # noqa: E402


def test_alternating_reverses_the_order_every_other_repeat():
    assert list(alternating(["a", "b", "c"], 3)) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c"),
    ]


def test_run_alternating_collects_every_run_per_configuration():
    calls = []
    trials = run_alternating(["x", "y"], 2, lambda name, repeat: calls.append(name) or {"repeat": repeat})
    assert calls == ["x", "y", "y", "x"]
    assert trials == {"x": [{"repeat": 0}, {"repeat": 1}], "y": [{"repeat": 0}, {"repeat": 1}]}


def test_work_within_five_percent_passes_and_beyond_stops():
    check_same_work({"ucai": 1000, "peer": 1049, "peer again": 951}, "tokens")
    with pytest.raises(SystemExit, match=r"work differs: peer did 1051 tokens, ucai 1000 \(5.1% > 5%\)"):
        check_same_work({"ucai": 1000, "peer": 1051}, "tokens")


def test_token_rates_and_ratios_against_the_best_peer():
    from harness import ratios_against_best, token_rates

    runs = {
        "ours": [{"completion_tokens": 100, "seconds": 1.0, "peak_rss_mb": 900}, {"completion_tokens": 100, "seconds": 2.0, "peak_rss_mb": 1100}],
        "peer-a": [{"completion_tokens": 100, "seconds": 4.0, "peak_rss_mb": 1000}] * 2,
        "peer-b": [{"completion_tokens": 100, "seconds": 2.0, "peak_rss_mb": 2000}] * 2,
    }
    summary = token_rates(runs)
    assert summary["ours"]["rates"] == [100.0, 50.0]
    assert summary["ours"]["tokens_per_s"] == 75.0 and summary["ours"]["seconds"] == 1.5
    assert summary["ours"]["peak_rss_mb"] == 1000
    # peer-b is the faster (50 tokens/s vs 25): 75 / 50 = 1.5 times the speed, 1000 / 2000 the memory.
    assert ratios_against_best(summary, "ours", ("peer-a", "peer-b")) == ("peer-b", 1.5, 0.5)


def test_run_worker_returns_the_last_json_line_or_stops_with_the_workers_error(tmp_path):
    script = tmp_path / "side.py"
    script.write_text(
        "import json, sys\n"
        "side, option = sys.argv[2], sys.argv[3]\n"
        "if side == 'bad':\n"
        "    sys.exit('worker broke: ' + option)\n"
        "print('a log line first')\n"
        "print(json.dumps({'side': side, 'option': option}))\n"
    )
    assert run_worker(str(script), "good", ["x"]) == {"side": "good", "option": "x"}
    with pytest.raises(SystemExit, match="bad side failed:\n.*worker broke: y"):
        run_worker(str(script), "bad", ["y"])


def test_calls_line_names_the_rates_memory_and_work():
    from harness import calls_line, token_rates

    runs = {"ucai": [{"completion_tokens": 100, "seconds": 2.0, "peak_rss_mb": 1000.0, "rows": 8, "calls": 4}]}
    line = calls_line("ucai", token_rates(runs), runs["ucai"][0], width=6)
    assert line == (
        "ucai      50.0 tokens/s,    2.0 s (runs: 50.0 tokens/s) peak RSS   1000 MB; "
        "8 rows in 4 generate calls, 100 completion tokens"
    )


def test_time_calls_warms_up_once_then_times_every_call():
    from harness import time_calls

    made = []

    def run_call(rendered, keys):
        made.append(len(rendered))
        return 3 * len(rendered)

    calls = [(["a", "b"], ["1", "2"]), (["c"], ["3"])]
    result = time_calls(calls, run_call)
    assert made == [2, 2, 1]  # the warm-up is the first call again, not counted
    assert result["completion_tokens"] == 9 and result["rows"] == 3 and result["calls"] == 2
    assert result["seconds"] >= 0 and result["peak_rss_mb"] > 0
