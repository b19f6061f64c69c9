"""PPO losses (ucai.losses) against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from ucai.losses import entropy_bonus, ppo_policy_loss, ppo_value_loss


def test_clipped_policy_loss_inside_and_outside_the_clip_range():
    eps = 0.2
    # Four real tokens and one padded one (huge numbers that must not count).
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 5.0]])
    advantages = torch.tensor([[2.0, 1.0, -1.0, 1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old = torch.zeros(1, 5)
    new = torch.log(ratios)
    loss, clipfrac, approxkl = ppo_policy_loss(new, old, advantages, mask, eps)
    # per token max(−A·ρ, −A·clip(ρ, 0.8, 1.2)):
    #   ρ=1.1, A=2  (inside):             max(−2.2, −2.2) = −2.2   not clipped
    #   ρ=1.5, A=1  (above, A>0):         max(−1.5, −1.2) = −1.2   clipped
    #   ρ=0.5, A=−1 (below, A<0):         max(0.5, 0.8)   = 0.8    clipped
    #   ρ=0.5, A=1  (below, A>0):         max(−0.5, −0.8) = −0.5   not clipped (pessimistic bound)
    # mean = (−2.2 − 1.2 + 0.8 − 0.5) / 4 = −0.775; clipfrac = 2/4.
    assert loss.item() == pytest.approx(-0.775, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    # approxkl = ½·mean(log ρ²) = ½·(0.0090844 + 0.1644019 + 2·0.4804530)/4 = 0.1417990
    assert approxkl.item() == pytest.approx(0.1417990, abs=1e-6)


def test_policy_loss_ignores_an_overflowing_log_ratio_on_padding():
    # A padded position whose two log-probs differ by 200 nats (exp overflows to inf,
    # and inf x 0 would be NaN): the loss, its gradient and approxkl are those of the
    # real tokens alone.
    mask = torch.tensor([[1, 1, 0]])
    old = torch.tensor([[0.0, 0.0, -200.0]])
    new = torch.tensor([[math.log(1.1), 0.0, 0.0]], requires_grad=True)
    advantages = torch.tensor([[2.0, -1.0, 5.0]])
    loss, _, approxkl = ppo_policy_loss(new, old, advantages, mask, 0.2)
    loss.backward()
    # max(−2·1.1, −2·1.1) = −2.2 and max(1·1, 1·1) = 1: mean −0.6
    assert loss.item() == pytest.approx(-0.6, abs=1e-6)
    assert torch.isfinite(new.grad).all() and new.grad[0, 2] == 0
    assert approxkl.item() == pytest.approx(0.5 * math.log(1.1) ** 2 / 2, abs=1e-7)


def test_policy_loss_gradient_vanishes_when_clipped():
    # ρ = 1.5 with A > 0 is clipped: the loss is flat in logp, so no gradient.
    new = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, _, _ = ppo_policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.item() == 0.0
    # ρ = 1 (first pass): d(−A·e^{logp − old})/dlogp = −A·1 = −1.
    new = torch.zeros(1, 1, requires_grad=True)
    loss, clipfrac, approxkl = ppo_policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.item() == pytest.approx(-1.0)
    assert clipfrac.item() == 0.0 and approxkl.item() == 0.0


def test_clipped_value_loss_by_hand():
    c = 0.2
    values = torch.tensor([[1.1, 1.5, 0.5, 0.5, 9.0]])
    old = torch.ones(1, 5)
    returns = torch.tensor([[2.0, 2.0, 0.0, 2.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, c)
    # V_clip = 1 + clip(V − 1, −0.2, 0.2); per token max((V−R)², (V_clip−R)²):
    #   V=1.1, R=2: V_clip 1.1 → max(0.81, 0.81) = 0.81   not clipped
    #   V=1.5, R=2: V_clip 1.2 → max(0.25, 0.64) = 0.64   clipped
    #   V=0.5, R=0: V_clip 0.8 → max(0.25, 0.64) = 0.64   clipped
    #   V=0.5, R=2: V_clip 0.8 → max(2.25, 1.44) = 2.25   not clipped
    # loss = ½ · (0.81 + 0.64 + 0.64 + 2.25)/4 = ½ · 1.085 = 0.5425; clipfrac 2/4.
    assert loss.item() == pytest.approx(0.5425, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_entropy_bonus_is_masked_mean():
    entropy = torch.tensor([[1.0, 3.0, 50.0]])
    # (1 + 3) / 2 = 2; the padded 50 is ignored.
    assert entropy_bonus(entropy, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)
