"""Reward–KL frontier maths (ucai.frontier) on hand-worked numbers."""

from __future__ import annotations

import pytest

from ucai.frontier import (
    best_setting,
    gain_at_kl,
    median_over_runs,
    moving_average,
    reached_count,
    score_at_first_crossing,
)


def test_moving_average_is_centred_and_truncated_at_the_ends():
    # window 3: [mean(0, 3), mean(0, 3, 6), mean(3, 6, 9), mean(6, 9)]
    assert moving_average([0.0, 3.0, 6.0, 9.0], 3) == pytest.approx([1.5, 3.0, 6.0, 7.5])
    assert moving_average([1.0, 5.0], 1) == [1.0, 5.0]


def test_moving_average_refuses_an_even_window():
    with pytest.raises(ValueError):
        moving_average([1.0, 2.0], 2)


def test_interpolates_between_the_points_around_the_level():
    # KL 1 lies a quarter of the way from (0.5, 1.0) to (2.5, 3.0): score 1.5.
    assert score_at_first_crossing([0.0, 0.5, 2.5], [0.0, 1.0, 3.0], 1.0) == pytest.approx(1.5)
    # A level hit exactly takes that point's score.
    assert score_at_first_crossing([0.0, 0.5, 2.5], [0.0, 1.0, 3.0], 2.5) == pytest.approx(3.0)


def test_a_level_beyond_the_range_gives_none():
    assert score_at_first_crossing([0.0, 0.5, 2.5], [0.0, 1.0, 3.0], 3.0) is None
    assert score_at_first_crossing([], [], 1.0) is None


def test_a_path_that_starts_above_the_level_takes_its_first_score():
    assert score_at_first_crossing([1.2, 2.0], [4.0, 5.0], 1.0) == 4.0


def test_non_monotone_kl_takes_the_first_crossing():
    kls, scores = [0.0, 1.5, 0.5, 2.5], [0.0, 3.0, 1.0, 5.0]
    # KL 1: first reached on the segment (0, 0) -> (1.5, 3): two thirds along, score 2;
    # the later pass through KL 1 on the way back down (score 2.0 too here) is ignored.
    assert score_at_first_crossing(kls, scores, 1.0) == pytest.approx(2.0)
    # KL 2: the dip back to 0.5 does not count; first reached on (0.5, 1) -> (2.5, 5),
    # three quarters along: 1 + 0.75 * 4 = 4.
    assert score_at_first_crossing(kls, scores, 2.0) == pytest.approx(4.0)


def test_gain_at_kl_smooths_both_curves_and_subtracts_the_starting_score():
    kls = [0.0, 0.0, 3.0, 3.0]
    scores = [1.0, 3.0, 2.0, 6.0]
    # window 3: smoothed KL [0, 1, 2, 3], smoothed score [2, 2, 11/3, 4];
    # starting score mean(1, 3) = 2 (baseline window 2).
    gains = gain_at_kl(kls, scores, levels=[1.5, 3.0, 4.0], window=3, baseline_window=2)
    # KL 1.5: half way from (1, 2) to (2, 11/3): 17/6, minus 2 = 5/6.
    assert gains[1.5] == pytest.approx(5 / 6)
    assert gains[3.0] == pytest.approx(2.0)
    assert gains[4.0] is None


def test_gain_at_kl_on_the_raw_curve_with_window_one():
    gains = gain_at_kl([0.0, 2.0], [1.0, 3.0], levels=[1.0], window=1, baseline_window=1)
    assert gains[1.0] == pytest.approx(1.0)  # 2 at KL 1, start 1


def test_median_over_runs_needs_more_than_half_of_the_runs():
    assert median_over_runs([0.3, 0.1, 0.2]) == pytest.approx(0.2)
    assert median_over_runs([0.3, None, 0.1]) == pytest.approx(0.2)  # 2 of 3: median of (0.1, 0.3)
    assert median_over_runs([0.3, None, None]) is None  # 1 of 3: the fastest seed alone
    assert median_over_runs([0.3, None]) is None  # half is not more than half
    assert median_over_runs([]) is None
    assert reached_count([0.3, None, 0.1]) == 2


def test_best_setting_skips_settings_without_a_value():
    assert best_setting({2e-4: 0.4, 4e-4: 0.7, 8e-4: None}) == (4e-4, 0.7)
    assert best_setting({2e-4: None}) == (None, None)
