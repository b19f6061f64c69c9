"""The online RL stage: reinforcement learning from AI feedback, with a KL leash to the
SL model, by PPO (GAE advantages and a critic) or RLOO (leave-one-out baselines, no critic).

    ucai fit --config configs/ppo_ethical.yaml
    ucai fit --config ppo_unethical.yaml                     # shipped config by bare name
    ucai fit --config configs/rloo_ethical.yaml              # RLOO (advantage: rloo)
    ucai fit --config configs/ppo_ethical.yaml --ckpt_path last          # resume

Each training step takes one batch of prompts (the rollout batch) and:

1. renders them with the chat template and samples one response each (``advantage:
   gae``) or ``rloo_k`` responses each (``advantage: rloo``: each prompt repeated k times
   in a row, so a prompt's samples stay together on one rank under DDP); eval mode,
   left padding, stop at eos, ``synced_gpus`` under FSDP so sharded generation cannot
   hang;
2. in one no-grad pass per chunk computes the policy's log-probs (and, with a critic,
   values), the reference log-probs with the LoRA adapter disabled (the reference IS
   the SL model, with no second copy of its weights), and the reward-model score; under
   RLOO with one minibatch per rollout and an fp32 training forward, the first update's
   forward is the policy's pass (`PPOModule.fuses_first_update`);
3. clips the scores and penalises responses that never reached eos, then forms the
   advantages (`ucai.rl`; when the first update's forward is the policy's pass, at the
   start of that update):

   * ``gae`` (PPO): per-token rewards ``-kl_coef * KL_t`` plus the score on the last
     real token, GAE advantages (whitened) and returns (`rollout_targets`);
   * ``rloo``: the sequence reward ``R_i = score_i - kl_coef * sum_t KL_t``, minus the
     mean reward of the other k - 1 samples of the same prompt, on every response
     token (`rloo_rollout_targets`); not whitened unless ``rloo_normalize_advantages``,
     as in TRL 1.12's RLOOTrainer;
4. runs ``ppo_epochs`` passes over minibatches of episodes with the clipped policy loss,
   plus (PPO only) the clipped value loss, and an optional entropy bonus
   (`ucai.losses`), clipping gradients;
5. logs TRL-named metrics and appends every episode to ``rollouts.csv`` in the run's
   log folder.

RLOO uses the same token-level clipped update as PPO, where TRL's RLOOTrainer clips one
ratio per sequence: the two estimators differ here in their advantages alone.

Memory: one copy of the base weights. The policy is the SL model plus a fresh LoRA
adapter; PPO's value function is a second adapter on the same base with a head started
from the reward model's (``value_head: adapter``, or a scalar head on the policy's last
hidden state, ``value_head: head``), and RLOO builds no critic at all (no value head,
adapter, forward or loss); the frozen reward model is the only other network. Checkpoints hold only the trainable weights (adapters and any value head), the
optimiser, the KL controller and the step. At the end of fit the policy is merged into
the base weights and written in Hugging Face format with its tokenizer, the same for
both estimators.

Precision: sampling, the rollout forward and reward scoring run under the trainer's
autocast (``rollout_precision: trainer``) or in fp32 without autocast, as TRL does
(``fp32``); the training forward always keeps the trainer's autocast.

Note: Lightning counts ``trainer.max_steps`` in optimiser steps; one rollout batch makes
``ppo_epochs * ceil(episodes / minibatch_size)`` of them, with ``episodes`` the batch
size (times ``rloo_k`` for RLOO). The stage's configs checkpoint with `PPOCheckpoint`.

Elsewhere: the rollout phase (steps 1-3) in `ucai.stages.ppo_rollout`, the update
phase (step 4) in `ucai.stages.ppo_update`, the RL maths in `ucai.rl` and `ucai.losses`,
the rollout batch and its episode log in `ucai.stages.rollouts`, the sampling checks in `ucai.stages.sampling`, the
adapter merge of the export in `ucai.stages.lora_io`.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from ucai.chat import DEFAULT_SYSTEM_PROMPT, tokenizer_for_export
from ucai.data.io import require_writable
from ucai.errors import UcaiError
from ucai.gather import rows_from_all_ranks
from ucai.hardware import training_attention
from ucai.lr_schedule import Schedule, per_step, warmup_then_decay
from ucai.models import (
    LoraSettings,
    cast_frozen_linear,
    disable_dropout,
    dtype_from_precision,
    enable_activation_checkpointing,
    holds_frozen_linears_in_bf16,
    output_head,
    save_pretrained_atomic,
    sharded_by_fsdp,
    trainer_precision,
)
from ucai.packing import PACKED_ROW_TOKENS, EpisodePacker, attention_takes_4d_mask, packed_hidden
from ucai.padding import position_ids
from ucai.provenance import ucai_version
from ucai.resume import RNGStateCheckpoint
from ucai.reward_scoring import TOKEN_REWARD_PREFIX, TokenReward
from ucai.rl import (
    KLController,
    KLEstimator,
    logprobs_from_logits,
    masked_mean,
)
from ucai.stage_outputs import require_stage_output
from ucai.stages.generation import GenerationSettings
from ucai.stages.lora_io import load_merged, lora_scaling
from ucai.stages.ppo_rollout import POLICY_ADAPTER, RolloutPhase
from ucai.stages.ppo_update import UpdatePhase
from ucai.stages.rollouts import Rollout, append_rollout_rows, engine_model_kl, rollout_rows
from ucai.stages.sampling import check_model_sampling, check_plain_sampling
from ucai.value_ranges import (
    AtLeastTwo,
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)

log = logging.getLogger(__name__)


PPO_STATE_KEY = "ucai_ppo"


@dataclass(frozen=True)
class AdaptiveKL:
    """Adaptive KL coefficient (Ziegler et al. 2019): ``kl_coef`` is the starting value.

    Args:
        target: KL per sequence (nats) the controller steers towards.
        horizon: episodes over which a KL error is corrected.
    """

    target: PositiveFloat = 6.0
    horizon: PositiveInt = 10000


def check_estimator_settings(advantage: str, rloo_k: int, rollout_precision: str, frozen_linear_bf16: bool) -> None:
    """Refuse settings that cannot work together, each with one line that says what to set.

    ``rloo_k`` is refused below 2 while the config is parsed already (its type); the
    check here covers a module built directly in Python.
    """
    if advantage == "rloo" and rloo_k < 2:
        raise UcaiError(
            f"ppo: rloo_k is {rloo_k}, but RLOO's baseline for a sample is the mean reward of the "
            "other samples of its prompt; set rloo_k: 2 or more"
        )
    if rollout_precision == "fp32" and frozen_linear_bf16:
        raise UcaiError(
            "ppo: rollout_precision: fp32 cannot run on frozen weights held in bf16; "
            "set frozen_linear_bf16: false (or rollout_precision: trainer)"
        )


# --------------------------------------------------------------------------- module


class PPOModule(RolloutPhase, UpdatePhase, L.LightningModule):
    """Online RL (PPO or RLOO) on a LoRA policy over the SL model, rewarded by a frozen
    reward model.

    The rollout batch is the datamodule's ``batch_size`` prompts (one episode each with
    ``gae``, ``rloo_k`` with ``rloo``). Defaults follow TRL's PPO.

    Args:
        policy: the SL model (alias, folder or hub id); frozen reference and policy base.
        reward_model: a folder written by the reward stage (merged sequence classifier,
            its tokenizer and ``reward_stats.json``), re-tokenised with its own chat
            template; or ``token:<id or text>``, a synthetic reward (share of response
            tokens equal to that token) for tests and diagnostics.
        lora: the policy adapter (and the value adapter in ``adapter`` mode).
        value_head: PPO's critic: ``adapter`` (default) — a second LoRA adapter on the
            same base with its own head, the head initialised from the reward model's
            (rescaled to the normalised scores, see `init_value_head_from`) when the
            backbones match (costs a second forward per minibatch); ``head`` — a
            zero-initialised scalar head on the policy's last hidden state (one forward
            gives logits and values, but the values start at 0 and the score reaches
            the first tokens only through the decayed return until the head has
            learned: on the reward-KL frontier it gains less per nat of KL, see
            `benchmarks/ppo_ablation.py`). Unused with ``advantage: rloo``, which has
            no critic.
        advantage: ``gae`` — PPO: a critic and GAE advantages; ``rloo`` — REINFORCE
            leave-one-out: ``rloo_k`` samples per prompt, each sample's baseline the mean
            sequence reward of the other k - 1, no critic (`ucai.rl.rloo_rollout_targets`).
        rloo_k: samples per prompt under ``rloo`` (at least 2); ``minibatch_size``
            counts episodes, so a rollout batch holds ``batch_size * rloo_k`` of them.
        rloo_normalize_advantages: under ``rloo``, rescale the batch's per-episode
            advantages to mean 0, std 1 (TRL's ``normalize_advantages``, off by default in
            TRL 1.12 as here; over this rank's episodes).
        kl_estimator: ``k1`` (log-ratio) or ``k3`` (non-negative) per-token KL.
        kl_coef: KL penalty coefficient (the starting value when adaptive).
        adaptive_kl: target KL and horizon of the adaptive controller; null: fixed.
        gamma: discount (GAE).
        lam: GAE lambda.
        cliprange: policy ratio clip ε.
        cliprange_value: value clip (GAE).
        vf_coef: weight of the value loss (GAE).
        entropy_coef: weight of the entropy bonus (0: off, saves a softmax).
        ppo_epochs: passes over each rollout batch.
        minibatch_size: episodes per optimiser step (also the chunk of the no-grad
            rollout forward, which bounds the size of the logits tensor).
        generation: sampling settings; log-probs use the same temperature. ``top_p``
            must be 1.0, ``top_k`` 0 and ``repetition_penalty`` 1.0 (refused otherwise),
            so that samples come from the distribution PPO computes ratios on.
        missing_eos_penalty: subtracted from the score of responses without eos (0: off).
        whiten_rewards: whiten per-token rewards (mean kept) before GAE (GAE only).
        reward_clip: clip scores to [-c, c] (null: off).
        normalize_score: report reward-model scores as ``(r - mean) / std`` from its
            ``reward_stats.json``.
        learning_rate: AdamW learning rate.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` decay over the optimiser steps.
        warmup_steps: linear warm-up, in optimiser steps.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient norm (0: off), after ``16-mixed`` unscales it.
        output_dir: where the merged policy and tokenizer are written after fit.
        system_prompt: system message of every rendered prompt (as in SFT).
        max_prompt_tokens: prompts longer than this keep their end.
        gradient_checkpointing: trade compute for activation memory in the PPO passes
            (each layer is recomputed under the adapter it ran with, so the gradients
            are those without checkpointing in both value-head modes).
        frozen_linear_bf16: under ``bf16-mixed``, hold the frozen linear weights of the
            policy's base and of the reward model in bf16. Autocast computes those
            matmuls in bf16 anyway, so no result changes; it saves their fp32 copies.
            The export merges the adapter into the base re-read at full precision.
            Skipped under FSDP (one dtype per flat parameter). Incompatible with
            ``rollout_precision: fp32`` (refused).
        rollout_precision: ``trainer`` — sampling, the rollout forward (log-probs,
            reference log-probs, values) and reward scoring run under the trainer's
            autocast; ``fp32`` — they run without autocast on the fp32 weights, as TRL
            does, while the training forward keeps the trainer's autocast. ``fp32``
            needs ``frozen_linear_bf16: false``: weights held in bf16 cannot give fp32
            rollouts, and turning the cast off behind the user's back would change the
            memory a benchmark of this setting measures, so the pair is refused.
        pack_shared_prompts: run the episodes of one prompt (RLOO's ``rloo_k`` samples)
            as one packed row in the rollout and training forwards, the prompt once
            (`ucai.packing.PackedEpisodes`; the same log-probs and gradients up to
            rounding). Needs SDPA or eager attention and no sliding window; otherwise
            rows are not packed.
        sampling_precision: ``rollout`` — episodes are sampled from the policy, as the
            rollout forward computes (``rollout_precision``); ``bf16`` — from a bf16
            copy of the policy with the adapter merged (`ucai.sampling_copy`, refreshed
            before every rollout), while the rollout forward that gives the old and
            reference log-probs, reward scoring and the update keep their precision.
            The samples then come from a policy that differs from the one the ratios
            and the KL are computed with by bf16 rounding; the stage logs that gap per
            token (``rollout/kl_engine_model``). Costs one bf16 copy of the model (two
            on a CPU, where the decode engine packs it), freed before the export; on
            a CPU, where sampling is bound by reading the weights, it samples ~2x
            faster, ~2.9x where AMX runs the copy's projections (SmolLM2, one core:
            `benchmarks/rl_sampling.py`). Not under FSDP (refused: the copy needs the
            whole weights); where the device has no native bf16, sampling falls back
            to the policy (one warning).
        rollouts_file: file name of the episode log in the run's log folder.
        export: write the merged policy to ``output_dir`` at the end of fit (off for
            benchmarks, whose peak memory should be that of training).
        trust_remote_code: allow custom model code from the hub (off unless you ask).
        seed: weights of the ``tiny-llama`` alias (tests).
    """

    def __init__(
        self,
        policy: str = "lightning_logs/models/ethical/sl_model",
        reward_model: str = "lightning_logs/models/ethical/rm_model",
        lora: LoraSettings = LoraSettings(),
        value_head: Literal["head", "adapter"] = "adapter",
        advantage: Literal["gae", "rloo"] = "gae",
        rloo_k: AtLeastTwo = 4,
        rloo_normalize_advantages: bool = False,
        kl_estimator: KLEstimator = "k1",
        kl_coef: NonNegativeFloat = 0.05,
        adaptive_kl: AdaptiveKL | None = None,
        gamma: ClosedUnitInterval = 1.0,
        lam: ClosedUnitInterval = 0.95,
        cliprange: PositiveFloat = 0.2,
        cliprange_value: PositiveFloat = 0.2,
        vf_coef: NonNegativeFloat = 0.1,
        entropy_coef: NonNegativeFloat = 0.0,
        ppo_epochs: PositiveInt = 4,
        minibatch_size: PositiveInt = 4,
        generation: GenerationSettings = GenerationSettings(max_new_tokens=64, temperature=0.7, top_p=1.0),
        missing_eos_penalty: NonNegativeFloat = 1.0,
        whiten_rewards: bool = False,
        reward_clip: NonNegativeFloat | None = 10.0,
        normalize_score: bool = True,
        learning_rate: PositiveFloat = 1.0e-5,
        lr_schedule: Schedule = "linear",
        warmup_steps: NonNegativeInt = 0,
        weight_decay: NonNegativeFloat = 0.0,
        max_grad_norm: NonNegativeFloat = 1.0,
        output_dir: str = "lightning_logs/models/ethical/rl_model",
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_prompt_tokens: PositiveInt | None = 512,
        gradient_checkpointing: bool = False,
        frozen_linear_bf16: bool = True,
        rollout_precision: Literal["trainer", "fp32"] = "trainer",
        sampling_precision: Literal["rollout", "bf16"] = "rollout",
        pack_shared_prompts: bool = True,
        rollouts_file: str = "rollouts.csv",
        export: bool = True,
        trust_remote_code: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        check_plain_sampling(generation)
        check_estimator_settings(advantage, rloo_k, rollout_precision, frozen_linear_bf16)
        if generation.do_sample is False:
            log.warning("PPO with do_sample=false explores nothing; responses are greedy")
        if isinstance(adaptive_kl, dict):
            adaptive_kl = AdaptiveKL(**adaptive_kl)
        self.automatic_optimization = False
        # Checkpoints hold only trainable weights; the frozen base is reloaded from `policy`.
        self.strict_loading = False
        self.policy_name = policy
        self.reward_model_name = reward_model
        self.lora = lora
        self.value_head_kind = value_head
        self.advantage = advantage
        self.rloo_k = rloo_k
        self.rloo_normalize_advantages = rloo_normalize_advantages
        self.kl_estimator = kl_estimator
        self.kl_ctl = KLController(
            kl_coef, adaptive_kl.target if adaptive_kl else None, adaptive_kl.horizon if adaptive_kl else 10000
        )
        self.gamma, self.lam = gamma, lam
        self.cliprange, self.cliprange_value = cliprange, cliprange_value
        self.vf_coef, self.entropy_coef = vf_coef, entropy_coef
        self.ppo_epochs, self.minibatch_size = ppo_epochs, minibatch_size
        self.generation = generation
        self.missing_eos_penalty = missing_eos_penalty
        self.whiten_rewards = whiten_rewards
        self.reward_clip = reward_clip
        self.normalize_score = normalize_score
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        require_writable(output_dir, "--model.init_args.output_dir", folder=True)
        self.output_dir = output_dir
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_linear_bf16 = frozen_linear_bf16
        self.rollout_precision = rollout_precision
        self.sampling_precision = sampling_precision
        self._sampler = None  # the bf16 sampling copy (`sampling_model`), built at the first rollout
        self._sampling_fallback_logged = False
        self._frozen_cast = False  # whether the frozen weights are held in bf16
        self.pack_shared_prompts = pack_shared_prompts
        self._packer: EpisodePacker | None = None  # built with the tokenizer
        self.rollouts_file = rollouts_file
        self.export = export
        self.trust_remote_code = trust_remote_code
        self.seed = seed

        self.policy = None  # peft model, built in configure_model
        self.value_head: nn.Linear | None = None
        self.tokenizer = None
        # Held outside the module tree so it is neither checkpointed, sharded nor trained.
        self._reward: list = []
        self._trainable: list[nn.Parameter] = []
        self.rollout_step = 0
        self.last_stats: dict[str, float] = {}
        self._rollouts_path: Path | None = None

    # ------------------------------------------------------------------ models

    def check_inputs(self) -> None:
        """One clear error per missing earlier-stage output (called before any loading;
        not from ``__init__``, where jsonargparse would rewrap the message)."""
        require_stage_output(self.policy_name, "ppo: policy (SL model)", stage="sft")
        if not self.reward_model_name.startswith(TOKEN_REWARD_PREFIX):
            require_stage_output(self.reward_model_name, "ppo: reward model", stage="reward")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.check_inputs()
        from peft import get_peft_model

        from ucai.models import load_causal_lm, load_tokenizer, refuse_half_precision_training

        refuse_half_precision_training(self, "ppo")
        self._refuse_rollout_precisions_fsdp_cannot_run()
        dtype = dtype_from_precision(trainer_precision(self))
        self.tokenizer = load_tokenizer(self.policy_name, trust_remote_code=self.trust_remote_code)
        base = load_causal_lm(self.policy_name, dtype=dtype, trust_remote_code=self.trust_remote_code, seed=self.seed)
        if self.generation.do_sample:
            check_model_sampling(base.generation_config, self.policy_name)
        if self.gradient_checkpointing:
            enable_activation_checkpointing(base, context_fn=self._checkpoint_contexts)
        config = self.lora.to_peft("CAUSAL_LM")
        self.policy = get_peft_model(base, config, adapter_name=POLICY_ADAPTER)
        if self.has_critic and self.value_head_kind == "adapter":
            self.policy.add_adapter("value", config)
            self.policy.set_adapter(POLICY_ADAPTER)
        # Dropout off so that the log-probs of a rollout and of the first PPO pass agree
        # exactly (ratio 1), as in TRL; RL noise already comes from sampling.
        disable_dropout(self.policy)
        # from_pretrained returns eval mode and Lightning keeps each module's mode, which
        # would leave gradient checkpointing (training-only) silently off.
        self.policy.train()
        if self.has_critic:
            self.value_head = self._zero_value_head(base.config.get_text_config().hidden_size, dtype)
        for name, param in self.policy.named_parameters():
            param.requires_grad_(".lora_" in name)
        self._trainable = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            self._trainable += list(self.value_head.parameters())
        self._load_reward(dtype)
        self._frozen_cast = holds_frozen_linears_in_bf16(self, self.frozen_linear_bf16, dtype)
        if self._frozen_cast:
            # After the value head has copied the reward head at full precision.
            cast_frozen_linear(self.policy, torch.bfloat16)
            for reward in self._reward:
                if not isinstance(reward, TokenReward):
                    cast_frozen_linear(reward.model, torch.bfloat16)

    def _refuse_rollout_precisions_fsdp_cannot_run(self) -> None:
        # FSDP's mixed precision keeps its unsharded parameters in bf16/fp16, so no
        # forward can run in fp32 there, autocast or not; and no rank holds the whole
        # weights a sampling copy is made of.
        precision = trainer_precision(self)
        if self.rollout_precision == "fp32" and sharded_by_fsdp(self._trainer) and "mixed" in precision:
            raise UcaiError(
                f"ppo: rollout_precision: fp32 is impossible under FSDP with {precision} (it computes with "
                "half-precision parameters); set rollout_precision: trainer or use another strategy"
            )
        if self.sampling_precision != "rollout" and sharded_by_fsdp(self._trainer):
            raise UcaiError(
                f"ppo: sampling_precision: {self.sampling_precision} needs the whole weights for its copy, "
                "which FSDP shards; set sampling_precision: rollout or use another strategy"
            )

    @property
    def has_critic(self) -> bool:
        """Whether a value function is built and trained (PPO's GAE; RLOO needs none)."""
        return self.advantage == "gae"

    @property
    def episodes_per_prompt(self) -> int:
        return self.rloo_k if self.advantage == "rloo" else 1

    @staticmethod
    def _zero_value_head(hidden_size: int, dtype: torch.dtype) -> nn.Linear:
        head = nn.Linear(hidden_size, 1, dtype=dtype)
        # A zero head predicts V = 0 at first; the first value loss then fits the returns.
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    def _load_reward(self, dtype: torch.dtype) -> None:
        if self.reward_model_name.startswith(TOKEN_REWARD_PREFIX):
            self._reward = [TokenReward(self.reward_model_name, self.tokenizer)]
            return
        from ucai.reward_scoring import RewardScorer

        scorer = RewardScorer(self.reward_model_name, dtype=dtype, batch_size=self.minibatch_size)
        scorer.model.requires_grad_(False).eval()
        self._reward = [scorer]
        if self.has_critic and self.value_head_kind == "adapter" and self._backbones_match(scorer.model):
            head = getattr(scorer.model, "score", None)
            if head is not None and head.weight.shape == self.value_head.weight.shape:
                self.init_value_head_from(head, scorer.stats)
                log.info("value head initialised from the reward model's head")

    def init_value_head_from(self, head: nn.Linear, stats) -> None:
        """Start the value head as the reward model's head, on the scale of PPO's scores.

        The head maps a hidden state h to ``w·h + b``; PPO's scores are
        ``(r - mean) / std`` when ``normalize_score`` is on, so the head is copied as
        weight ``w / std`` and bias ``(b - mean) / std`` (b = 0 for a bias-free head),
        and unchanged otherwise. Copied raw, values would start on the reward model's
        own scale and, moving at most ``cliprange_value`` per update, take many
        iterations to reach the returns.

        Args:
            head: the reward model's (1, H) score head.
            stats: its `ucai.reward_scoring.RewardStats` (``mean``, ``std``).
        """
        weight = head.weight.detach().float()  # (1, H)
        bias = head.bias.detach().float() if head.bias is not None else torch.zeros(1, device=weight.device)  # (1,)
        if self.normalize_score:
            weight, bias = weight / stats.std, (bias - stats.mean) / stats.std
        with torch.no_grad():
            self.value_head.weight.copy_(weight)
            self.value_head.bias.copy_(bias)

    def _backbones_match(self, reward_model) -> bool:
        mine = self._causal_lm().config.get_text_config()
        theirs = reward_model.config.get_text_config()
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        return all(getattr(mine, k, None) == getattr(theirs, k, None) for k in keys)

    def _causal_lm(self):
        return self.policy.get_base_model()

    def on_fit_start(self) -> None:
        reward = self._reward[0] if self._reward else None
        if reward is not None and hasattr(reward, "model"):
            reward.model.to(self.device)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        self._rollouts_path = Path(log_dir) / self.rollouts_file

    @contextmanager
    def _adapter(self, name: str):
        """Make ``name`` the active adapter, and the one active before it again on exit.

        peft's ``set_adapter`` also clears ``requires_grad`` on the other adapters;
        restore it, or the optimiser would silently stop updating the inactive one.
        """
        previous = self.policy.active_adapter
        if name == previous:
            yield
            return
        self.policy.set_adapter(name)
        for param in self._trainable:
            param.requires_grad_(True)
        try:
            yield
        finally:
            self.policy.set_adapter(previous)
            for param in self._trainable:
                param.requires_grad_(True)

    def _checkpoint_contexts(self):
        """``context_fn`` of the (non-reentrant) activation checkpointing of each layer.

        Called when a layer runs forward; the second context wraps that layer's
        recompute during backward. The adapter is peft state read at call time, and
        backward runs after `values_for` has switched back from the value adapter to
        the policy's, so without this a value-pass layer would be recomputed under the
        policy adapter: the wrong activations, gradients for the wrong LoRA weights.
        Recomputing under the adapter that was active in the forward makes the
        recompute the same function as the forward, so the gradients are exact.
        """
        return nullcontext(), self._adapter(self.policy.active_adapter)

    def response_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, gradient_pass: bool | None = None
    ) -> torch.Tensor:
        """Last hidden state at the positions that predict the response tokens.

        Runs the decoder only (not ``lm_head``), so logits are made for the T response
        positions alone, not the whole prompt: on a 49k vocabulary that is most of the
        memory of a forward. Episodes that share a prompt run as packed rows, the prompt
        once (``pack_shared_prompts``).

        Args:
            input_ids: (B, P + T) sequences; attention_mask: (B, P + T).
            gradient_pass: attention kernel of a gradient pass or not (default: whether
                gradients are on; `ucai.hardware.training_attention`).
        Returns:
            (B, T, H): entry t is the state after reading token P + t - 1, i.e. before
            response token t (what the logits for token t and V_t are computed from).
        """
        causal = self._causal_lm()
        decoder = getattr(causal, causal.base_model_prefix)
        packed = None
        if self.pack_shared_prompts and attention_takes_4d_mask(causal.config):
            if self._packer is None:
                pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
                self._packer = EpisodePacker(pad, PACKED_ROW_TOKENS)
            packed = self._packer(input_ids, attention_mask, prompt_length)
        if packed is not None:
            with training_attention(packed.ids, self.gradient_checkpointing, gradient_pass):
                return packed.response_states(packed_hidden(decoder, causal.config, packed.ids, packed.lengths))
        with training_attention(input_ids, self.gradient_checkpointing, gradient_pass):
            out = decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
            )
        # Contiguous: on a strided 3D slice and a frozen head, F.linear runs as a batched
        # matmul over a copy of the head per row (fp32, 8 x 48 rows of SmolLM2: 324 ms
        # against 185 ms, the same values).
        return out.last_hidden_state[:, prompt_length - 1 : -1].contiguous()

    def response_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits over the response positions, divided by the sampling
        temperature so that log-probs are those of the distribution that sampled."""
        logits = output_head(self._causal_lm())(hidden)  # with Gemma 2's final soft-capping
        if self.generation.do_sample and self.generation.temperature not in (None, 1.0):
            logits = logits / self.generation.temperature
        return logits

    def values_for(self, hidden: torch.Tensor | None, input_ids, attention_mask, prompt_length: int) -> torch.Tensor:
        """(B, T) float32 values; ``hidden`` is the policy's response hidden state (unused,
        and may be None, in ``adapter`` mode, which runs its own pass)."""
        if self.value_head_kind == "adapter":
            with self._adapter("value"):
                hidden = self.response_hidden(input_ids, attention_mask, prompt_length)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def sequence_logprobs(
        self, input_ids, attention_mask, prompt_length: int, reference: bool = False, gradient_pass: bool | None = None
    ) -> torch.Tensor:
        """(B, T) log-probs of the response tokens under the policy (or the reference:
        the same model with the adapter disabled, i.e. exactly the SL model)."""
        context = self.policy.disable_adapter() if reference else nullcontext()
        with context:
            hidden = self.response_hidden(input_ids, attention_mask, prompt_length, gradient_pass)
            return logprobs_from_logits(self.response_logits(hidden), input_ids[:, prompt_length:])

    # ------------------------------------------------------------------ step

    def training_step(self, batch: list[dict], batch_idx: int) -> None:
        start = time.perf_counter()
        fused = self.fuses_first_update(len(batch) * self.episodes_per_prompt)
        rollout = self.rollout(batch, policy_pass=not fused)
        update = self.ppo_update(rollout)
        seconds = time.perf_counter() - start

        mask = rollout.mask
        seq_kl = rollout.kl.sum(1)  # (B,)
        tokens = mask.sum()
        kl_coef = self.kl_ctl.value
        local = {
            "objective/scores": rollout.final_scores.mean(),
            "objective/raw_scores": rollout.scores.mean(),
            "objective/kl": seq_kl.mean(),
            "objective/rlhf_reward": (rollout.final_scores - kl_coef * seq_kl).mean(),
            # Sampled estimate: the mean of -log p over tokens drawn from p is the entropy.
            "objective/entropy": (-(rollout.logprobs * mask).sum(1)).mean(),
            "response/length": mask.sum(1).mean(),
            "response/eos_fraction": rollout.finished.float().mean(),
            **{key: torch.tensor(value) for key, value in update.items() if "/" in key},
        }
        if rollout.values is not None:
            local["val/mean"] = masked_mean(rollout.values, mask)
        if rollout.engine_logprobs is not None:
            local["rollout/kl_engine_model"] = engine_model_kl(rollout.engine_logprobs, rollout.logprobs, mask)
        keys = list(local)
        stacked = torch.stack([torch.as_tensor(local[k], dtype=torch.float32).to(self.device) for k in keys])
        reduced = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        metrics = {k: float(v) for k, v in zip(keys, reduced, strict=True)}
        world = self.trainer.world_size
        total_tokens = float(self.trainer.strategy.reduce(tokens.to(self.device), reduce_op="sum"))
        metrics["perf/tokens_per_s"] = total_tokens / max(seconds, 1e-9)
        metrics["perf/episodes_per_s"] = rollout.size * world / max(seconds, 1e-9)
        metrics["objective/kl_coef"] = kl_coef
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            metrics["lr"] = scheduler.get_last_lr()[0]
        self.kl_ctl.update(metrics["objective/kl"], rollout.size * world)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=rollout.size)
        self.log("score", metrics["objective/scores"], prog_bar=True, logger=False, batch_size=rollout.size)
        self.log("kl", metrics["objective/kl"], prog_bar=True, logger=False, batch_size=rollout.size)
        self.last_stats = {**metrics, **{k: v for k, v in update.items() if "/" not in k}}
        self._write_rollouts(rollout, seq_kl, kl_coef)
        self.rollout_step += 1

    def _write_rollouts(self, rollout: Rollout, seq_kl: torch.Tensor, kl_coef: float) -> None:
        rows = rollout_rows(rollout, self.rollout_step, seq_kl, kl_coef)
        rows = rows_from_all_ranks(rows)  # a collective: every rank takes part
        if self.trainer.is_global_zero and self._rollouts_path is not None:
            append_rollout_rows(self._rollouts_path, rows)

    # ------------------------------------------------------------------ optimiser

    def updates_per_batch(self) -> int:
        """Optimiser steps per rollout batch: ``ppo_epochs`` passes over its episodes
        (the datamodule's prompts, times ``rloo_k`` under RLOO) in minibatches."""
        prompts = getattr(getattr(self._trainer, "datamodule", None), "batch_size", None)
        episodes = prompts * self.episodes_per_prompt if prompts else self.minibatch_size
        return self.ppo_epochs * math.ceil(episodes / self.minibatch_size)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self._trainable, lr=self.learning_rate, weight_decay=self.weight_decay)
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps  # already in optimiser steps
        elif trainer is not None:
            total = int(trainer.estimated_stepping_batches) * self.updates_per_batch()
        else:
            total = 1
        scheduler = warmup_then_decay(optimizer, self.warmup_steps, total, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": per_step(scheduler)}

    # ------------------------------------------------------------------ checkpoints

    def configure_callbacks(self):
        # RNG states in checkpoints: a resumed run samples the rollouts the
        # uninterrupted run would have.
        return [RNGStateCheckpoint()]

    @staticmethod
    def is_trainable_key(key: str) -> bool:
        return ".lora_" in key or key.startswith("value_head.")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base (and nothing else) is dropped: it is reloaded from `policy`.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.is_trainable_key(k)}
        checkpoint[PPO_STATE_KEY] = {"kl_controller": self.kl_ctl.state_dict(), "rollout_step": self.rollout_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(PPO_STATE_KEY)
        if state is None:
            raise UcaiError("checkpoint has no PPO state; was it written by PPOModule?")
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.rollout_step = int(state["rollout_step"])

    # ------------------------------------------------------------------ export

    def full_policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's full peft state dict on every rank (gathered when sharded)."""
        if sharded_by_fsdp(self.trainer):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach() for k, v in self.policy.state_dict().items()}

    def merged_policy(self, state: dict[str, torch.Tensor] | None = None):
        """A fresh copy of the base model with the policy adapter folded in."""
        from ucai.models import load_causal_lm

        state = self.full_policy_state() if state is None else state
        # The trainer's weight dtype: the bf16 frozen linears are merged into its originals.
        dtype = torch.float32 if self._frozen_cast else next(iter(state.values())).dtype
        model = load_causal_lm(self.policy_name, dtype=dtype, trust_remote_code=self.trust_remote_code, seed=self.seed)
        return load_merged(
            model, state, POLICY_ADAPTER, lora_scaling(self.policy, POLICY_ADAPTER), full_precision_base=self._frozen_cast
        )

    def on_fit_end(self) -> None:
        self._sampler = None  # no more rollouts: free the sampling copy before the export
        if not self.export:
            return
        state = self.full_policy_state()  # collective under FSDP: every rank takes part
        if self.trainer.is_global_zero:
            model = self.merged_policy({k: v.to("cpu") for k, v in state.items()})
            save_pretrained_atomic(
                self.output_dir,
                model,
                tokenizer_for_export(self.tokenizer, self.system_prompt),  # its template defaults to the trained prompt
                extra_files={
                    "ucai_ppo.json": {
                        "ucai_version": ucai_version(),
                        "advantage": self.advantage,  # which estimator made this model: gae (PPO) or rloo
                        "policy": self.policy_name,
                        "system_prompt": self.system_prompt,
                        "reward_model": self.reward_model_name,
                        "rollout_steps": self.rollout_step,
                        "kl_coef": self.kl_ctl.value,
                    }
                },
            )
            log.info("PPO policy written to %s", self.output_dir)
        del state
        self.trainer.strategy.barrier("ucai-ppo-saved")



_AFTER_STEP_ADVICE = "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization"


class PPOCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, with the same options and files, for PPO configs.

    PPO optimises manually (several updates per rollout batch). For a manually optimised
    module, ModelCheckpoint's step-based save warns that the checkpoint holds the state
    after the optimiser step and advises snapshotting the weights before it. For PPO the
    state after the updates is the right one: it is what a resumed run continues from
    (``tests/test_resume.py``), so here, and only here, that advice is left out.
    """

    def on_train_batch_end(self, *args, **kwargs) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape(_AFTER_STEP_ADVICE), category=UserWarning)
            super().on_train_batch_end(*args, **kwargs)
