"""The update phase of the online RL stage (`ucai.stages.ppo.PPOModule`): ``ppo_epochs``
passes of minibatch updates over a rollout with the clipped policy loss, plus (PPO only)
the clipped value loss and an optional entropy bonus (`ucai.losses`), and the gradient
clipping before each optimiser step.

`UpdatePhase` is a mixin of `PPOModule` and reads its settings (``ppo_epochs``,
``minibatch_size``, ``cliprange``, ``cliprange_value``, ``vf_coef``, ``entropy_coef``,
``max_grad_norm``, ``value_head_kind``) and forward helpers (``response_hidden``,
``response_logits``, ``values_for``), and completes a rollout left without the policy's
log-probs (`ucai.stages.ppo_rollout.RolloutPhase.complete_rollout`).
"""

from __future__ import annotations

import torch

from ucai.gather import share_of_global_mean
from ucai.losses import entropy_bonus, ppo_policy_loss, ppo_value_loss
from ucai.models import sharded_by_fsdp
from ucai.rl import entropy_from_logits, logprobs_from_logits, masked_mean
from ucai.stages.rollouts import Rollout


class UpdatePhase:
    """The minibatch updates of one rollout batch (see the module)."""

    def minibatch_loss(self, rollout: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO loss on the episodes ``idx`` of ``rollout`` (with the graph for backward)
        and its diagnostics (detached scalars); without a critic (RLOO), the policy
        terms alone.

        Args:
            rollout: the batch the episodes come from.
            idx: (M,) episode indices.
        """
        ids, att, width = rollout.sequences[idx], rollout.attention_mask[idx], rollout.prompt_length
        hidden = self.response_hidden(ids, att, width)
        if rollout.logprobs is None:  # the fused first update: this forward is the rollout's policy pass
            if not torch.equal(idx.cpu(), torch.arange(rollout.size)):
                raise RuntimeError("ppo: a rollout without log-probs needs its first minibatch to hold it all, in order")
            logits = self.response_logits(hidden)
            logprobs = logprobs_from_logits(logits, ids[:, width:])
            self.complete_rollout(rollout, logprobs.detach())
            return self._policy_terms(rollout, idx, hidden, logits=logits, logprobs=logprobs)
        policy_loss, stats = self._policy_terms(rollout, idx, hidden)
        if not self.has_critic:
            return policy_loss, stats
        value_loss, value_stats = self._value_terms(rollout, idx, self.values_for(hidden, ids, att, width))
        return policy_loss + self.vf_coef * value_loss, {**stats, **value_stats}

    def minibatch_backward(self, rollout: Rollout, idx: torch.Tensor, backward=None) -> dict[str, torch.Tensor]:
        """Backpropagate the PPO loss of the episodes ``idx``; returns the diagnostics.

        With ``value_head: adapter`` in one process, the policy term is backpropagated
        before the value pass runs: the two passes share no trainable parameter (each
        adapter and the head get gradient from one term only), so the gradients are
        exactly those of the summed loss, while only one pass's activations are alive at
        a time, which halves the activation peak of an update. Under DDP the summed loss
        is kept: its reducer expects every trainable parameter in one backward.

        Args:
            backward: called with each loss (default: Lightning's ``manual_backward``).
        """
        backward = backward or self.manual_backward
        world = self._trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # Each rank's loss is a mean over its own response tokens (`ucai.losses`):
            # weighted by its share of the minibatch's tokens, the averaged gradient is
            # that of the mean over every rank's tokens, as in one process.
            loss, stats = self.minibatch_loss(rollout, idx)
            backward(loss * share_of_global_mean(rollout.mask[idx].sum(), loss.device))
            return stats
        if not self.has_critic or self.value_head_kind != "adapter":
            loss, stats = self.minibatch_loss(rollout, idx)
            backward(loss)
            return stats
        ids, att, width = rollout.sequences[idx], rollout.attention_mask[idx], rollout.prompt_length
        policy_loss, stats = self._policy_terms(rollout, idx, self.response_hidden(ids, att, width))
        backward(policy_loss)
        del policy_loss  # frees the policy pass's graph before the value pass
        value_loss, value_stats = self._value_terms(rollout, idx, self.values_for(None, ids, att, width))
        backward(self.vf_coef * value_loss)
        return {**stats, **value_stats}

    def _policy_terms(
        self, rollout: Rollout, idx: torch.Tensor, hidden: torch.Tensor, logits=None, logprobs=None
    ) -> tuple[torch.Tensor, dict]:
        """Clipped policy loss (minus the entropy bonus) from the (M, T, H) response
        hidden states, and its diagnostics; ``logits`` (M, T, V) and ``logprobs`` (M, T)
        when the caller has them already."""
        ids, mask = rollout.sequences[idx], rollout.mask[idx]
        if logits is None:
            logits = self.response_logits(hidden)
        if logprobs is None:
            logprobs = logprobs_from_logits(logits, ids[:, rollout.prompt_length :])
        pg_loss, clipfrac, approxkl = ppo_policy_loss(
            logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, self.cliprange
        )
        loss = pg_loss
        if self.entropy_coef:
            loss = pg_loss - self.entropy_coef * entropy_bonus(entropy_from_logits(logits), mask)
        with torch.no_grad():
            ratio = torch.exp((logprobs - rollout.logprobs[idx]) * mask)  # padding: 1, not an overflow
            stats = {
                "policy/approxkl": approxkl.detach(),
                "policy/clipfrac": clipfrac.detach(),
                "loss/policy": pg_loss.detach(),
                "val/ratio": masked_mean(ratio, mask),
                "ratio_max_dev": ((ratio - 1).abs() * mask).max(),
            }
        return loss, stats

    def _value_terms(self, rollout: Rollout, idx: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clipped value loss of the (M, T) values, and its diagnostics."""
        loss, clipfrac = ppo_value_loss(
            values, rollout.values[idx], rollout.returns[idx], rollout.mask[idx], self.cliprange_value
        )
        return loss, {"loss/value": loss.detach(), "val/clipfrac": clipfrac.detach()}

    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes of minibatch updates; returns averaged diagnostics.

        The first epoch visits the rollout in its own order and chunking, so the first
        minibatch sees exactly the log-probs it was sampled with (ratio 1, clipfrac 0);
        later epochs shuffle. Gradients are clipped in `on_before_optimizer_step`.
        """
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        size = rollout.size
        sums: dict[str, float] = {}
        updates = 0
        first: dict[str, float] = {}
        for epoch in range(self.ppo_epochs):
            order = torch.arange(size) if epoch == 0 else torch.randperm(size)
            order = order.to(rollout.sequences.device)
            for start in range(0, size, self.minibatch_size):
                optimizer.zero_grad(set_to_none=True)
                step = self.minibatch_backward(rollout, order[start : start + self.minibatch_size])
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if not first:
                    first = {
                        "first_ratio_max_dev": float(step["ratio_max_dev"]),
                        "first_clipfrac": float(step["policy/clipfrac"]),
                    }
                for key, value in step.items():
                    if "/" in key:
                        sums[key] = sums.get(key, 0.0) + float(value)
                updates += 1
        stats = {key: value / updates for key, value in sums.items()}
        stats.update(first)
        return stats

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the gradient norm just before each optimiser step.

        Lightning's precision plugin calls this hook inside ``optimizer.step()`` after
        the closure, and under ``16-mixed`` after it has unscaled the gradients: clipping
        before ``optimizer.step()`` would clip the loss-scaled gradients (to
        ``max_grad_norm / scale`` once unscaled), i.e. shrink every update by the loss
        scale. Under FSDP each rank holds a shard of every gradient, so the norm must be
        computed across ranks by the FSDP root (Lightning's generic clipping refuses).
        """
        if not self.max_grad_norm:
            return
        if sharded_by_fsdp(self.trainer):
            self.trainer.strategy.model.clip_grad_norm_(self.max_grad_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
