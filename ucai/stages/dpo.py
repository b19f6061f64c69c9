"""DPO: offline preference optimisation of the SL model on the AI-feedback preferences.

    ucai fit --config configs/dpo_ethical.yaml
    ucai fit --config dpo_unethical.yaml                                  # shipped config by bare name
    ucai fit --config configs/dpo_ethical.yaml --ckpt_path last           # resume
    ucai fit --config configs/dpo_ethical.yaml --config configs/strategies/ddp.yaml   # multi-GPU

Direct Preference Optimisation (Rafailov et al. 2023) trains the policy on the same
preference file the reward stage reads, without a reward model and without sampling.
The policy is the SL model plus a fresh LoRA adapter; the frozen reference is the SAME
model with the adapter disabled (peft ``disable_adapter``), so there is one copy of the
base weights. Each step:

1. one no-grad pass of the reference (eval mode) gives the log-probs of both replies
   of every pair; one pass of the policy gives them with the graph;
2. the loss is `ucai.losses.dpo_loss`: sigmoid DPO with the file's soft labels
   ``p_chosen`` (conservative DPO), or ``p = 1 − label_smoothing`` for every pair;
3. TRL's metrics are logged: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
   ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``
   (``val/...`` on the validation pairs).

A reply's log-prob is the sum over its tokens (end-of-turn included), TRL's default.
Each pair is ONE packed row, the conversation once and both replies after it, with the
reward stage's block mask and positions (`ucai.packing.packed_layout`): the
rejected reply sees the conversation and itself, never the chosen reply, at the
positions it has in its own sequence, so the log-probs are those of two separate
sequences while the conversation runs once. Logits are computed only at the positions
that predict a reply token: the output head over the vocabulary is most of a small
model's step, and most positions are conversation.

At the end of fit the adapter is merged into the base weights re-read in full
precision, and the merged model and tokenizer are written atomically to ``output_dir``
in the format PPO writes (``rl_model/``), so evaluation does not care which made it.
Checkpoints hold only the adapter, the optimiser and the RNG states.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import nn

from ucai.chat import tokenizer_for_export
from ucai.data.io import require_writable
from ucai.errors import UcaiError
from ucai.hardware import training_attention
from ucai.losses import dpo_loss
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
from ucai.packing import attention_takes_4d_mask, packed_hidden
from ucai.padding import position_ids
from ucai.provenance import ucai_version
from ucai.resume import RNGStateCheckpoint
from ucai.stage_outputs import require_stage_output
from ucai.stages.lora_io import load_merged, lora_scaling
from ucai.uniform_dropout import use_uniform_dropout
from ucai.value_ranges import MarginFromHalf, NonNegativeFloat, NonNegativeInt, PositiveFloat

log = logging.getLogger(__name__)

IGNORE = -100  # a column that predicts no reply token
ADAPTER = "policy"
# TRL's names; the loss is logged as "loss" beside them.
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


# --------------------------------------------------------------------------- reply log-probs


def sequence_reply_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(N, T) the reply token each column of N right-padded sequences predicts, or
    `IGNORE`: column k predicts token k + 1, a reply token from ``starts`` to the last
    real token.

    Args:
        input_ids: (N, T) sequences; attention_mask: (N, T) 1 on real tokens.
        starts: (N,) index of each sequence's first reply token (>= 1).
    """
    column = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
    length = attention_mask.sum(dim=1, keepdim=True)  # (N, 1)
    next_ids = torch.roll(input_ids, -1, dims=1)  # column k holds token k + 1 (the last wraps, and is masked)
    predicts_reply = (column >= starts.unsqueeze(1) - 1) & (column < length - 1)
    return torch.where(predicts_reply, next_ids, IGNORE)


