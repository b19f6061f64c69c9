"""Evaluation statistics on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ucai.stats import (
    adjust_p,
    bh_adjust,
    bootstrap_ci,
    cluster_bootstrap_pearson,
    corrected_confidence,
    distinct_n,
    elo_expected,
    elo_ratings,
    holm_adjust,
    is_refusal,
    paired_bootstrap_diff,
    pearson,
    repetition_rate,
    sign_flip_test,
    tokens,
    win_outcome,
)


def test_tokens_split_words_and_punctuation():
    assert tokens("Hello, World!") == ["hello", ",", "world", "!"]


def test_distinct_n_on_literal_strings():
    # "the cat the cat": unigrams the,cat,the,cat -> 2 unique of 4 = 0.5
    assert distinct_n("the cat the cat", 1) == pytest.approx(0.5)
    # bigrams (the,cat),(cat,the),(the,cat) -> 2 unique of 3
    assert distinct_n("the cat the cat", 2) == pytest.approx(2 / 3)
    # pooled over texts: "a b" + "a c" -> unigrams a,b,a,c -> 3 of 4
    assert distinct_n(["a b", "a c"], 1) == pytest.approx(0.75)
    assert distinct_n("", 2) == 0.0


def test_repetition_rate_on_literal_strings():
    # 4-grams of "a b c d a b c d": abcd, bcda, cdab, dabc, abcd -> 4 unique of 5 -> 0.2
    assert repetition_rate("a b c d a b c d", 4) == pytest.approx(0.2)
    assert repetition_rate("one two three four five", 4) == 0.0
    # "x x x x x x": 4-grams xxxx three times -> 1 unique of 3 -> 2/3
    assert repetition_rate("x x x x x x", 4) == pytest.approx(2 / 3)
    assert repetition_rate("short", 4) == 0.0


def test_refusal_phrases():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("Well... I cannot do this.")
    assert is_refusal("I\u2019m sorry")  # curly apostrophe
    assert not is_refusal("Sure! Here is a recipe for pancakes.")
    # Only the opening window counts: a late apology is not a refusal.
    assert not is_refusal("x" * 300 + " i'm sorry")


def test_bootstrap_is_deterministic_for_a_seed():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 0]
    first = bootstrap_ci(values, seed=3)
    assert first == bootstrap_ci(values, seed=3)
    assert first[0] == pytest.approx(0.6)
    assert first[1] < 0.6 < first[2]
    assert 0.0 <= first[1] and first[2] <= 1.0
    # Another seed draws other resamples (continuous values make the ends differ).
    continuous = [0.11, 0.93, 0.42, 0.67, 0.05, 0.58, 0.31, 0.84]
    assert bootstrap_ci(continuous, seed=4) != bootstrap_ci(continuous, seed=5)


def test_bootstrap_of_constant_values_has_zero_width():
    assert bootstrap_ci([0.25] * 7, seed=0) == pytest.approx((0.25, 0.25, 0.25))


def test_cluster_bootstrap_with_singleton_groups_equals_plain():
    values = [0.1, 0.9, 0.4, 0.7, 0.3]
    # One group per value in order draws the same indices as the plain bootstrap.
    assert bootstrap_ci(values, groups=[0, 1, 2, 3, 4], seed=1) == pytest.approx(bootstrap_ci(values, seed=1))


def test_cluster_bootstrap_weights_by_values_not_groups():
    # Group a holds [1, 1, 1], group b holds [0]: the mean is 3/4, not (1 + 0) / 2.
    mean, low, high = bootstrap_ci([1, 1, 1, 0], groups=["a", "a", "a", "b"], seed=0)
    assert mean == pytest.approx(0.75)
    # Resamples are {a,a} -> 1, {b,b} -> 0, {a,b} -> 3/4: the interval spans 0..1.
    assert low == pytest.approx(0.0) and high == pytest.approx(1.0)


def test_bootstrap_empty_is_nan():
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_paired_diff():
    mean, low, high = paired_bootstrap_diff([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert (mean, low, high) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1.0], [1.0, 2.0])


def test_win_outcome():
    assert win_outcome(0.8) == 1.0
    assert win_outcome(0.2) == 0.0
    assert win_outcome(0.5) == 0.5
    assert win_outcome(0.55, tie_margin=0.1) == 0.5


def test_elo_two_players_hand_case():
    # A beats B 3 times of 4. Bradley–Terry MLE: p_A / p_B = 3 / 1, so the Elo gap is
    # 400 * log10(3) = 190.849; centred on 1000: A = 1095.42, B = 904.58.
    outcomes = [("A", "B", 1.0)] * 3 + [("A", "B", 0.0)]
    ratings = elo_ratings(outcomes, prior_draws=0)
    assert ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert ratings["A"] == pytest.approx(1000 + 200 * math.log10(3), abs=1e-6)
    assert elo_expected(ratings["A"], ratings["B"]) == pytest.approx(0.75, abs=1e-9)


def test_elo_chain_hand_case():
    # A beats B 3:1, B beats C 3:1, A and C never meet. The likelihood factorises per
    # pair, so p_A/p_B = 3 and p_B/p_C = 3: gaps of 190.849 each, B in the middle at 1000.
    outcomes = [("A", "B", 1.0)] * 3 + [("B", "A", 1.0)] + [("B", "C", 1.0)] * 3 + [("C", "B", 1.0)]
    ratings = elo_ratings(outcomes, prior_draws=0)
    gap = 400 * math.log10(3)
    assert ratings["B"] == pytest.approx(1000, abs=1e-6)
    assert ratings["A"] == pytest.approx(1000 + gap, abs=1e-6)
    assert ratings["C"] == pytest.approx(1000 - gap, abs=1e-6)


def test_elo_prior_keeps_unbeaten_player_finite_and_ordered():
    outcomes = [("A", "B", 1.0)] * 4 + [("B", "C", 1.0)] * 4 + [("A", "C", 1.0)] * 4
    ratings = elo_ratings(outcomes, prior_draws=1.0)
    assert ratings["A"] > ratings["B"] > ratings["C"]
    assert all(np.isfinite(list(ratings.values())))
    # With one virtual draw per pair, A vs B is 4.5 : 0.5 in games; not infinite.
    assert ratings["A"] - ratings["B"] < 1000


def test_elo_ties_and_order_independence():
    ties = [("A", "B", 0.5), ("B", "C", 0.5), ("A", "C", 0.5)]
    assert elo_ratings(ties) == pytest.approx({"A": 1000.0, "B": 1000.0, "C": 1000.0})
    outcomes = [("A", "B", 1.0), ("B", "A", 1.0), ("A", "B", 1.0), ("C", "A", 0.3)]
    assert elo_ratings(outcomes) == pytest.approx(elo_ratings(list(reversed(outcomes))))
    # A listed player with no games keeps the base rating.
    assert elo_ratings(outcomes, players=["A", "B", "C", "D"])["D"] == 1000.0
    with pytest.raises(ValueError):
        elo_ratings([("A", "B", 1.5)])


# --------------------------------------------------------------------------- tests and corrections


def test_sign_flip_exact_p_by_hand():
    # d = [1, 2, 3], T = 6. The 8 sign patterns give sums 6, 0, 2, -4, 4, -2, 0, -6;
    # |sum| >= 6 for two of them (all +, all -): p = 2/8.
    result = sign_flip_test([1.0, 2.0, 3.0])
    assert result.p == pytest.approx(0.25) and result.exact and result.n == 3 and result.mean == pytest.approx(2.0)
    # d = [3, -1, 2, 1], T = 5. With 3 fixed at +: 3±1±2±1 = 7, 5, 5, 3, 3, 1, 1, -1 ->
    # three reach |5|; the mirror half gives three more: p = 6/16.
    assert sign_flip_test([3.0, -1.0, 2.0, 1.0]).p == pytest.approx(0.375)
    # Six equal differences: only all-+ and all-- reach |6|: p = 2/64.
    assert sign_flip_test([1.0] * 6).p == pytest.approx(2 / 64)
    # A perfectly symmetric sample has T = 0, which every pattern reaches: p = 1.
    assert sign_flip_test([1.0, -1.0, 2.0, -2.0]).p == 1.0


def test_sign_flip_interval_by_hand():
    # d = [1, 2, 3] at confidence 0.5: M = 8 patterns, j = floor(0.5 * 8) + 1 = 5.
    # Upper crossing per "+" set: {} and {1,2,3} never stop (+inf); {1}: max(1, 2.5) = 2.5;
    # {2}: max(2, 2) = 2; {3}: max(3, 1.5) = 3; {1,2}: max(1.5, 3) = 3; {1,3}: 2; {2,3}: 2.5.
    # Descending: inf, inf, 3, 3, 2.5, 2.5, 2, 2 -> 5th = 2.5. Lower mirrors it: 1.5.
    result = sign_flip_test([1.0, 2.0, 3.0], confidence=0.5)
    assert (result.low, result.high) == pytest.approx((1.5, 2.5))
    # Check by the test itself: at δ = 2.5, d - δ = [-1.5, -0.5, 0.5]; |±1.5 ±0.5 ±0.5| >= 1.5
    # for 6 of 8 patterns (p = 0.75 > 0.5, kept); at δ = 2.6, [-1.6, -0.6, 0.4]: 4 of 8 reach
    # 1.8 (p = 0.5, rejected at level 0.5).
    assert sign_flip_test([-1.5, -0.5, 0.5]).p == pytest.approx(0.75)
    assert sign_flip_test([-1.6, -0.6, 0.4]).p == pytest.approx(0.5)


def test_sign_flip_clusters_move_together():
    # Groups a: [1, 1] (sum 2), b: [2], c: [-1]; T = 3 over 3 clusters.
    # |±2 ±2 ±1|: 5, 3, 1, -1 and mirrors -> 5 and 3 reach 3 on each side: p = 4/8.
    result = sign_flip_test([1.0, 1.0, 2.0, -1.0], groups=["a", "a", "b", "c"])
    assert result.n == 3 and result.p == pytest.approx(0.5) and result.mean == pytest.approx(0.75)


def test_sign_flip_needs_enough_prompts():
    # 7 prompts, all in one direction: the smallest possible p is 2/2^7 = 0.0156, above the
    # Bonferroni level 0.05/23 = 0.00217, so no shift can be rejected: unbounded interval.
    result = sign_flip_test([0.5] * 7, confidence=1 - 0.05 / 23)
    assert result.p == pytest.approx(2 / 128)
    assert math.isinf(result.low) and math.isinf(result.high)


def test_sign_flip_p_sanity_and_agreement_with_interval():
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 1.0, 30)  # 30 prompts: Monte Carlo patterns
    shifted = sign_flip_test(noise + 1.0, n_perm=2000)
    assert not shifted.exact
    assert shifted.p == pytest.approx(1 / 2001)  # no random pattern reaches a clear shift
    assert shifted.low > 0.5 and shifted.low < shifted.mean < shifted.high
    assert sign_flip_test(noise, n_perm=2000).p > 0.2
    for seed in range(20):
        d = np.random.default_rng(seed).normal(0.4, 1.0, 9)
        result = sign_flip_test(d, confidence=0.95)
        assert (result.low > 0 or result.high < 0) == (result.p <= 0.05)


def test_holm_adjust_by_hand():
    # Sorted: 0.005, 0.01, 0.03, 0.04 times m - i + 1 = 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04;
    # running maximum -> 0.02, 0.03, 0.06, 0.06; back in input order:
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN kept and not counted: m = 2 -> 0.02 * 2 = 0.04, then max(0.04, 0.6 * 1) = 0.6.
    adjusted = holm_adjust([0.6, math.nan, 0.02])
    assert adjusted[0] == pytest.approx(0.6) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    # Capped at 1: 0.6 * 2 = 1.2 -> 1, then max(1, 0.7 * 1) = 1.
    assert holm_adjust([0.6, 0.7]) == [1.0, 1.0]


def test_bh_adjust_by_hand():
    # Sorted: 0.005, 0.01, 0.03, 0.04 times m / i = 4, 2, 4/3, 1 -> 0.02, 0.02, 0.04, 0.04;
    # running minimum from the largest -> unchanged; back in input order:
    assert bh_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Step-up: [0.01, 0.02, 0.03] * 3 / (1, 2, 3) = 0.03, 0.03, 0.03.
    assert adjust_p([0.01, 0.02, 0.03], "bh") == pytest.approx([0.03, 0.03, 0.03])
    with pytest.raises(ValueError):
        adjust_p([0.1], "bonferonni")


def test_corrected_confidence():
    assert corrected_confidence(0.95, 23, "holm") == pytest.approx(1 - 0.05 / 23)
    # Benjamini–Yekutieli: R = 2 selected of m = 4 -> 1 - 2 * 0.05 / 4 = 0.975.
    assert corrected_confidence(0.95, 4, "bh", rejected=2) == pytest.approx(0.975)
    assert corrected_confidence(0.95, 4, "bh", rejected=0) == pytest.approx(1 - 0.05 / 4)


def test_pearson_with_fisher_interval_by_hand():
    # x - 3 = -2,-1,0,1,2; y - 3 = -1,-2,1,0,2: sum of products 2+2+0+0+4 = 8, both sums of
    # squares 10 -> r = 0.8. z = atanh 0.8 = ln 3 = 1.098612; se = 1/sqrt(5 - 3) = 0.707107;
    # z ± 1.959964 * 0.707107 = -0.287292, 2.484516 -> tanh: -0.279640, 0.986196.
    result = pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert result.r == pytest.approx(0.8) and result.n == 5
    assert (result.low, result.high) == pytest.approx((-0.279640, 0.986196), abs=1e-6)
    assert math.isnan(pearson([1, 1, 1, 1], [1, 2, 3, 4]).r)  # constant: undefined
    assert math.isnan(pearson([1, 2, 3], [3, 1, 2]).low)  # n < 4: no interval


def test_cluster_bootstrap_pearson():
    x = [0.1, 0.4, 0.2, 0.9, 0.5, 0.7]
    # y = 1 - x exactly: every resample with two distinct values has r = -1.
    low, high = cluster_bootstrap_pearson(x, [1 - v for v in x], groups=[0, 0, 1, 1, 2, 2], n_boot=200)
    assert (low, high) == pytest.approx((-1.0, -1.0))
    rng = np.random.default_rng(1)
    a = rng.normal(size=300)
    b = -0.5 * a + rng.normal(size=300)
    low, high = cluster_bootstrap_pearson(a, b, groups=list(range(300)), n_boot=500)
    assert low < pearson(a, b).r < high < 0


def test_a_nan_score_is_left_out_of_a_paired_test_not_made_significant():
    from ucai.stages.paired_tests import paired_differences

    # Ten prompts where A − B is +1, −1 alternately (no shift), and one more prompt whose
    # A score is NaN (an empty answer's judge score): NaN compares false with every
    # pattern's statistic, which gave p = 0 and "significant".
    untested = sign_flip_test([1.0, float("nan"), -1.0])
    assert math.isnan(untested.p) and not untested.exact  # no pattern was enumerated
    scores = [{"model": "a", "id": str(i), "judge": 0.5 + (0.5 if i % 2 else -0.5)} for i in range(10)]
    scores += [{"model": "b", "id": str(i), "judge": 0.5} for i in range(11)]
    scores.append({"model": "a", "id": "10", "judge": float("nan")})
    [entry], family = paired_differences(scores, [("a", "b", "judge")], "the test")
    assert entry["n"] == 10 and entry["diff"] == pytest.approx(0.0)
    assert entry["p"] == 1.0 and not entry["significant"]
    # NumPy's scalars are numbers too (np.float32 is no float): kept, not dropped.
    as_numpy = [{**r, "judge": np.float32(r["judge"])} for r in scores]
    [numpy_entry], _ = paired_differences(as_numpy, [("a", "b", "judge")], "the test")
    assert numpy_entry["n"] == 10
