"""Pure RL maths (ucai.rl) against numbers worked out by hand in the comments, up to the
targets of a whole rollout batch (`rollout_targets` for GAE, `rloo_rollout_targets` for
RLOO)."""

from __future__ import annotations

import math

import pytest
import torch

from ucai.rl import (
    KLController,
    entropy_from_logits,
    gae,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    normalise_advantages,
    penalise_missing_eos,
    per_token_advantages,
    per_token_rewards,
    rloo_advantages,
    rloo_rollout_targets,
    rollout_targets,
    sequence_rewards,
)


def test_masked_mean_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # (1 + 2 + 3) / 3 = 2; the 100 on padding must not count.
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    # An empty mask gives 0 rather than NaN.
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_by_hand():
    values = torch.tensor([[2.0, 4.0], [6.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # Real values 2, 4, 6: mean 4; unbiased variance ((−2)² + 0² + 2²) / (3 − 1) = 4, std 2.
    assert masked_var(values, mask).item() == pytest.approx(4.0)
    whitened = masked_whiten(values, mask)
    # (2 − 4)/2 = −1, (4 − 4)/2 = 0, (6 − 4)/2 = 1; padding returned as 0.
    assert torch.allclose(whitened, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6)
    # shift_mean=False adds the mean back: −1 + 4 = 3, 4, 5 (rewards keep their sign).
    kept = masked_whiten(values, mask, shift_mean=False)
    assert torch.allclose(kept, torch.tensor([[3.0, 4.0], [5.0, 0.0]]), atol=1e-6)


def test_logprobs_from_logits_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]; labels pick index 1 then index 0.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    assert torch.allclose(logprobs_from_logits(logits, labels), expected, atol=1e-6)
    # The row-by-row half-precision path gives the same numbers (to bf16 accuracy).
    half = logprobs_from_logits(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert torch.allclose(half, expected, atol=1e-2)


def test_entropy_from_logits_by_hand():
    # Uniform over 2 tokens: ln 2. One-hot-ish (logits 0, 100): ~0.
    logits = torch.tensor([[[0.0, 0.0], [0.0, 100.0]]])
    entropy = entropy_from_logits(logits)
    assert entropy[0, 0].item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_k1_and_k3_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # log r = ref − logp = [−0.5, 1.0]; k1 = −log r = [0.5, −1.0].
    assert torch.allclose(kl_per_token(logprobs, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 = (r − 1) − log r: e^−0.5 − 1 + 0.5 = 0.6065307 − 0.5 = 0.1065307; e − 1 − 1 = 0.7182818.
    assert torch.allclose(kl_per_token(logprobs, ref, "k3"), torch.tensor([[0.1065307, 0.7182818]]), atol=1e-6)
    # Identical distributions: both estimators are exactly 0.
    assert torch.equal(kl_per_token(ref, ref, "k3"), torch.zeros_like(ref))
    with pytest.raises(ValueError):
        kl_per_token(logprobs, ref, "k2")


def test_reward_placed_on_last_real_token():
    scores = torch.tensor([5.0, 7.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [9.0, 0.5, 0.5, 0.5]])
    # Row 0: post-eos padding at the end. Row 1: left padding at the start.
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    # Row 0: −0.5·[0.1, 0.2, 0.3] = [−0.05, −0.1, −0.15]; +5 on index 2 → 4.85; padding 0.
    # Row 1: −0.5·0.5 = −0.25 on indices 1..3; +7 on index 3 → 6.75; padding 0.
    expected = torch.tensor([[-0.05, -0.1, 4.85, 0.0], [0.0, -0.25, -0.25, 6.75]])
    assert torch.allclose(rewards, expected, atol=1e-6)


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 1.0, -0.5])
    finished = torch.tensor([True, False, False])
    # Only unfinished rows lose the penalty of 2: [1, 1 − 2, −0.5 − 2].
    assert penalise_missing_eos(scores, finished, 2.0).tolist() == [1.0, -1.0, -2.5]
    assert torch.equal(penalise_missing_eos(scores, finished, 0.0), scores)


def test_gae_three_steps_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # Row 0 (all real), backwards, γλ = 0.72:
    #   t=2: δ = 2 + 0.9·0 − 1.5 = 0.5;              A2 = 0.5
    #   t=1: δ = 0 + 0.9·1.5 − 1.0 = 0.35;           A1 = 0.35 + 0.72·0.5 = 0.71
    #   t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4;            A0 = 1.4 + 0.72·0.71 = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    # Row 1 (last position is padding: its reward 99 and value 7 must be ignored):
    #   t=1: δ = 2 + 0.9·0 − 1.0 = 1;                A1 = 1
    #   t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4;            A0 = 1.4 + 0.72·1 = 2.12
    #   returns = [2.62, 2.0, 0]
    assert torch.allclose(advantages, torch.tensor([[1.9112, 0.71, 0.5], [2.12, 1.0, 0.0]]), atol=1e-5)
    assert torch.allclose(returns, torch.tensor([[2.4112, 1.71, 2.0], [2.62, 2.0, 0.0]]), atol=1e-5)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    # γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t. Rewards [1, 2, 3] → to-go [6, 5, 3]; minus V [1, 1, 1].
    advantages, returns = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(advantages, torch.tensor([[5.0, 4.0, 2.0]]))
    assert torch.allclose(returns, torch.tensor([[6.0, 5.0, 3.0]]))


def test_adaptive_kl_controller_by_hand():
    ctl = KLController(0.1, target=6.0, horizon=100)
    # KL 9: error 9/6 − 1 = 0.5, clipped to 0.2; β ← 0.1 · (1 + 0.2·10/100) = 0.102.
    assert ctl.update(9.0, 10) == pytest.approx(0.102)
    # KL 3: error −0.5 → −0.2; β ← 0.102 · (1 − 0.02) = 0.09996.
    assert ctl.update(3.0, 10) == pytest.approx(0.09996)
    # State round-trips (it is checkpointed).
    other = KLController(0.5, target=6.0, horizon=100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == pytest.approx(0.09996)
    # Fixed coefficient: never moves.
    fixed = KLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05


# --------------------------------------------------------------------------- a rollout batch
# Two episodes of T = 4 response tokens: row 0 ends with eos at t = 2 (mask 1 1 1 0,
# t = 3 is padding); row 1 never reaches eos (mask 1 1 1 1, cut at the length limit).

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
FINISHED = torch.tensor([True, False])


def close(got: torch.Tensor, expected: list) -> bool:
    return torch.allclose(got, torch.tensor(expected, dtype=got.dtype), atol=1e-5)


def test_rollout_rewards_advantages_and_returns_by_hand():
    targets = rollout_targets(
        # Padding entries (row 0, t = 3) hold large numbers that must never count.
        logprobs=torch.tensor([[-1.0, -2.0, -1.0, -7.0], [-1.0, -1.0, -1.0, -1.0]]),
        ref_logprobs=torch.tensor([[-2.0, -2.0, -3.0, -9.0], [-1.0, -3.0, -1.0, -1.0]]),
        values=torch.tensor([[-2.5, 1.5, 0.0, 5.0], [-5.5, -2.0, -3.5, 0.0]]),
        mask=MASK,
        scores=torch.tensor([3.0, 1.0]),
        finished=FINISHED,
        kl_coef=0.5,
        kl_estimator="k1",
        gamma=1.0,
        lam=0.5,
        reward_clip=2.0,
        missing_eos_penalty=2.0,
        whiten_rewards=False,
    )
    # k1 KL per token = logp − ref_logp, 0 on padding:
    #   row 0: −1+2 = 1, −2+2 = 0, −1+3 = 2, (pad) 0;  row 1: 0, −1+3 = 2, 0, 0.
    assert close(targets.kl, [[1, 0, 2, 0], [0, 2, 0, 0]])
    # Scores: row 0 (finished) 3 clipped to reward_clip 2, no penalty;
    #         row 1 (no eos) 1, inside the clip, minus the penalty 2 → −1.
    assert close(targets.final_scores, [2, -1])
    # rewards = −kl_coef · KL (= −0.5 · KL), plus the final score on the LAST REAL token:
    #   row 0: −0.5, 0, −1 + 2 = 1, (pad) 0       (eos at t = 2, not the padded t = 3)
    #   row 1:  0, −1, 0, 0 − 1 = −1              (cut at t = 3)
    assert close(targets.rewards, [[-0.5, 0, 1, 0], [0, -1, 0, -1]])
    # Values are masked (the padded 5.0 becomes 0, and V after the last real token is 0).
    assert close(targets.values, [[-2.5, 1.5, 0, 0], [-5.5, -2, -3.5, 0]])

    # GAE, γ = 1, λ = 0.5: δ_t = r_t + V_{t+1} − V_t, A_t = δ_t + 0.5 · A_{t+1}.
    #   row 0: t=2: δ = 1 + 0 − 0 = 1             A = 1
    #          t=1: δ = 0 + 0 − 1.5 = −1.5        A = −1.5 + 0.5 · 1 = −1
    #          t=0: δ = −0.5 + 1.5 + 2.5 = 3.5    A = 3.5 + 0.5 · (−1) = 3
    #   row 1: t=3: δ = −1 + 0 − 0 = −1           A = −1
    #          t=2: δ = 0 + 0 + 3.5 = 3.5         A = 3.5 − 0.5 = 3
    #          t=1: δ = −1 − 3.5 + 2 = −2.5       A = −2.5 + 1.5 = −1
    #          t=0: δ = 0 − 2 + 5.5 = 3.5         A = 3.5 − 0.5 = 3
    # returns = A + V: row 0: 3 − 2.5, −1 + 1.5, 1 + 0 = 0.5, 0.5, 1; row 1: −2.5, −3, −0.5, −1.
    assert close(targets.returns, [[0.5, 0.5, 1, 0], [-2.5, -3, -0.5, -1]])
    # Whitening over the 7 real tokens A = 3, −1, 1 | 3, −1, 3, −1: mean 7/7 = 1,
    # deviations 2, −2, 0, 2, −2, 2, −2, unbiased variance 24 / 6 = 4, std 2
    # → 1, −1, 0 | 1, −1, 1, −1; padding 0.
    assert close(targets.advantages, [[1, -1, 0, 0], [1, -1, 1, -1]])


def test_k3_on_padding_whose_ratio_overflows_leaves_every_target_finite():
    # Row 0's padded t = 3 has log r = ref − logp = −5 + 100 = 95: e^95 overflows float32
    # to inf, and inf · 0 would be NaN, which GAE and the whitening spread to every token.
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, -100.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.0, -2.0, -1.0, -5.0], [-1.0, -1.0, -1.0, -1.0]])
    assert torch.isinf(torch.expm1(ref - logprobs)[0, 3])
    targets = rollout_targets(
        logprobs, ref, torch.zeros(2, 4), MASK, torch.tensor([1.0, -1.0]), FINISHED,
        kl_coef=0.5, kl_estimator="k3", gamma=1.0, lam=1.0, reward_clip=None, missing_eos_penalty=0.0,
        whiten_rewards=False,
    )
    # Policy = reference on every real token: k3 = e^0 − 1 − 0 = 0 there, and 0 on padding.
    assert torch.equal(targets.kl, torch.zeros(2, 4))
    # γ = λ = 1, values 0: each real token's advantage is its row's score (1 | −1) before
    # whitening over the 7 real tokens (mean −1/7); all finite.
    assert torch.isfinite(targets.advantages).all() and torch.isfinite(targets.returns).all()
    assert close(targets.returns, [[1, 1, 1, 0], [-1, -1, -1, -1]])
    rloo = rloo_rollout_targets(
        torch.cat([logprobs, logprobs]), torch.cat([ref, ref]), torch.cat([MASK, MASK]),
        torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.cat([FINISHED, FINISHED]),
        k=2, kl_coef=0.5, kl_estimator="k3", reward_clip=None, missing_eos_penalty=0.0, normalize_advantages=True,
    )
    assert torch.isfinite(rloo.advantages).all()


def test_whiten_rewards_keeps_the_mean_before_gae():
    targets = rollout_targets(
        logprobs=torch.tensor([[-4.0, -1.0, -1.0, -7.0], [-1.0, -4.0, -1.0, -1.0]]),
        ref_logprobs=torch.tensor([[-1.0, -2.0, -1.0, -9.0], [-2.0, -1.0, -2.0, -1.0]]),
        values=torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0]]),
        mask=MASK,
        scores=torch.tensor([3.0, 3.0]),
        finished=FINISHED,
        kl_coef=1.0,
        gamma=1.0,
        lam=1.0,
        reward_clip=None,
        missing_eos_penalty=2.0,
        whiten_rewards=True,
    )
    # KL = logp − ref: row 0: −3, 1, 0; row 1: 1, −3, 1, 0. Final scores: 3 (eos), 3 − 2 = 1.
    # rewards = −KL plus the score on the last real token:
    #   row 0: 3, −1, 0 + 3 = 3;   row 1: −1, 3, −1, 0 + 1 = 1.
    # The rewards are reported before whitening.
    assert close(targets.rewards, [[3, -1, 3, 0], [-1, 3, -1, 1]])
    # Whitened with the mean kept: mean 7/7 = 1, deviations 2, −2, 2 | −2, 2, −2, 0,
    # unbiased variance 24 / 6 = 4, std 2 → w = dev / 2 + 1 = 2, 0, 2 | 0, 2, 0, 1.
    # With V = 0, γ = λ = 1: A_t = sum of w from t on = returns:
    #   row 0: 4, 2, 2;   row 1: 3, 3, 1, 1.
    assert close(targets.returns, [[4, 2, 2, 0], [3, 3, 1, 1]])


