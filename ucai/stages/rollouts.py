"""The online RL stage's rollout batch and its episode log.

`Rollout` is everything one PPO/RLOO update needs from a batch of sampled episodes;
`rollout_rows` and `append_rollout_rows` write each episode to ``rollouts.csv`` in the
run's log folder (the file the evaluation's per-iteration section and the benchmarks
read), one row per episode, appended step by step so that a resumed run continues it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from ucai.next_token import row_seed

ROLLOUT_COLUMNS = ["step", "prompt", "response", "score", "kl", "reward"]


@dataclass
class Rollout:
    """One batch of B episodes with T response tokens, everything the update needs (under
    RLOO, B is the number of prompts times ``rloo_k``).

    Attributes:
        sequences: (B, P + T) prompt (left-padded) and response ids.
        attention_mask: (B, P + T).
        prompt_length: P.
        mask: (B, T) real response tokens.
        logprobs, ref_logprobs, advantages: (B, T) float32.
        values, returns: (B, T) float32; None without a critic (RLOO).
        logprobs, kl, final_scores, rewards, advantages, returns are None, and values
        not yet masked, until the policy's log-probs are known
        (`ucai.stages.ppo_rollout.RolloutPhase.complete_rollout`): after the rollout's own pass,
        or in the first update when its forward stands in for that pass.
        kl: (B, T) per-token KL estimate (0 on padding).
        scores: (B,) reward-model scores (normalised, before clipping and penalty).
        final_scores: (B,) scores after clipping and the missing-eos penalty.
        rewards: (B, T) per-token rewards (before whitening).
        finished: (B,) whether each response reached eos.
        prompts, responses: B texts.
        seconds: generation and scoring time.
        engine_logprobs: (B, T) log-probs of the response tokens under the distribution
            the generation engine sampled them from (its logits after its processors:
            the temperature, and whatever else the sampling settings add, which PPO's
            sampling checks refuse); with ``logprobs`` they estimate KL(engine ‖ model).
            None where the engine recorded nothing (transformers generate under FSDP).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    mask: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor
    finished: torch.Tensor
    prompts: list[str]
    responses: list[str]
    seconds: float
    engine_logprobs: torch.Tensor | None = None
    # Formed from the policy's log-probs: None until they are known (`PPOModule.complete_rollout`).
    logprobs: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    final_scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def episode_seeds(rows: list[dict], iteration: int, per_prompt: int, seed: int) -> list[int]:
    """One sampling seed per episode: each row's ``per_prompt`` samples in a row, from
    (run seed, rollout iteration, prompt id, sample). A resumed run samples what the
    uninterrupted one would have, whatever batch a prompt lands in, and the engines
    draw by inverse CDF from one uniform per row and step instead of
    ``torch.multinomial``'s exponential per vocabulary entry (~7 ms a step on one core
    at 8 rows of a 49k vocabulary). A row without an id is keyed on its prompt text."""
    keys = [f"rollout/{iteration}/{row.get('id', row['prompt'])}" for row in rows]
    return [row_seed(seed, key, sample) for key in keys for sample in range(per_prompt)]


def engine_model_kl(engine_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(engine ‖ model) of sampled tokens: the mean over real tokens of
    log p_engine − log p_model (the sampled k1 estimate; its expectation under the
    engine's samples is the KL). How far the sampler's distribution is from the one
    the training forward computes: the engine's kernels, and top-k / top-p, which the
    forward does not apply.

    Args:
        engine_logprobs, logprobs: (B, T); mask: (B, T) 1 on real tokens.
    Returns:
        scalar tensor.
    """
    real = mask.bool()
    difference = torch.where(real, engine_logprobs.to(logprobs.dtype) - logprobs, torch.zeros_like(logprobs))
    return difference.sum() / real.sum().clamp(min=1)


def rollout_rows(rollout: Rollout, step: int, seq_kl: torch.Tensor, kl_coef: float) -> list[dict]:
    """One ``rollouts.csv`` row per episode of ``rollout``.

    Args:
        step: the rollout step (iteration) the batch belongs to.
        seq_kl: (B,) KL per sequence (the per-token estimate summed over the response).
        kl_coef: the KL coefficient the rewards were formed with.
    Returns:
        rows with the raw score, the KL and the reward ``final_score - kl_coef * kl``.
    """
    return [
        {
            "step": step,
            "prompt": prompt,
            "response": response,
            "score": round(float(score), 6),
            "kl": round(float(kl), 6),
            "reward": round(float(final - kl_coef * kl), 6),
        }
        for prompt, response, score, final, kl in zip(
            rollout.prompts, rollout.responses, rollout.scores, rollout.final_scores, seq_kl, strict=True
        )
    ]


def append_rollout_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` to the CSV at ``path``, with the header when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROLLOUT_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
