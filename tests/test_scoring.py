"""Order debiasing of multiple-choice scores, with numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ucai.scoring import average_over_orders, cyclic_orders


def _two_option_orders(first_slot_bonus: float, true_log_odds: float) -> list[torch.Tensor]:
    """Per-position probabilities of a judge with option 0 truly preferred by
    ``true_log_odds`` and a bonus for whatever sits in the first slot."""
    shown_first = torch.softmax(torch.tensor([[true_log_odds + first_slot_bonus, 0.0]]), dim=-1)  # option 0 at A
    shown_second = torch.softmax(torch.tensor([[first_slot_bonus, true_log_odds]]), dim=-1)  # option 1 at A
    return [shown_first, shown_second]


def test_log_space_averaging_recovers_the_true_preference_under_a_slot_bias():
    # Bonus b = 3, true log-odds 2: order [0, 1] gives p0 = σ(5) = 0.993307, order [1, 0]
    # gives p0 = σ(2 − 3) = σ(−1) = 0.268941. Their arithmetic mean is 0.631124 (squashed);
    # the mean log-odds is (5 + (−1)) / 2 = 2, so the normalised geometric mean is σ(2) = 0.880797.
    averaged = average_over_orders(_two_option_orders(3.0, 2.0), cyclic_orders(2))
    assert averaged[0, 0].item() == pytest.approx(0.880797, abs=1e-6)
    assert averaged[0].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_a_pure_slot_bias_averages_to_indifference_and_no_bias_is_left_alone():
    assert average_over_orders(_two_option_orders(3.0, 0.0), cyclic_orders(2))[0].tolist() == pytest.approx([0.5, 0.5])
    unbiased = average_over_orders(_two_option_orders(0.0, math.log(3)), cyclic_orders(2))
    assert unbiased[0].tolist() == pytest.approx([0.75, 0.25], abs=1e-6)


def test_three_options_each_in_each_slot():
    # Slot logits +2, 0, 0 by position; option logits 1, 0, 0. In every cyclic order each
    # option meets each slot bonus once, so the mean logit is option + 2/3 for all three:
    # softmax([1, 0, 0]) = e / (e + 2) = 0.576117 for option 0.
    orders = cyclic_orders(3)
    slot, option = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    per_order = [torch.softmax(slot + option[order], dim=-1).unsqueeze(0) for order in orders]
    averaged = average_over_orders(per_order, orders)
    assert averaged[0].tolist() == pytest.approx([math.e / (math.e + 2), 1 / (math.e + 2), 1 / (math.e + 2)], abs=1e-6)


def test_an_underflowed_probability_does_not_poison_the_average():
    per_order = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    averaged = average_over_orders(per_order, cyclic_orders(2))
    assert torch.isfinite(averaged).all() and averaged[0, 0].item() == pytest.approx(1.0, abs=1e-6)