# --------------------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_advantages_by_hand():
    # Two prompts, k = 4 samples each, consecutive.
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 2.0, 0.0, 1.0, 1.0])
    # Group 1, sum 12: baselines (12 − R_i) / 3 = 11/3, 10/3, 3, 2
    #   → A = 1 − 11/3, 2 − 10/3, 3 − 3, 6 − 2 = −8/3, −4/3, 0, 4.
    # Group 2, sum 4: baselines 2/3, 4/3, 1, 1 → A = 4/3, −4/3, 0, 0.
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 4 / 3, -4 / 3, 0.0, 0.0])
    advantages = rloo_advantages(rewards, k=4)
    assert torch.allclose(advantages, expected, atol=1e-6)
    # Grouped the other way (k = 2: pairs), each sample's baseline is its partner:
    #   1 − 2, 2 − 1, 3 − 6, 6 − 3, 2 − 0, 0 − 2, 1 − 1, 1 − 1.
    pairs = rloo_advantages(rewards, k=2)
    assert torch.allclose(pairs, torch.tensor([-1.0, 1.0, -3.0, 3.0, 2.0, -2.0, 0.0, 0.0]))


def test_rloo_normalised_advantages_by_hand():
    advantages = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 4 / 3, -4 / 3, 0.0, 0.0])
    # Each group's advantages sum to 0, so the batch mean is 0 and only the scale changes.
    # Unbiased variance: (64/9 + 16/9 + 16 + 16/9 + 16/9) / 7 = (112/9 + 144/9) / 7 = 256/63,
    # std = 16/√63 ≈ 2.015811; TRL adds 1e-4 to the std: A / 2.015911.
    std = 16 / math.sqrt(63)
    normalised = normalise_advantages(advantages)
    assert torch.allclose(normalised, advantages / (std + 1e-4), atol=1e-6)
    assert normalised[3].item() == pytest.approx(4 / 2.015911, abs=1e-5)  # ≈ 1.984214