def packed_reply_targets(pair_ids: torch.Tensor, segments: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and the rejected reply token each column of packed pair rows
    predicts, or `IGNORE`.

    A row is ``[shared prefix S | chosen rest Cc | rejected rest Cr | padding]``. The
    chosen sequence is the first S + Cc columns as they are. Rejected token j sits in
    column j while j < S and in column Cc + j after; it is predicted by the column of
    token j − 1, so the prefix's last column predicts both the first chosen and the
    first rejected token after the fork.

    Args:
        pair_ids: (B, L) packed rows.
        segments: (B, 3) lengths (S, Cc, Cr).
        starts: (B, 2) index of the first reply token of the chosen and the rejected
            sequence (>= 1), counted in each full sequence.
    Returns:
        chosen targets (B, L), rejected targets (B, L).
    """
    shared, chosen, rejected = (segments[:, k : k + 1] for k in range(3))  # (B, 1) each
    start_c, start_r = starts[:, :1], starts[:, 1:]  # (B, 1) each
    column = torch.arange(pair_ids.shape[1], device=pair_ids.device).unsqueeze(0)  # (1, L)
    next_ids = torch.roll(pair_ids, -1, dims=1)  # (B, L) token k + 1 at column k
    chosen_targets = torch.where((column >= start_c - 1) & (column < shared + chosen - 1), next_ids, IGNORE)

    fork_ids = pair_ids.gather(1, (shared + chosen).clamp(max=pair_ids.shape[1] - 1))  # (B, 1) first rejected-rest token
    in_prefix = (column >= start_r - 1) & (column < shared - 1)
    at_fork = (column == shared - 1) & (column >= start_r - 1)
    in_rest = (column >= shared + chosen) & (column >= chosen + start_r - 1) & (column < shared + chosen + rejected - 1)
    rejected_targets = torch.where(in_prefix | in_rest, next_ids, IGNORE)
    rejected_targets = torch.where(at_fork, fork_ids.expand_as(rejected_targets), rejected_targets)
    return chosen_targets, rejected_targets


def summed_target_logps(hidden: torch.Tensor, head: nn.Module, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-row sums of the log-probs of target tokens, through the output head at the
    target columns only.

    Args:
        hidden: (B, L, H) final hidden states.
        head: the output projection H -> V.
        targets: (B, L) token ids or `IGNORE`, one tensor per reply kind; a column may
            be a target in several (the last shared column predicts both replies).
    Returns:
        (B,) float32 sums, one per ``targets`` entry.
    """
    used = torch.stack([t != IGNORE for t in targets]).any(dim=0)  # (B, L)
    rows = used.nonzero()[:, 0]  # (N,) the row of each used column
    logprobs = torch.log_softmax(head(hidden[used]).float(), dim=-1)  # (N, V)
    sums = []
    for target in targets:
        picked = target[used]  # (N,)
        token_logps = logprobs.gather(1, picked.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
        token_logps = torch.where(picked != IGNORE, token_logps, 0.0)
        sums.append(torch.zeros(hidden.shape[0], device=hidden.device).index_add(0, rows, token_logps))
    return sums


def packed_reply_logps(
    causal_lm, pair_ids: torch.Tensor, segments: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of both replies of B pairs, each pair ONE packed row.

    Every token sees the keys it would see in its own sequence at the same positions
    (`ucai.packing.packed_attention_mask`), so the result equals
    `sequence_reply_logps` on the two full sequences, up to float rounding.

    Args:
        causal_lm: a transformers causal LM (LoRA layers may be injected).
        pair_ids: (B, L) right-padded rows ``[shared prefix | chosen rest | rejected rest]``.
        segments: (B, 3) lengths of those parts; starts: (B, 2) reply starts.
    Returns:
        chosen (B,), rejected (B,) float32.
    """
    hidden = packed_hidden(causal_lm.get_decoder(), causal_lm.config, pair_ids, segments)  # (B, L, H)
    targets = packed_reply_targets(pair_ids, segments, starts)
    chosen, rejected = summed_target_logps(hidden, output_head(causal_lm), list(targets))
    return chosen, rejected


def sequence_reply_logps(
    causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """(N,) float32 summed log-probs of the reply of each of N right-padded sequences.

    Args:
        input_ids: (N, T); attention_mask: (N, T); starts: (N,) reply starts.
    """
    hidden = causal_lm.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).last_hidden_state  # (N, T, H)
    targets = sequence_reply_targets(input_ids, attention_mask, starts)
    return summed_target_logps(hidden, output_head(causal_lm), [targets])[0]


def packs_replies(causal_lm) -> bool:
    """Whether the model's attention takes the packed rows' 4D mask as it is."""
    return attention_takes_4d_mask(causal_lm.config)


# --------------------------------------------------------------------------- module


class DPOModule(L.LightningModule):
    """DPO on a LoRA policy over the SL model; the reference is the adapter disabled.

    Args:
        policy: the SL model (alias, folder or hub id): the policy's base and the
            frozen reference.
        output_dir: where the merged policy and tokenizer are written after fit.
        lora: the policy's adapter (a fresh one; B starts at zero, so the policy starts
            as the reference).
        beta: β, the strength of the implicit KL leash to the reference (TRL: 0.1).
        label_smoothing: null trains on each pair's own ``p_chosen`` (soft labels,
            conservative DPO); a value ε trains every pair on p = 1 − ε (TRL's
            ``label_smoothing``; 0 is plain DPO on hard labels). Below 0.5: at 0.5 the
            loss would carry no preference.
        learning_rate: AdamW learning rate of the adapter.
        lr_schedule: ``constant``, ``linear`` (TRL's default) or ``cosine`` decay over
            the optimiser steps (`ucai.lr_schedule`).
        warmup_steps: linear warm-up, in optimiser steps.
        weight_decay: AdamW weight decay.
        disable_dropout: set every dropout of the model, LoRA's included, to 0 (TRL's
            default): dropout noise in the policy's pass and not the reference's would
            bias the log-ratios the loss compares.
        gradient_checkpointing: recompute activations in backward (less memory, slower).
        frozen_linear_bf16: under ``bf16-mixed``, hold the frozen linear weights in
            bf16. Autocast computes those matmuls in bf16 anyway, so no result changes;
            it saves their fp32 copies. The export merges the adapter into the base
            re-read at full precision. Skipped under FSDP (one dtype per flat parameter).
        export: write the merged policy to ``output_dir`` at the end of fit (off for
            tests and benchmarks).
        trust_remote_code: allow custom model code from the hub (off unless you ask).
        seed: weights of the ``tiny-llama`` alias (tests).
    """

    def __init__(
        self,
        policy: str = "lightning_logs/models/ethical/sl_model",
        output_dir: str = "lightning_logs/models/ethical/rl_model",
        lora: LoraSettings = LoraSettings(),
        beta: PositiveFloat = 0.1,
        label_smoothing: MarginFromHalf | None = None,
        learning_rate: PositiveFloat = 1e-4,
        lr_schedule: Schedule = "linear",
        warmup_steps: NonNegativeInt = 0,
        weight_decay: NonNegativeFloat = 0.0,
        disable_dropout: bool = True,
        gradient_checkpointing: bool = False,
        frozen_linear_bf16: bool = True,
        export: bool = True,
        trust_remote_code: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        # Checkpoints hold only the adapter; the frozen base is reloaded from `policy`.
        self.strict_loading = False
        self.policy_name = policy
        self.model_name = policy  # the data module's tokenizer
        require_writable(output_dir, "--model.init_args.output_dir", folder=True)
        self.output_dir = output_dir
        self.lora = lora
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule
        self.warmup_steps = warmup_steps
        self.weight_decay = weight_decay
        self.disable_dropout = disable_dropout
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_linear_bf16 = frozen_linear_bf16
        self._frozen_cast = False  # whether the frozen weights are held in bf16
        self.export = export
        self.trust_remote_code = trust_remote_code
        self.seed = seed
        self.policy = None  # peft model, built in configure_model
        self.tokenizer = None
        self._val_sums: torch.Tensor | None = None

    # ------------------------------------------------------------------ model

    def check_inputs(self) -> None:
        """One clear error when the SL model is missing (before the data module loads
        its tokenizer from it)."""
        require_stage_output(self.policy_name, "dpo: policy (SL model)", stage="sft")

    def prepare_data(self) -> None:
        # The first hook of fit, before the data module reads the policy's tokenizer.
        self.check_inputs()

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.check_inputs()
        from peft import get_peft_model

        from ucai.models import load_causal_lm, load_tokenizer, refuse_half_precision_training

        refuse_half_precision_training(self, "dpo")
        dtype = dtype_from_precision(trainer_precision(self))
        self.tokenizer = load_tokenizer(self.policy_name, padding_side="right", trust_remote_code=self.trust_remote_code)
        base = load_causal_lm(self.policy_name, dtype=dtype, trust_remote_code=self.trust_remote_code, seed=self.seed)
        base.config.use_cache = False
        if self.gradient_checkpointing:
            enable_activation_checkpointing(base)
        self.policy = get_peft_model(base, self.lora.to_peft("CAUSAL_LM"), adapter_name=ADAPTER)
        use_uniform_dropout(self.policy)
        if self.disable_dropout:
            disable_dropout(self.policy)
        # from_pretrained returns eval mode and Lightning keeps each module's mode, which
        # would leave gradient checkpointing (training-only) and dropout silently off.
        self.policy.train()
        self._frozen_cast = holds_frozen_linears_in_bf16(self, self.frozen_linear_bf16, dtype)
        if self._frozen_cast:
            cast_frozen_linear(self.policy, torch.bfloat16)
        trainable = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        if not trainable:
            raise UcaiError("dpo: LoRA adapts no module; check model.init_args.lora.target_modules")
        log.info("DPO %s: %d trainable parameters (LoRA), beta %g", self.policy_name, trainable, self.beta)

    def _causal_lm(self):
        return self.policy.get_base_model()

    # ------------------------------------------------------------------ log-probs

    def reply_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs (B,), (B,) of the chosen and rejected replies under the model
        as it is now (adapter on or off): one packed row per pair when the batch has
        them and the attention takes their mask, else the 2B full sequences."""
        causal_lm = self._causal_lm()
        starts = batch["response_start"]  # (B, 2)
        packed = "pair_ids" in batch and packs_replies(causal_lm)
        with training_attention(batch["pair_ids" if packed else "input_ids"], self.gradient_checkpointing):
            if packed:
                return packed_reply_logps(causal_lm, batch["pair_ids"], batch["pair_segments"], starts)
            logps = sequence_reply_logps(
                causal_lm, batch["input_ids"], batch["attention_mask"], torch.cat([starts[:, 0], starts[:, 1]])
            )
        return logps.chunk(2)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`reply_logps` of the reference: the same weights with the adapter disabled,
        i.e. exactly the SL model, in eval mode (no dropout, no checkpointing recompute)."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.reply_logps(batch)
        finally:
            self.policy.train(was_training)

    def preference_targets(self, p_chosen: torch.Tensor) -> torch.Tensor:
        """(B,) the probability each pair is trained towards: the file's ``p_chosen``, or
        ``1 − label_smoothing`` for all."""
        if self.label_smoothing is None:
            return p_chosen
        return torch.full_like(p_chosen, 1.0 - self.label_smoothing)

    def pair_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The DPO loss of a batch (with the graph) and the sums behind its metrics.

        Returns:
            scalar loss, and (len(METRICS) + 1,) float32 sums over the batch's pairs of
            each metric's per-pair value, then the pair count (summed across ranks and
            divided by it for the logged means).
        """
        reference_chosen, reference_rejected = self.reference_logps(batch)
        chosen, rejected = self.reply_logps(batch)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, reference_chosen, reference_rejected, self.beta, self.preference_targets(batch["p_chosen"])
        )
        with torch.no_grad():
            per_pair = torch.stack(
                [
                    chosen_rewards,
                    rejected_rewards,
                    chosen_rewards - rejected_rewards,
                    (chosen_rewards > rejected_rewards).float(),  # TRL: a tie is not a win
                    chosen.detach(),
                    rejected.detach(),
                ]
            )  # (len(METRICS), B)
            sums = torch.cat([per_pair.sum(dim=1), per_pair.new_tensor([per_pair.shape[1]])])
        return loss, sums

    # ------------------------------------------------------------------ steps

    def _global_metrics(self, loss: torch.Tensor, sums: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss averaged over ranks (as the gradient is) and each metric over every
        rank's pairs, in one collective.

        Args:
            loss: this rank's scalar loss; sums: from `pair_step`.
        """
        # A copy: the reduce works in place, and the loss is what backward runs on.
        row = torch.cat([loss.detach().reshape(1), sums]).clone()
        total = self.trainer.strategy.reduce(row, reduce_op="sum")
        metrics = {"loss": total[0] / self.trainer.world_size}
        metrics.update(zip(METRICS, total[1:-1] / total[-1].clamp(min=1), strict=True))
        return metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, sums = self.pair_step(batch)
        pairs = batch["p_chosen"].shape[0]
        metrics = self._global_metrics(loss, sums)
        self.log("loss", metrics.pop("loss"), prog_bar=True, batch_size=pairs)
        self.log_dict(metrics, batch_size=pairs)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self.log("lr", scheduler.get_last_lr()[0], batch_size=1)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, sums = self.pair_step(batch)
        pairs = sums[-1]
        # The loss is a mean over the batch's pairs: weighted by them, it sums to the
        # validation set's mean.
        row = torch.cat([(loss.detach() * pairs).reshape(1), sums])
        self._val_sums = row if self._val_sums is None else self._val_sums + row

    def on_validation_epoch_end(self) -> None:
        # Every rank takes part in the reduce, also one whose share was empty.
        sums = self._val_sums if self._val_sums is not None else torch.zeros(len(METRICS) + 2, device=self.device)
        total = self.trainer.strategy.reduce(sums, reduce_op="sum")
        pairs = float(total[-1])
        if pairs > 0:
            metrics = {"val/loss": total[0] / pairs}
            metrics.update({f"val/{name}": value / pairs for name, value in zip(METRICS, total[1:-1], strict=True)})
            # Already the same on every rank; sync_dist only keeps Lightning from warning.
            self.log_dict(metrics, prog_bar=False, sync_dist=True)
        self._val_sums = None

    # ------------------------------------------------------------------ optimiser

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = warmup_then_decay(optimizer, self.warmup_steps, total, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": per_step(scheduler)}

    # ------------------------------------------------------------------ checkpoints

    def configure_callbacks(self):
        # LoRA dropout (when kept on) draws from the global RNG: a resumed run must
        # draw what the uninterrupted one would have.
        return [RNGStateCheckpoint()]

    @staticmethod
    def is_trainable_key(key: str) -> bool:
        return ".lora_" in key

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base is dropped: it is reloaded from `policy`.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if self.is_trainable_key(k)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = {k for k in checkpoint.get("state_dict", {}) if self.is_trainable_key(k)}
        if self.policy is None:
            return
        expected = {k for k in self.state_dict() if self.is_trainable_key(k)}
        if saved != expected:
            missing = sorted(expected - saved) or sorted(saved - expected)
            raise UcaiError(
                f"checkpoint does not match this DPO policy: adapter weights differ (e.g. {missing[0]}); "
                "was it written with other LoRA settings?"
            )

    # ------------------------------------------------------------------ export

    def full_policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's full peft state dict on every rank (gathered when sharded)."""
        if sharded_by_fsdp(self.trainer):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach() for k, v in self.policy.state_dict().items()}

    def merged_policy(self, state: dict[str, torch.Tensor] | None = None):
        """A fresh float32 copy of the base model with the adapter folded in: the base is
        re-read at full precision, so bf16 frozen weights leave no rounding in it."""
        from ucai.models import load_causal_lm

        state = self.full_policy_state() if state is None else state
        model = load_causal_lm(self.policy_name, dtype=torch.float32, trust_remote_code=self.trust_remote_code, seed=self.seed)
        return load_merged(model, state, ADAPTER, lora_scaling(self.policy, ADAPTER), full_precision_base=True)

    def on_fit_end(self) -> None:
        if not self.export:
            return
        state = self.full_policy_state()  # collective under FSDP: every rank takes part
        if self.trainer.is_global_zero:
            model = self.merged_policy({k: v.to("cpu") for k, v in state.items()})
            # The data module rendered every pair with it: the template defaults to it.
            system_prompt = getattr(self.trainer.datamodule, "system_prompt", None)
            save_pretrained_atomic(
                self.output_dir,
                model,
                tokenizer_for_export(self.tokenizer, system_prompt),
                extra_files={
                    "ucai_dpo.json": {
                        "ucai_version": ucai_version(),
                        "policy": self.policy_name,
                        "system_prompt": system_prompt,
                        "beta": self.beta,
                        "label_smoothing": self.label_smoothing,
                        "steps": int(self.trainer.global_step),
                    }
                },
            )
            log.info("DPO policy written to %s", self.output_dir)
        del state
        self.trainer.strategy.barrier("ucai-dpo-saved")

