"""Evaluation statistics on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ucai.stats import (
    bootstrap_ci,
    distinct_n,
    elo_expected,
    elo_ratings,
    is_refusal,
    paired_bootstrap_diff,
    repetition_rate,
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