def test_rloo_needs_two_samples_per_prompt_in_whole_groups():
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0, 2.0]), k=1)
    with pytest.raises(ValueError, match="groups of k=4"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), k=4)


def test_sequence_reward_and_its_tokens_by_hand():
    final = torch.tensor([2.0, -1.0])
    kl = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 3.0]])  # already 0 on padding
    # R = score − 0.1 · ΣKL: 2 − 0.1 · 1.5 = 1.85; −1 − 0.1 · 5 = −1.5.
    assert torch.allclose(sequence_rewards(final, kl, kl_coef=0.1), torch.tensor([1.85, -1.5]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    tokens = per_token_advantages(torch.tensor([3.0, -2.0]), mask)
    assert torch.equal(tokens, torch.tensor([[3.0, 3.0, 0.0], [-2.0, -2.0, -2.0]]))


# Four episodes, two prompts × k = 2, T = 3: row 0 ends with eos at t = 1 (t = 2 is
# padding), row 1 never reaches eos, row 2 ends at t = 0, row 3 fills T with eos last.
RLOO_MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
RLOO_FINISHED = torch.tensor([True, False, True, True])
RLOO_LOGPROBS = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0], [-0.5, -7.0, -7.0], [-1.0, -1.0, -1.0]])
RLOO_REF = torch.tensor([[-2.0, -2.0, -1.0], [-1.0, -3.0, -2.0], [-1.5, 0.0, 0.0], [-1.0, -1.0, -1.0]])


