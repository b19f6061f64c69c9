"""The rollout phase of the online RL stage (`ucai.stages.ppo.PPOModule`): sample
episodes from the policy, score them with the reward model, compute the policy's and the
reference's log-probs, and form the KL, rewards and advantages (`ucai.rl`).

`RolloutPhase` is a mixin of `PPOModule` and reads its settings and models: ``policy``,
``tokenizer``, the reward models ``_reward``, ``generation``, ``system_prompt``,
``max_prompt_tokens``, ``minibatch_size``, ``rollout_precision``,
``sampling_precision`` (and the copy it builds, ``_sampler``), ``normalize_score``,
``kl_ctl``, ``rollout_step``, ``episodes_per_prompt``, ``has_critic`` and the
estimator's settings, and its forward helpers ``response_hidden``, ``response_logits``,
``values_for`` and ``sequence_logprobs``.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch

from ucai.chat import render_chat
from ucai.hardware import bf16_is_native
from ucai.models import dtype_from_precision, trainer_precision
from ucai.next_token import StepRecorder
from ucai.padding import prompt_attention_mask
from ucai.resume import run_seed
from ucai.reward_scoring import TokenReward
from ucai.rl import RolloutTargets, logprobs_from_logits, rloo_rollout_targets, rollout_targets
from ucai.stages.generation import generate, synced_gpus_needed
from ucai.stages.rollouts import Rollout, episode_seeds

log = logging.getLogger(__name__)

# The name of the policy's LoRA adapter (PPO's critic may add a second, "value").
POLICY_ADAPTER = "policy"


class RolloutPhase:
    """Sampling, scoring and the advantages of one rollout batch (see the module)."""

    def render(self, prompts: list[str]) -> list[str]:
        return [render_chat(self.tokenizer, [{"role": "user", "content": p}], self.system_prompt) for p in prompts]

    def score(self, prompts: list[str], responses: list[str], response_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) float32 scores of the responses (normalised when configured)."""
        reward = self._reward[0]
        if isinstance(reward, TokenReward):
            return reward(response_ids, mask).float()
        raw = reward.raw_rewards(prompts, responses)
        if self.normalize_score:
            from ucai.reward_scoring import normalise

            raw = normalise(raw, reward.stats)[0]
        return raw.to(self.device, torch.float32)

    @torch.no_grad()
    def rollout_forward(
        self, sequences: torch.Tensor, attention: torch.Tensor, width: int, policy: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Policy log-probs, reference log-probs and values of sampled responses, in
        chunks of ``minibatch_size`` (which bounds the logits tensor).

        Args:
            sequences: (B, P + T) prompt and response ids; attention: (B, P + T).
            width: P.
            policy: run the policy's pass; False when the first update's forward stands
                in for it (`fuses_first_update`).
        Returns:
            three (B, T) float32 tensors (not masked); the policy's log-probs are None
            without its pass, the values None without a critic (RLOO), whose value
            pass is skipped.
        """
        was_training = self.policy.training
        self.policy.eval()  # no checkpointing recompute in a no-grad pass
        logprobs, ref_logprobs, values = [], [], []
        try:
            for chunk in range(0, sequences.shape[0], self.minibatch_size):
                ids = sequences[chunk : chunk + self.minibatch_size]
                att = attention[chunk : chunk + self.minibatch_size]
                if policy:
                    hidden = self.response_hidden(ids, att, width)
                    logprobs.append(logprobs_from_logits(self.response_logits(hidden), ids[:, width:]))
                    if self.has_critic:
                        values.append(self.values_for(hidden, ids, att, width))
                    del hidden
                # Beside a fused first update, the reference pass takes the attention
                # kernel of that gradient pass: the policy starts AS the reference, and
                # its first KL is then exactly 0, not the two kernels' rounding (which
                # would give episodes with tied scores non-zero advantages).
                kernel = True if not policy else None
                ref_logprobs.append(self.sequence_logprobs(ids, att, width, reference=True, gradient_pass=kernel))
        finally:
            self.policy.train(was_training)
        return (
            torch.cat(logprobs) if logprobs else None,
            torch.cat(ref_logprobs),
            torch.cat(values) if values else None,
        )

    def fuses_first_update(self, episodes: int) -> bool:
        """Whether the first update's forward stands in for the rollout's policy pass
        (which then does not run): RLOO (no critic, so no old values are needed), one
        minibatch holding all ``episodes`` (so the first update sees the whole rollout
        in its own order, and every advantage can be formed before its loss), and a
        float32 training forward without autocast, as the rollout's (checked by the
        trainer's precision and the autocast state: a strategy that casts weights on
        its own computes both passes with the same weights all the same). The policy
        is the same (no update has run yet) and dropout is off (`disable_dropout`), so
        the log-probs are the same function; the first ratio is then exactly 1, and
        ``first_ratio_max_dev`` / ``first_clipfrac`` are 0 by construction. Saves one
        forward of every episode: 9% of an RLOO iteration of the CPU experiment (fp32,
        8 episodes). Called inside the training step, where the trainer's autocast is
        active."""
        return (
            not self.has_critic
            and self.minibatch_size >= episodes
            and dtype_from_precision(trainer_precision(self)) == torch.float32
            and not torch.is_autocast_enabled(self.device.type)
        )

    def rollout_autocast(self):
        """The autocast state of sampling, the rollout forward and scoring: the trainer's
        (``rollout_precision: trainer``, nothing changed) or none (``fp32``: the fp32
        weights compute in fp32, the training forward keeping its autocast)."""
        if self.rollout_precision == "trainer":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    def sampling_model(self):
        """The model episodes are sampled from: the policy (``sampling_precision:
        rollout``), or its bf16 copy with the adapter merged (``bf16``, `SamplingCopy`,
        built at the first rollout, on the policy's device, and refreshed with the
        adapter's current weights at every one). On a device without native bf16
        (an AVX2-only CPU, where bf16 is several times slower than fp32, as the
        pipeline's precision fallback knows) ``bf16`` samples from the policy, with
        one warning."""
        if self.sampling_precision == "rollout":
            return self.policy
        if not bf16_is_native(self.device.type):
            if not self._sampling_fallback_logged:
                self._sampling_fallback_logged = True
                log.warning(
                    "sampling_precision: bf16 has no native bf16 kernels on this %s; sampling from the "
                    "policy instead (as sampling_precision: rollout)", self.device.type,
                )
            return self.policy
        if self._sampler is None:
            from ucai.sampling_copy import SamplingCopy

            self._sampler = SamplingCopy(self.policy, POLICY_ADAPTER, torch.bfloat16)
        else:
            self._sampler.refresh()
        return self._sampler.model

    def episode_prompts(self, rows: list[dict]) -> list[str]:
        """The prompt of each episode: each row's once (GAE) or ``rloo_k`` times in a row
        (RLOO), so that a prompt's group is consecutive and on this rank."""
        return [row["prompt"] for row in rows for _ in range(self.episodes_per_prompt)]

    @torch.no_grad()
    def rollout(self, rows: list[dict], policy_pass: bool = True) -> Rollout:
        """Generate, score and compute advantages for one batch of prompt rows; without
        ``policy_pass`` the policy's log-probs and everything formed from them are left
        for the first update's forward to fill in (`complete_rollout`)."""
        if not policy_pass and self.has_critic:
            raise RuntimeError("ppo: a rollout without the policy's pass needs RLOO (a critic needs the pass's old values)")
        with self.rollout_autocast():
            return self._rollout(rows, policy_pass)

    def episode_seeds(self, rows: list[dict]) -> list[int]:
        """One sampling seed per episode of this rollout iteration (`episode_seeds`)."""
        return episode_seeds(rows, self.rollout_step, self.episodes_per_prompt, run_seed())

    def _rollout(self, rows: list[dict], policy_pass: bool = True) -> Rollout:
        start = time.perf_counter()
        prompts = self.episode_prompts(rows)
        sampled = StepRecorder()
        generated = generate(
            self.sampling_model(),
            self.tokenizer,
            self.render(prompts),
            self.generation,
            synced_gpus=synced_gpus_needed(self._trainer),
            max_prompt_tokens=self.max_prompt_tokens,
            seeds=self.episode_seeds(rows),
            observer=sampled,
        )
        sequences = generated.sequences
        width = generated.prompt_length
        mask = generated.completion_mask.to(sequences.device)
        attention = torch.cat([prompt_attention_mask(sequences[:, :width], self.tokenizer.pad_token_id), mask], dim=1)
        responses = sequences[:, width:]
        logprobs, ref_logprobs, values = self.rollout_forward(sequences, attention, width, policy=policy_pass)

        scores = self.score(prompts, generated.texts, responses, mask)
        rollout = Rollout(
            sequences=sequences,
            attention_mask=attention,
            prompt_length=width,
            mask=mask.float(),
            ref_logprobs=ref_logprobs,
            values=values,
            scores=scores,
            finished=generated.finished.to(sequences.device),
            prompts=prompts,
            responses=generated.texts,
            seconds=time.perf_counter() - start,
            engine_logprobs=sampled.processed_logprobs(),  # on the policy's device, as its logits
        )
        if logprobs is not None:
            self.complete_rollout(rollout, logprobs)
        return rollout

    def complete_rollout(self, rollout: Rollout, logprobs: torch.Tensor) -> None:
        """Give ``rollout`` the policy's (B, T) log-probs and what is formed from them:
        the KL, the final scores, the rewards and advantages (and, with a critic, the
        masked values and the returns)."""
        targets = self.targets(
            logprobs, rollout.ref_logprobs, rollout.values, rollout.mask, rollout.scores, rollout.finished
        )
        rollout.logprobs = logprobs
        rollout.values = targets.values
        rollout.kl = targets.kl
        rollout.final_scores = targets.final_scores
        rollout.rewards = targets.rewards
        rollout.advantages = targets.advantages
        rollout.returns = targets.returns

    def targets(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        values: torch.Tensor | None,
        mask: torch.Tensor,
        scores: torch.Tensor,
        finished: torch.Tensor,
    ) -> RolloutTargets:
        """The rollout's KL, rewards and advantages (and, with a critic, values and
        returns) from its (B, T) per-token numbers and (B,) scores, by the configured
        estimator."""
        shared = dict(
            kl_coef=self.kl_ctl.value,
            kl_estimator=self.kl_estimator,
            reward_clip=self.reward_clip,
            missing_eos_penalty=self.missing_eos_penalty,
        )
        if self.advantage == "rloo":
            return rloo_rollout_targets(
                logprobs, ref_logprobs, mask, scores, finished, k=self.rloo_k,
                normalize_advantages=self.rloo_normalize_advantages, **shared,
            )
        return rollout_targets(
            logprobs, ref_logprobs, values, mask, scores, finished,
            whiten_rewards=self.whiten_rewards, gamma=self.gamma, lam=self.lam, **shared,
        )
