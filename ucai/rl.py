"""Reinforcement-learning maths for the online RL stage (PPO with GAE, or RLOO): pure
functions over tensors, plus the KL controller.

Everything here maps tensors to tensors (no models, no trainer), so each formula can be
tested with numbers worked out by hand. Conventions, shared by every function:

* B is the rollout batch, T the response length (generated tokens, right-padded after
  the first eos), V the vocabulary.
* ``mask`` is (B, T) with 1 on real response tokens (up to and including eos) and 0 on
  padding. Masked statistics ignore the zeros, so padding never shifts a mean.
* Per-token quantities sit at the position of the token they are about: the log-prob
  of response token t, the value of the state *before* token t, the reward for
  emitting token t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ucai.padding import last_real_index

KLEstimator = Literal["k1", "k3"]


# --------------------------------------------------------------------------- masked statistics


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1 (over ``dim``, or everything)."""
    product = values * mask
    return product.sum() if dim is None else product.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1.

    Args:
        values: (..., T) any float tensor.
        mask: broadcastable to ``values``; 0/1 (bool or numeric).
        dim: reduce over this dim only (None: over everything).
    Returns:
        a scalar, or ``values`` reduced over ``dim``. An all-zero mask gives 0, not NaN:
        an empty minibatch contributes nothing rather than poisoning the loss.
    """
    mask = mask.to(values.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the positions where ``mask`` is 1 (scalar).

    ``unbiased`` applies Bessel's correction n / (n - 1), as TRL and the original
    lm-human-preferences code do; with a single real token it falls back to the
    biased estimate instead of dividing by zero.
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count > 1:
            variance = variance * count / (count - 1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Scale ``values`` to unit variance over the real positions, at zero mean; with
    ``shift_mean`` False the mean is added back, ``(v − μ)/σ + μ``, as TRL whitens
    rewards: the spread becomes 1 while the rewards keep their mean (and so, on
    average, their sign).

    Args:
        values: (B, T).
        mask: (B, T) 0/1.
    Returns:
        (B, T) whitened values; padded positions are returned as 0.
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    variance = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --------------------------------------------------------------------------- log-probs and KL


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the softmax of its logits.

    Computed as ``logit[label] - logsumexp(logits)`` in float32. Half-precision logits
    are upcast one row at a time, so a (B, T, V) float32 copy never exists at once.

    Args:
        logits: (B, T, V) scores for the token at each position.
        labels: (B, T) long token ids.
    Returns:
        (B, T) float32 log-probs.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
        return (picked - torch.logsumexp(logits, dim=-1)).float()
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = row_logits.float()
        picked = torch.gather(row_logits, -1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position: ``logsumexp(z) - sum softmax(z) * z``.

    Args:
        logits: (B, T, V).
    Returns:
        (B, T) float32 entropies in nats.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probs.

    With log r = log p_ref(x) - log p_policy(x) for x sampled from the policy
    (Schulman, "Approximating KL divergence", 2020):

    * ``k1`` = -log r: unbiased, can be negative on single tokens;
    * ``k3`` = (r - 1) - log r: unbiased, always >= 0, lower variance.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs of the same tokens.
    Returns:
        (B, T) KL estimate per token (padding is not masked here).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


# --------------------------------------------------------------------------- rewards


def penalise_missing_eos(scores: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response that never produced eos.

    A truncated response is not the answer the reward model was trained to judge; the
    penalty stops the policy from learning to ramble until the length limit.

    Args:
        scores: (B,) reward-model scores.
        finished: (B,) bool, whether each response reached eos.
    Returns:
        (B,) adjusted scores (a new tensor).
    """
    return scores - penalty * (~finished.bool()).to(scores.dtype)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * KL_t`` on every real token, plus the sequence score
    on the last real token (the only place the reward model says anything).

    Args:
        scores: (B,) sequence scores (after any normalisation, clipping and penalty).
        kl: (B, T) per-token KL estimates.
        mask: (B, T) 0/1 real response tokens.
        kl_coef: weight of the KL penalty.
    Returns:
        (B, T) float32 rewards, 0 on padding.
    """
    mask = mask.to(torch.float32)
    rewards = -kl_coef * kl.float() * mask
    last = last_real_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.float()
    return rewards


# --------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with
    V and A taken as 0 past the last real token (the episode ends at eos or at the
    length limit). Returns are A_t + V_t, the value-function targets.

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value of the state before each token.
        mask: (B, T) 0/1 real response tokens (real tokens first, then padding).
        gamma: discount.
        lam: GAE lambda (bias-variance trade-off).
    Returns:
        advantages (B, T) and returns (B, T), float32, 0 on padding.
    """
    mask = mask.to(torch.float32)
    rewards = rewards.float() * mask
    values = values.float() * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Multiplying by the mask restarts the recursion at the end of each response.
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    returns = (advantages + values) * mask
    return advantages, returns