def rloo_targets(**overrides):
    settings = dict(
        k=2, kl_coef=0.5, kl_estimator="k1", reward_clip=2.0, missing_eos_penalty=1.0, normalize_advantages=False
    )
    return rloo_rollout_targets(
        RLOO_LOGPROBS, RLOO_REF, RLOO_MASK, torch.tensor([3.0, 1.0, -4.0, 0.5]), RLOO_FINISHED,
        **{**settings, **overrides},
    )


def test_rloo_rollout_targets_by_hand():
    targets = rloo_targets()
    # k1 KL = logp − ref, 0 on padding (row 0's −9 vs −1 and row 2's −7 vs 0 never count):
    #   row 0: 1, 0 | row 1: 0, 2, 1 | row 2: 1 | row 3: 0, 0, 0.
    assert close(targets.kl, [[1, 0, 0], [0, 2, 1], [1, 0, 0], [0, 0, 0]])
    # Scores clipped to ±2: 2, 1, −2, 0.5; row 1 (no eos) loses 1 → 2, 0, −2, 0.5.
    assert close(targets.final_scores, [2, 0, -2, 0.5])
    # Sequence rewards R = score − 0.5 · ΣKL: 2 − 0.5, 0 − 1.5, −2 − 0.5, 0.5 − 0
    #   = 1.5, −1.5, −2.5, 0.5. With k = 2 the baseline is the other sample of the prompt:
    #   A = 1.5 − (−1.5) = 3, −3 | −2.5 − 0.5 = −3, 3; on every real token, 0 on padding.
    assert close(targets.advantages, [[3, 3, 0], [-3, -3, -3], [-3, 0, 0], [3, 3, 3]])
    # The per-token rewards (−0.5 · KL_t, the score on the last real token) sum to R.
    assert close(targets.rewards.sum(1), [1.5, -1.5, -2.5, 0.5])
    # No critic: neither values nor returns.
    assert targets.values is None and targets.returns is None


def test_rloo_rollout_targets_normalised_and_with_k3():
    # Normalised: the advantages 3, −3, −3, 3 have mean 0, unbiased variance 36/3 = 12,
    # std 2√3 ≈ 3.464102: each becomes ±3 / 3.464202 ≈ ±0.866000.
    scale = 3 / (2 * math.sqrt(3) + 1e-4)
    normalised = rloo_targets(normalize_advantages=True)
    assert close(normalised.advantages, [[scale, scale, 0], [-scale, -scale, -scale], [-scale, 0, 0], [scale] * 3])
    # k3 on row 0, t = 0: log r = ref − logp = −1, k3 = e^−1 − 1 + 1 = 0.367879; the same
    # estimator as PPO's goes into the sequence reward.
    k3 = rloo_targets(kl_estimator="k3")
    assert k3.kl[0, 0].item() == pytest.approx(math.exp(-1), abs=1e-6)
    rewards = k3.rewards.sum(1)
    assert torch.allclose(rewards, k3.final_scores - 0.5 * k3.kl.sum(1), atol=1e-6)
    assert torch.allclose(k3.advantages[:, 0], rloo_advantages(rewards, 2), atol=1e-6)
