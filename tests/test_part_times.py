"""PartTimes: a stage's wall time by part and by the analysis that asked for it."""

import time

import pytest

from ucai.part_times import PartTimes, fmt_seconds, optional_analyses, part_name


def test_parts_add_up_by_name_and_by_analysis():
    times = PartTimes()
    for _ in range(2):
        with times.part("answers"):
            time.sleep(0.01)
    with times.part("kl_depth", "depth"):
        time.sleep(0.02)
    assert times.seconds["answers"] >= 0.02 and times.seconds["kl_depth"] >= 0.02
    totals = times.by_analysis()
    assert list(totals) == ["core", "depth"]
    assert totals["core"] == pytest.approx(times.seconds["answers"])
    line = times.describe()
    assert line.startswith("answers ") and line.endswith(f"added by optional analyses: depth {fmt_seconds(totals['depth'])}")
    assert times.to_json()["analysis"] == {"answers": "core", "kl_depth": "depth"}


def test_a_part_that_raises_still_counts_and_keeps_its_analysis():
    times = PartTimes()
    with pytest.raises(RuntimeError), times.part("judge"):
        raise RuntimeError("judge crashed")
    assert "judge" in times.seconds
    with pytest.raises(ValueError, match="belongs to analysis 'core'"), times.part("judge", "depth"):
        pass


def test_fmt_seconds_switches_to_minutes_at_two():
    assert fmt_seconds(119.94) == "119.9 s" and fmt_seconds(120) == "2.0 min" and fmt_seconds(654) == "10.9 min"


def test_part_names_and_the_optional_analyses_line():
    assert part_name("kl", "core") == "kl" and part_name("kl", "depth") == "kl_depth"
    assert optional_analyses({"core": 400.0, "depth": 180.0, "train_prompts": 74.0}) == "depth 3.0 min, train_prompts 74.0 s"
    assert optional_analyses({"core": 1.0}) == ""