def sequence_rewards(final_scores: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Reward of each whole episode: ``R_i = score_i - kl_coef * sum_t KL_it``.

    It is the sum of the episode's `per_token_rewards`, written as one number because
    RLOO credits the whole response at once.

    Args:
        final_scores: (N,) scores after clipping and the missing-eos penalty.
        kl: (N, T) per-token KL estimates, already 0 on padding.
        kl_coef: weight of the KL penalty.
    Returns:
        (N,) float32 sequence rewards.
    """
    return final_scores.float() - kl_coef * kl.float().sum(1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    The N = G * k episodes are G groups of k samples of one prompt, each group's
    samples consecutive. Each sample's baseline is the mean reward of the other k - 1
    samples of its prompt, ``b_i = (sum_j R_j - R_i) / (k - 1)``: it does not depend on
    the sample itself, so the estimate stays unbiased, and it needs no critic.

    Args:
        rewards: (N,) sequence rewards, grouped by prompt (`sequence_rewards`).
        k: samples per prompt, at least 2.
    Returns:
        (N,) float32 advantages ``R_i - b_i``; each group's advantages sum to 0.
    """
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt for its baseline, got k={k}")
    if rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} episodes do not split into groups of k={k}")
    grouped = rewards.float().view(-1, k)  # (G, k)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)  # (G, k)
    return (grouped - baselines).reshape(-1)


def normalise_advantages(advantages: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(A - mean) / (std + eps)`` over the episodes, with the unbiased std: TRL's
    ``normalize_advantages`` of its RLOO trainer, eps included.

    Args:
        advantages: (N,) one advantage per episode, N >= 2.
    Returns:
        (N,) float32.
    """
    advantages = advantages.float()
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def per_token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The episode's advantage on every one of its real response tokens.

    Args:
        advantages: (N,) one advantage per episode.
        mask: (N, T) 0/1 real response tokens.
    Returns:
        (N, T) float32, 0 on padding.
    """
    return advantages.float().unsqueeze(1) * mask.float()


# --------------------------------------------------------------------------- one rollout batch


@dataclass(frozen=True)
class RolloutTargets:
    """What the policy update learns from in one rollout batch of B episodes of T
    response tokens.

    Attributes:
        kl: (B, T) per-token KL estimate, 0 on padding.
        final_scores: (B,) scores after the clip and the missing-eos penalty.
        rewards: (B, T) per-token rewards, before any whitening (each row sums to the
            episode's sequence reward).
        values: (B, T) value estimates, 0 on padding; None without a critic (RLOO).
        advantages: (B, T) advantages, 0 on padding: whitened GAE advantages, or each
            episode's RLOO advantage on all of its tokens.
        returns: (B, T) value targets, 0 on padding; None without a critic (RLOO).
    """

    kl: torch.Tensor
    final_scores: torch.Tensor
    rewards: torch.Tensor
    values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None


def final_scores_and_kl(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    finished: torch.Tensor,
    *,
    kl_estimator: KLEstimator,
    reward_clip: float | None,
    missing_eos_penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores after the clip and the missing-eos penalty, and the masked KL: the part
    of the targets that GAE and RLOO share.

    Args:
        logprobs, ref_logprobs: (B, T) policy and reference log-probs of the sampled tokens.
        mask: (B, T) 0/1 real response tokens.
        scores: (B,) reward-model scores.
        finished: (B,) bool, whether each response reached eos.
    Returns:
        final scores (B,) and per-token KL (B, T), 0 on padding.
    """
    final = scores.clamp(-reward_clip, reward_clip) if reward_clip else scores.clone()
    if missing_eos_penalty:
        final = penalise_missing_eos(final, finished, missing_eos_penalty)
    # Padding's log-probs are whatever the model gives positions it never trains on: a
    # ratio there can overflow k3's exp to inf, and inf * 0 is NaN, which GAE and the
    # whitening would carry to every token of the batch. So both sides are 0 there.
    real = mask.bool()
    kl = kl_per_token(logprobs.where(real, 0.0), ref_logprobs.where(real, 0.0), kl_estimator)
    return final, kl


def rollout_targets(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    finished: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: KLEstimator = "k1",
    reward_clip: float | None = None,
    missing_eos_penalty: float = 0.0,
    whiten_rewards: bool = False,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> RolloutTargets:
    """Rewards, advantages and returns of a rollout batch from its per-token numbers.

    The score is clipped to ``[-reward_clip, reward_clip]``, responses without eos lose
    ``missing_eos_penalty``, and the result lands on the last real token of per-token
    rewards ``-kl_coef * KL_t`` (`per_token_rewards`). Those rewards (whitened with
    their mean kept when ``whiten_rewards``) give GAE advantages and returns; the
    advantages are then whitened over the batch's real tokens.

    Args:
        logprobs: (B, T) policy log-probs of the sampled tokens.
        ref_logprobs: (B, T) reference log-probs of the same tokens.
        values: (B, T) value of the state before each token.
        mask: (B, T) 0/1 real response tokens (padding after the last one).
        scores: (B,) reward-model scores.
        finished: (B,) bool, whether each response reached eos.
        kl_coef, kl_estimator: weight and estimator (`kl_per_token`) of the KL penalty.
        reward_clip: clip of the scores (None or 0: off).
        missing_eos_penalty: subtracted from the score of unfinished responses (0: off).
        whiten_rewards: whiten the per-token rewards (mean kept) before GAE.
        gamma, lam: GAE discount and lambda.
    """
    final, kl = final_scores_and_kl(
        logprobs,
        ref_logprobs,
        mask,
        scores,
        finished,
        kl_estimator=kl_estimator,
        reward_clip=reward_clip,
        missing_eos_penalty=missing_eos_penalty,
    )
    mask = mask.float()
    rewards = per_token_rewards(final, kl, mask, kl_coef)
    gae_rewards = masked_whiten(rewards, mask, shift_mean=False) if whiten_rewards else rewards
    values = values * mask
    advantages, returns = gae(gae_rewards, values, mask, gamma, lam)
    return RolloutTargets(
        kl=kl,
        final_scores=final,
        rewards=rewards,
        values=values,
        advantages=masked_whiten(advantages, mask),
        returns=returns,
    )


def rloo_rollout_targets(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    finished: torch.Tensor,
    *,
    k: int,
    kl_coef: float,
    kl_estimator: KLEstimator = "k1",
    reward_clip: float | None = None,
    missing_eos_penalty: float = 0.0,
    normalize_advantages: bool = False,
) -> RolloutTargets:
    """RLOO's targets for a rollout batch of N = G * k episodes, k consecutive samples of
    each of G prompts: the sibling of `rollout_targets` without a critic.

    The scores get the same clip and missing-eos penalty as PPO's, and the KL the same
    estimator; the sequence reward ``R_i = score_i - kl_coef * sum_t KL_it``
    (`sequence_rewards`) gets the leave-one-out baseline of its prompt's group
    (`rloo_advantages`), and the episode's advantage goes on each of its real tokens.
    ``normalize_advantages`` rescales the N advantages to mean 0, std 1 first
    (`normalise_advantages`); it is off by default, as in TRL 1.12's RLOOTrainer.

    Args:
        logprobs: (N, T) policy log-probs of the sampled tokens.
        ref_logprobs: (N, T) reference log-probs of the same tokens.
        mask: (N, T) 0/1 real response tokens.
        scores: (N,) reward-model scores.
        finished: (N,) bool, whether each response reached eos.
        k: samples per prompt (>= 2).
        kl_coef, kl_estimator: weight and estimator (`kl_per_token`) of the KL penalty.
        reward_clip: clip of the scores (None or 0: off).
        missing_eos_penalty: subtracted from the score of unfinished responses (0: off).
        normalize_advantages: whiten the per-episode advantages over the batch.
    Returns:
        `RolloutTargets` with ``values`` and ``returns`` None.
    """
    final, kl = final_scores_and_kl(
        logprobs,
        ref_logprobs,
        mask,
        scores,
        finished,
        kl_estimator=kl_estimator,
        reward_clip=reward_clip,
        missing_eos_penalty=missing_eos_penalty,
    )
    advantages = rloo_advantages(sequence_rewards(final, kl, kl_coef), k)  # (N,)
    if normalize_advantages:
        advantages = normalise_advantages(advantages)
    mask = mask.float()
    return RolloutTargets(
        kl=kl,
        final_scores=final,
        rewards=per_token_rewards(final, kl, mask, kl_coef),
        values=None,
        advantages=per_token_advantages(advantages, mask),
        returns=None,
    )


# --------------------------------------------------------------------------- KL coefficient


class KLController:
    """The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    The adaptive rule is ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)``
    after every rollout batch of n episodes: a proportional controller that raises beta
    when the policy drifts further from the reference than ``target`` nats per
    sequence and lowers it when it stays closer. Its state is saved in checkpoints so a
    resumed run continues with the coefficient it had reached.

    Args:
        init_kl_coef: starting coefficient.
        target: target KL per sequence (nats); None keeps the coefficient fixed.
        horizon: episodes over which the error is corrected.
    """

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10000):
        if init_kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init_kl_coef}")
        if target is not None and target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        # Plain numbers: the state goes into checkpoints, which hold only allow-listed types.
        self.target = None if target is None else float(target)
        self.horizon = int(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, current_kl: float, n_episodes: int) -> float:
        """Adapt after a batch of ``n_episodes`` whose mean sequence KL was ``current_kl``."""
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_episodes / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        # The restored coefficient continues; target and horizon follow the new config.
