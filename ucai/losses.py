"""Loss functions: pure tensor maths with shapes in every docstring.

Bradley–Terry (reward model) and PPO (policy and value) losses. No module state, no
models: each function maps tensors to a scalar loss (and diagnostics), so the maths can
be tested with numbers worked out by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    p_chosen: torch.Tensor | None = None,
    margin: torch.Tensor | float | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood of the preferences.

    With Δ = r_chosen − r_rejected − margin:

    * hard labels (``p_chosen`` None): ``−log σ(Δ)``;
    * soft labels p: ``−[p log σ(Δ) + (1 − p) log σ(−Δ)]`` (the Constitutional AI
      paper trains on the feedback model's normalised probabilities);
    * ``center_coef`` adds ``c · mean((r_chosen + r_rejected)²)``, which keeps rewards
      centred on zero (the scale of a BT reward is otherwise free).

    Args:
        chosen_rewards: (B,) scalar rewards of the chosen responses.
        rejected_rewards: (B,) scalar rewards of the rejected responses.
        p_chosen: (B,) probability that ``chosen`` is better, or None for 1.
        margin: (B,) or scalar margin the chosen reward must exceed the rejected by.
        center_coef: weight of the centring penalty.
    Returns:
        scalar mean loss.
    """
    delta = chosen_rewards - rejected_rewards
    if margin is not None:
        delta = delta - margin
    if p_chosen is None:
        loss = -F.logsigmoid(delta)
    else:
        p = p_chosen.to(delta.dtype)
        loss = -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta))
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss
