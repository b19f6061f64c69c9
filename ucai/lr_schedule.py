"""The learning-rate schedule of every training stage: linear warm-up, then constant,
linear or cosine decay, stepped once per optimiser step.

    scheduler = warmup_then_decay(optimizer, warmup_steps=10, total_steps=1000, schedule="cosine")
    return {"optimizer": optimizer, "lr_scheduler": per_step(scheduler)}

Two warm-up ramps exist, because runs already made with each must not change:

* ``before_peak`` (SFT, PPO): ``(step + 1) / (warmup_steps + 1)``; the last warm-up
  step is still below the peak, which the first step after warm-up reaches;
* ``to_peak`` (the reward stage): ``(step + 1) / warmup_steps``; the last warm-up step
  runs at the peak.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["constant", "linear", "cosine"]
WarmupRamp = Literal["before_peak", "to_peak"]


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule = "constant",
    min_lr_ratio: float = 0.0,
    warmup: WarmupRamp = "before_peak",
) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Args:
        step: optimiser steps taken so far.
        warmup_steps: steps of linear warm-up (0: none).
        total_steps: steps of the whole run; the decay ends here.
        schedule: after warm-up, ``constant`` at the peak, or ``linear`` or ``cosine``
            decay from the peak to ``min_lr_ratio`` at ``total_steps`` (held there after).
        min_lr_ratio: the final learning rate as a share of the peak.
        warmup: the ramp's formula (see the module docstring).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1 if warmup == "before_peak" else warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def warmup_then_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule = "constant",
    min_lr_ratio: float = 0.0,
    warmup: WarmupRamp = "before_peak",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that sets each parameter group's rate to its own initial rate times
    `lr_factor` (same arguments)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, min_lr_ratio, warmup)
    )


def per_step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict:
    """Lightning's scheduler config for a scheduler stepped after every optimiser step."""
    return {"scheduler": scheduler, "interval": "step"}
