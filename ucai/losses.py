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

    With Δ = r_chosen − r_rejected and margin m (0 when None):

    * hard labels (``p_chosen`` None, i.e. p = 1): ``−log σ(Δ − m)``;
    * soft labels p: ``−[p log σ(Δ − m) + (1 − p) log σ(−Δ − m)]`` (the Constitutional
      AI paper trains on the feedback model's normalised probabilities). The margin is
      symmetric: each side's term asks that side to win by m, so the two terms pull in
      opposite directions with equal force at Δ = 0 when p = 1/2 — a pair the judge
      rated 50/50 has its optimum at Δ = 0, not at Δ = m as it would if the margin were
      subtracted from Δ once for both terms. p = 1 is the hard-label loss above; m = 0
      is the plain soft-label loss;
    * ``center_coef`` adds ``c · mean((r_chosen + r_rejected)²)``, which keeps rewards
      centred on zero (the scale of a BT reward is otherwise free).

    Args:
        chosen_rewards: (B,) scalar rewards of the chosen responses.
        rejected_rewards: (B,) scalar rewards of the rejected responses.
        p_chosen: (B,) probability that ``chosen`` is better, or None for 1.
        margin: (B,) or scalar margin m >= 0 by which the preferred reward should win.
        center_coef: weight of the centring penalty.
    Returns:
        scalar mean loss.
    """
    delta = chosen_rewards - rejected_rewards  # (B,)
    m = 0.0 if margin is None else margin
    chosen_wins = -F.logsigmoid(delta - m)  # (B,) −log P(chosen beats rejected by m)
    if p_chosen is None:
        loss = chosen_wins
    else:
        p = p_chosen.to(delta.dtype)
        rejected_wins = -F.logsigmoid(-delta - m)  # (B,) −log P(rejected beats chosen by m)
        loss = p * chosen_wins + (1 - p) * rejected_wins
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


# --------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective, as a loss to minimise (Schulman et al. 2017).

    With ratio ρ = exp(logp − logp_old) per token:
    ``loss = mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))`` over the real tokens. Taking the
    max of the two losses (the min of the two objectives) removes any incentive to move
    ρ outside [1 − ε, 1 + ε] in the direction the advantage favours.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy.
        old_logprobs: (B, T) the same under the policy that generated them.
        advantages: (B, T) advantage estimates (usually whitened).
        mask: (B, T) 0/1 real response tokens.
        cliprange: ε.
    Returns:
        loss (scalar), clipfrac (scalar: share of tokens where the clipped term was
        used) and approxkl (scalar: ``0.5 · mean((logp − logp_old)²)``, a KL estimate
        between the old and the current policy).
    """
    from ucai.rl import masked_mean

    # Zero on padding before the exponent: log-probs there are not defined by the
    # policy (a packed and an unpacked forward read padding differently), and an
    # overflowing exp times a zero mask would be NaN.
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac.detach(), approxkl.detach()


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 · mean(max((V − R)², (V_clip − R)²))`` over real tokens,
    with ``V_clip = V_old + clip(V − V_old, −c, c)``.

    The value function may move at most ``c`` away from its rollout-time prediction per
    update before the loss stops rewarding further movement, as in the original PPO2
    code that every RLHF implementation inherits.

    Args:
        values: (B, T) current value predictions.
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) targets (advantages + old values).
        mask: (B, T) 0/1 real response tokens.
        cliprange_value: c.
    Returns:
        loss (scalar) and clipfrac (scalar: share of tokens where the clipped error was
        the larger one).
    """
    from ucai.rl import masked_mean

    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > error).to(values.dtype), mask)
    return loss, clipfrac.detach()


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over real tokens (scalar); subtract ``coef ×`` it from the
    loss to keep the policy from collapsing onto a few tokens.

    Args:
        entropy: (B, T) entropy of the policy at each response position.
        mask: (B, T) 0/1 real response tokens.
    """
    from ucai.rl import masked_mean

    return masked_mean(entropy, mask)


# --------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    p_chosen: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss (Rafailov et al. 2023), with soft labels as conservative DPO.

    The implicit reward of a reply is ``r = β · (log π(y|x) − log π_ref(y|x))``; with
    ``h = r_chosen − r_rejected``:

    * hard labels (``p_chosen`` None, i.e. p = 1): ``−log σ(h)``, TRL's ``sigmoid`` loss;
    * soft labels p: ``−p · log σ(h) − (1 − p) · log σ(−h)``, the Bradley–Terry
      likelihood of a label that is right with probability p. With p = 1 − ε for every
      pair this is conservative DPO, TRL's ``label_smoothing`` ε (of its ``sigmoid``
      loss before 1.0; ``aot`` and ``robust`` keep that term in 1.12). At p = 1/2 the
      optimum is h = 0: the policy keeps the reference's preference between the two.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen replies' tokens under
            the policy.
        policy_rejected_logps: (B,) the same for the rejected replies.
        reference_chosen_logps: (B,) the chosen replies under the frozen reference.
        reference_rejected_logps: (B,) the rejected replies under the reference.
        beta: β, the strength of the implicit KL leash to the reference.
        p_chosen: (B,) probability that ``chosen`` is the better reply, or None for 1.
    Returns:
        scalar mean loss, and the (B,) implicit rewards of the chosen and rejected
        replies (detached: they are diagnostics, TRL's ``rewards/*``).
    """
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # (B,)
    margin = chosen_rewards - rejected_rewards  # (B,) h
    chosen_wins = -F.logsigmoid(margin)  # (B,) −log P(chosen is better)
    if p_chosen is None:
        loss = chosen_wins
    else:
        p = p_chosen.to(margin.dtype)
        loss = p * chosen_wins + (1 - p) * -F.logsigmoid(-margin)
    return loss.mean(), chosen_rewards.detach(), rejected_rewards.detach()
