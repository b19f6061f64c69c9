"""`PPOModule.rollout` (the real method) on inputs small enough to follow by hand.

Generation, the policy/reference/value forward and the reward model are replaced by
fixed numbers; everything the rollout computes from them — the KL penalty, where the
score lands, the reward clip and the missing-eos penalty, GAE, the advantage whitening
and ``whiten_rewards`` — is checked against the values worked out in the comments.

Two episodes, prompt width P = 3, T = 4 response tokens:

* row 0 ends with eos at t = 2 (mask 1 1 1 0; t = 3 is padding);
* row 1 never reaches eos (mask 1 1 1 1; cut at the length limit).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

import ucai.stages.ppo as ppo
from ucai.stages.generation import Generated, GenerationSettings
from ucai.stages.ppo import PPOModule

PAD = 0
PROMPTS = torch.tensor([[PAD, 5, 6], [7, 8, 9]])  # row 0 left-padded
RESPONSES = torch.tensor([[11, 12, 2, PAD], [13, 14, 15, 16]])  # row 0: eos (2) then pad
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
FINISHED = torch.tensor([True, False])


def rollout_with(monkeypatch, logprobs, ref_logprobs, values, scores, **settings):
    """Run ``PPOModule(**settings).rollout`` with the given per-token numbers (B, T)
    and reward-model scores (B,) in place of the models."""
    module = PPOModule(
        policy="tiny-llama",
        reward_model="token:1",
        minibatch_size=2,
        generation=GenerationSettings(max_new_tokens=4, temperature=1.0, top_p=1.0),
        export=False,
        **settings,
    )
    module.tokenizer = SimpleNamespace(pad_token_id=PAD)
    seen = {}

    def fake_generate(model, tokenizer, prompts, generation, synced_gpus=False, max_prompt_tokens=None):
        return Generated(
            texts=["a", "b"],
            sequences=torch.cat([PROMPTS, RESPONSES], dim=1),
            prompt_length=3,
            completion_mask=MASK,
            finished=FINISHED,
        )

    def fake_forward(sequences, attention, width):
        seen["attention"], seen["width"] = attention, width
        return torch.tensor(logprobs), torch.tensor(ref_logprobs), torch.tensor(values)

    def fake_score(prompts, texts, response_ids, mask):
        seen["response_ids"], seen["score_mask"] = response_ids, mask
        return torch.tensor(scores)

    monkeypatch.setattr(ppo, "generate", fake_generate)
    monkeypatch.setattr(module, "render", lambda prompts: prompts)
    monkeypatch.setattr(module, "rollout_forward", fake_forward)
    monkeypatch.setattr(module, "score", fake_score)
    rollout = module.rollout([{"prompt": "p0"}, {"prompt": "p1"}])
    return rollout, seen


def close(got: torch.Tensor, expected: list) -> bool:
    return torch.allclose(got, torch.tensor(expected, dtype=got.dtype), atol=1e-5)


def test_rollout_rewards_advantages_and_returns_by_hand(monkeypatch):
    rollout, seen = rollout_with(
        monkeypatch,
        # Padding entries (row 0, t = 3) hold large numbers that must never count.
        logprobs=[[-1.0, -2.0, -1.0, -7.0], [-1.0, -1.0, -1.0, -1.0]],
        ref_logprobs=[[-2.0, -2.0, -3.0, -9.0], [-1.0, -3.0, -1.0, -1.0]],
        values=[[-2.5, 1.5, 0.0, 5.0], [-5.5, -2.0, -3.5, 0.0]],
        scores=[3.0, 1.0],
        kl_coef=0.5,
        kl_estimator="k1",
        gamma=1.0,
        lam=0.5,
        reward_clip=2.0,
        missing_eos_penalty=2.0,
        whiten_rewards=False,
    )
    # The forward sees the prompt's real tokens (from the first non-pad) and the
    # response up to and including eos; the reward sees the response ids and mask.
    assert seen["width"] == 3
    assert seen["attention"].tolist() == [[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert torch.equal(seen["response_ids"], RESPONSES) and torch.equal(seen["score_mask"], MASK)
    assert rollout.mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]

    # k1 KL per token = logp − ref_logp, 0 on padding:
    #   row 0: −1+2 = 1, −2+2 = 0, −1+3 = 2, (pad) 0;  row 1: 0, −1+3 = 2, 0, 0.
    assert close(rollout.kl, [[1, 0, 2, 0], [0, 2, 0, 0]])
    # Scores: row 0 (finished) 3 clipped to reward_clip 2, no penalty;
    #         row 1 (no eos) 1, inside the clip, minus the penalty 2 → −1.
    assert close(rollout.scores, [3, 1])
    assert close(rollout.final_scores, [2, -1])
    # rewards = −kl_coef · KL (= −0.5 · KL), plus the final score on the LAST REAL token:
    #   row 0: −0.5, 0, −1 + 2 = 1, (pad) 0       (eos at t = 2, not the padded t = 3)
    #   row 1:  0, −1, 0, 0 − 1 = −1              (cut at t = 3)
    assert close(rollout.rewards, [[-0.5, 0, 1, 0], [0, -1, 0, -1]])
    # Values are masked (the padded 5.0 becomes 0, and V after the last real token is 0).
    assert close(rollout.values, [[-2.5, 1.5, 0, 0], [-5.5, -2, -3.5, 0]])

    # GAE, γ = 1, λ = 0.5: δ_t = r_t + V_{t+1} − V_t, A_t = δ_t + 0.5 · A_{t+1}.
    #   row 0: t=2: δ = 1 + 0 − 0 = 1             A = 1
    #          t=1: δ = 0 + 0 − 1.5 = −1.5        A = −1.5 + 0.5 · 1 = −1
    #          t=0: δ = −0.5 + 1.5 + 2.5 = 3.5    A = 3.5 + 0.5 · (−1) = 3
    #   row 1: t=3: δ = −1 + 0 − 0 = −1           A = −1
    #          t=2: δ = 0 + 0 + 3.5 = 3.5         A = 3.5 − 0.5 = 3
    #          t=1: δ = −1 − 3.5 + 2 = −2.5       A = −2.5 + 1.5 = −1
    #          t=0: δ = 0 − 2 + 5.5 = 3.5         A = 3.5 − 0.5 = 3
    # returns = A + V: row 0: 3 − 2.5, −1 + 1.5, 1 + 0 = 0.5, 0.5, 1; row 1: −2.5, −3, −0.5, −1.
    assert close(rollout.returns, [[0.5, 0.5, 1, 0], [-2.5, -3, -0.5, -1]])
    # Whitening over the 7 real tokens A = 3, −1, 1 | 3, −1, 3, −1: mean 7/7 = 1,
    # deviations 2, −2, 0, 2, −2, 2, −2, unbiased variance 24 / 6 = 4, std 2
    # → 1, −1, 0 | 1, −1, 1, −1; padding 0.
    assert close(rollout.advantages, [[1, -1, 0, 0], [1, -1, 1, -1]])


def test_whiten_rewards_keeps_the_mean_before_gae(monkeypatch):
    rollout, _ = rollout_with(
        monkeypatch,
        logprobs=[[-4.0, -1.0, -1.0, -7.0], [-1.0, -4.0, -1.0, -1.0]],
        ref_logprobs=[[-1.0, -2.0, -1.0, -9.0], [-2.0, -1.0, -2.0, -1.0]],
        values=[[0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0]],
        scores=[3.0, 3.0],
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
    # rollout.rewards are reported before whitening.
    assert close(rollout.rewards, [[3, -1, 3, 0], [-1, 3, -1, 1]])
    # Whitened with the mean kept: mean 7/7 = 1, deviations 2, −2, 2 | −2, 2, −2, 0,
    # unbiased variance 24 / 6 = 4, std 2 → w = dev / 2 + 1 = 2, 0, 2 | 0, 2, 0, 1.
    # With V = 0, γ = λ = 1: A_t = sum of w from t on = returns:
    #   row 0: 4, 2, 2;   row 1: 3, 3, 1, 1.
    assert close(rollout.returns, [[4, 2, 2, 0], [3, 3, 1, 1]])
