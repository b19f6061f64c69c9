"""The learning-rate schedule of every stage (ucai.lr_schedule) against numbers worked
out by hand: both warm-up ramps, the three shapes after them, and the scheduler built
from them."""

from __future__ import annotations

import pytest
import torch

from ucai.lr_schedule import lr_factor, warmup_then_decay


def test_warmup_before_peak_then_cosine_by_hand():
    # Warm-up 3 steps (SFT, PPO): (step + 1) / 4 -> 0.25, 0.5, 0.75, then the peak at step 3.
    assert [lr_factor(s, 3, 13, "cosine") for s in range(3)] == [0.25, 0.5, 0.75]
    assert lr_factor(3, 3, 13, "cosine") == 1.0
    # Cosine over 10 decay steps: halfway (step 8) -> 0.5 * (1 + cos(pi / 2)) = 0.5;
    # with min_lr_ratio 0.1 -> 0.1 + 0.9 * 0.5 = 0.55; the end (step 13) -> 0.1, and after it too.
    assert lr_factor(8, 3, 13, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 3, 13, "cosine", min_lr_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(13, 3, 13, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(20, 3, 13, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_linear_and_constant_by_hand():
    # Linear: step 5 is 2 of the 10 decay steps in -> 1 - 2/10 = 0.8; the end -> 0.
    assert lr_factor(5, 3, 13, "linear") == pytest.approx(0.8)
    assert lr_factor(13, 3, 13, "linear") == 0.0
    # No warm-up, linear over 4 steps: 1, 0.75, 0.5, 0.25.
    assert [lr_factor(s, 0, 4, "linear") for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(100, 0, 10, "constant") == 1.0
    # A run no longer than its warm-up decays over one step, not by zero.
    assert lr_factor(3, 3, 3, "linear") == 1.0


def test_warmup_to_peak_by_hand():
    # The reward stage's ramp, warm-up 4: (step + 1) / 4 -> 0.25, 0.5, 0.75, 1 (the last
    # warm-up step is at the peak), then constant.
    assert [lr_factor(s, 4, 4, "constant", warmup="to_peak") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_scheduler_scales_every_group_by_the_factor():
    weight = torch.nn.Parameter(torch.zeros(1))
    head = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 0.1}, {"params": [head], "lr": 1.0}])
    scheduler = warmup_then_decay(optimizer, warmup_steps=1, total_steps=3, schedule="linear")
    rates = []
    for _ in range(4):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    # Factors: step 0 warm-up 1/2; steps 1, 2, 3: 1 - 0/2, 1 - 1/2, 1 - 2/2 = 1, 0.5, 0.
    assert rates == [[0.05, 0.5], [0.1, 1.0], [0.05, 0.5], [0.0, 0.0]]
