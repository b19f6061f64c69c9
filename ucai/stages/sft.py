"""Supervised fine-tuning (the "SL" model of Constitutional AI) with LoRA or QLoRA.

    ucai fit --config configs/sft_ethical.yaml
    ucai fit --config configs/sft_ethical.yaml --config configs/strategies/ddp.yaml
    ucai fit --config configs/sft_ethical.yaml --ckpt_path last        # resume

Trains on the revisions written by the critique-revision stage (`SFTDataModule`): the
loss is the mean cross-entropy over response tokens and their end-of-turn token. At the
end of fit, rank 0 writes ``output_dir/adapter`` (peft), the merged model in Hugging Face
format and the tokenizer with its chat template to ``output_dir``, and records that path
in the run's log folder (``exported_model.json``).

Design choices that matter for speed and memory:
* logits are computed only at positions that have a label: the output head (576 x 49152
  for SmolLM2) and the softmax over the vocabulary dominate a small model's step, and
  most positions are prompt;
* the model is built in ``configure_model``, so FSDP/DeepSpeed can shard it as it is
  created, and its dtype follows the trainer's precision;
* Lightning checkpoints hold only the trainable weights (adapter, or everything under
  full fine-tuning) plus optimizer state, so ``--ckpt_path last`` resumes in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F

from ucai.chat import tokenizer_for_export
from ucai.data.io import atomic_output, require_writable
from ucai.data.sft_data import IGNORE_INDEX
from ucai.errors import UcaiError
from ucai.gather import share_of_global_mean
from ucai.hardware import training_attention
from ucai.lr_schedule import Schedule, per_step, warmup_then_decay
from ucai.models import LoraSettings, enable_activation_checkpointing
from ucai.provenance import ucai_version
from ucai.uniform_dropout import use_uniform_dropout
from ucai.value_ranges import (
    ClosedUnitInterval,
    FractionBelowOne,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
)

log = logging.getLogger(__name__)


def check_quantization(quantization: str | None) -> None:
    """Fail before any data or weights are read when QLoRA cannot run here."""
    if quantization is None:
        return
    if quantization != "nf4":
        raise UcaiError(f"model.init_args.quantization: unknown value {quantization!r}; the only option is 'nf4'")
    if not torch.cuda.is_available():
        raise UcaiError(
            "model.init_args.quantization 'nf4' (QLoRA) needs a CUDA GPU for bitsandbytes 4-bit "
            "weights and none is available; remove it to train LoRA in full precision"
        )


def response_token_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, reduction: str = "mean"
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on labelled positions only.

    Args:
        hidden: (B, L, H) final hidden states.
        labels: (B, L) token ids, -100 where there is no target (prompt, padding).
        head: the output projection H -> V.
        reduction: ``mean`` over labelled tokens or ``sum``.
    Returns:
        (loss scalar, number of labelled tokens N). Position t predicts labels[t + 1];
        only the N positions whose next label is set go through the head, as an (N, V)
        float32 logit matrix instead of (B, L, V).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        # Keep the graph connected so DDP's gradient sync sees every parameter.
        return hidden.sum() * 0.0, 0
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction=reduction), count


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a causal LM on prompt/response pairs.

    Args:
        model: base model (alias, local folder or Hugging Face id).
        output_dir: where the merged model, tokenizer and ``adapter/`` are written at the
            end of fit.
        lora: LoRA settings (rank, alpha, dropout, target modules); null fine-tunes all
            weights (small models only).
        quantization: ``nf4`` loads the base weights in 4 bits (QLoRA, CUDA only).
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay on the trainable weights.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warm-up (overrides ``warmup_ratio``).
        warmup_ratio: warm-up as a share of all optimizer steps, when ``warmup_steps`` is null.
        schedule: ``cosine``, ``linear`` or ``constant`` after warm-up.
        min_lr_ratio: final learning rate as a share of the peak.
        gradient_checkpointing: recompute activations in backward (less memory, slower).
        frozen_linear_bf16: under ``bf16-mixed``, hold the frozen linear weights (LoRA's
            base layers) in bf16. Autocast rounds them to bf16 for every matmul anyway, so
            no result changes; it halves the memory of those weights (a 7B model's
            frozen base: ~13 GiB instead of ~26) and stops autocast casting them again at
            every forward (it caches casts only of weights that require grad). On the
            2-core native-bf16 CPU the experiment's SFT epoch took the same time either
            way (1:26 and 1:30, both sides at once). The export merges the adapter into
            the base re-read at full precision. Skipped under FSDP (one dtype per flat
            parameter).
        export: write the adapter and merged model at the end of fit.
        seed: weight seed of the random-init ``tiny-llama`` (tests).
        trust_remote_code: allow custom model code from the hub (off unless you ask).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        output_dir: str = "lightning_logs/models/ethical/sl_model",
        lora: LoraSettings | None = LoraSettings(),
        quantization: Literal["nf4"] | None = None,
        learning_rate: PositiveFloat = 2e-4,
        weight_decay: NonNegativeFloat = 0.0,
        betas: tuple[FractionBelowOne, FractionBelowOne] = (0.9, 0.999),
        warmup_steps: NonNegativeInt | None = None,
        warmup_ratio: ClosedUnitInterval = 0.03,
        schedule: Schedule = "cosine",
        min_lr_ratio: ClosedUnitInterval = 0.0,
        gradient_checkpointing: bool = False,
        frozen_linear_bf16: bool = True,
        export: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        # LoraSettings is stored as a plain dict: checkpoints load with weights_only=True,
        # which refuses arbitrary classes.
        self.save_hyperparameters(ignore=["lora"])
        self.hparams["lora"] = None if lora is None else dataclasses.asdict(lora)
        self.model_name = model
        require_writable(output_dir, "--model.init_args.output_dir", folder=True)
        self.output_dir = output_dir
        self.lora = lora
        self.quantization = quantization
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.schedule = schedule
        self.min_lr_ratio = min_lr_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.frozen_linear_bf16 = frozen_linear_bf16
        self.export = export
        self.seed = seed
        self.trust_remote_code = trust_remote_code
        self.lm = None
        self.tokenizer = None
        self._trainable_keys: set[str] = set()
        # Checkpoints hold only the trainable weights; the frozen base comes from `model`.
        self.strict_loading = False
        self._last_batch_end: float | None = None
        self._val_sum = 0.0
        self._val_count = 0

    # ------------------------------------------------------------------ model

    def prepare_data(self) -> None:
        # The first hook of fit, before the data module tokenises anything: a QLoRA run
        # on a machine without CUDA stops here, in a second.
        check_quantization(self.quantization)

    def configure_model(self) -> None:
        if self.lm is not None:
            return
        from ucai.models import (
            cast_frozen_linear,
            dtype_from_precision,
            holds_frozen_linears_in_bf16,
            refuse_half_precision_training,
            trainer_precision,
        )

        refuse_half_precision_training(self, "sft")
        check_quantization(self.quantization)
        if self.quantization and self._trainer is not None and self.trainer.accelerator.__class__.__name__ != "CUDAAccelerator":
            raise UcaiError("model.init_args.quantization 'nf4' needs trainer.accelerator gpu/cuda")
        dtype = dtype_from_precision(trainer_precision(self))
        self.tokenizer = self.load_tokenizer()
        lm = self.load_base_model(dtype)
        lm.config.use_cache = False  # training: no KV cache (and packed rows need none)
        if self.quantization:
            from peft import prepare_model_for_kbit_training

            lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=self.gradient_checkpointing)
        elif self.gradient_checkpointing:
            enable_activation_checkpointing(lm)
        if self.lora is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, self.lora.to_peft("CAUSAL_LM"))
            use_uniform_dropout(lm)
        if holds_frozen_linears_in_bf16(self, self.frozen_linear_bf16, dtype):
            cast_frozen_linear(lm, torch.bfloat16)
        # from_pretrained returns eval mode and Lightning keeps each module's mode, which
        # would leave gradient checkpointing (training-only) and dropout silently off.
        self.lm = lm.train()
        self._trainable_keys = {f"lm.{name}" for name, p in lm.named_parameters() if p.requires_grad}
        trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        total = sum(p.numel() for p in lm.parameters())
        log.info("SFT %s: %d of %d parameters trainable (%.2f%%)", self.model_name, trainable, total, 100 * trainable / total)

    def load_tokenizer(self):
        from ucai.models import load_tokenizer

        return load_tokenizer(self.model_name, padding_side="right", trust_remote_code=self.trust_remote_code)

    def load_base_model(self, dtype: torch.dtype):
        """The causal LM before LoRA, in ``dtype`` (a subclass may build it another way)."""
        from ucai.models import load_causal_lm

        return load_causal_lm(
            self.model_name,
            dtype=dtype,
            quantization=self.quantization,
            trust_remote_code=self.trust_remote_code,
            seed=self.seed,
        )

    def _causal_lm(self):
        """The transformers model under the peft wrapper (LoRA layers are inside it)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward_loss(self, batch: dict[str, Any], reduction: str = "mean") -> tuple[torch.Tensor, int]:
        """Loss over the response tokens of a batch; see `response_token_loss`."""
        causal_lm = self._causal_lm()
        config = causal_lm.config
        if getattr(config, "final_logit_softcapping", None) or not hasattr(causal_lm, "get_decoder"):
            # Models that transform logits after the head: use their own forward.
            out = self.lm(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
                use_cache=False,
            )
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE_INDEX
            logits = out.logits[:, :-1][keep].float()
            return F.cross_entropy(logits, targets[keep], reduction=reduction), int(keep.sum())
        with training_attention(batch["input_ids"], self.gradient_checkpointing):
            hidden = causal_lm.get_decoder()(
                input_ids=batch["input_ids"],
                attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"),
                use_cache=False,
            ).last_hidden_state
        return response_token_loss(hidden, batch["labels"], causal_lm.get_output_embeddings(), reduction)

    # ------------------------------------------------------------------ steps

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._last_batch_end is None:
            self._last_batch_end = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, count = self.forward_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=max(count, 1))
        self.log("train/perplexity", torch.exp(loss.detach().clamp(max=30)), batch_size=max(count, 1))
        self.log("train/response_tokens", float(count), reduce_fx="sum", batch_size=1)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            self.log("train/lr", scheduler.get_last_lr()[0], batch_size=1)
        # Under DDP each rank's mean counts by its share of the step's response tokens:
        # the averaged gradient is the mean over every rank's tokens, as in one process.
        return loss * share_of_global_mean(count, loss.device)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Wall time between batch ends includes data loading and the optimizer step.
        now = time.perf_counter()
        elapsed = now - (self._last_batch_end or now)
        self._last_batch_end = now
        if elapsed > 0:
            self.log("train/tokens_per_s", batch["num_tokens"] / elapsed, prog_bar=True, batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = 0.0, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss_sum, count = self.forward_loss(batch, reduction="sum")
        self._val_sum += float(loss_sum)
        self._val_count += count

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole validation set and every rank.
        totals = torch.tensor([self._val_sum, float(self._val_count)], device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if float(totals[1]) > 0:
            loss = totals[0] / totals[1]
            # Already the same on every rank; sync_dist only keeps Lightning from warning.
            self.log("val/loss", loss, prog_bar=True, sync_dist=True)
            self.log("val/perplexity", torch.exp(loss.clamp(max=30)), sync_dist=True)
        self._last_batch_end = None  # validation time is not training throughput

    def configure_callbacks(self):
        # LoRA dropout draws from the global RNG: a resumed run must draw what the
        # uninterrupted one would have.
        from ucai.resume import RNGStateCheckpoint

        return [RNGStateCheckpoint()]

    # ------------------------------------------------------------------ optimizer

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise UcaiError("SFT has no trainable parameters; check model.init_args.lora.target_modules")
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay, betas=self.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_ratio * total)
        scheduler = warmup_then_decay(optimizer, warmup, total, self.schedule, self.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": per_step(scheduler)}

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen base is rebuilt from `model` on resume; storing it would make every
        # checkpoint the size of the model.
        state = checkpoint.get("state_dict")
        if state is not None and self._trainable_keys:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in self._trainable_keys}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict") or {}
        missing = self._trainable_keys - set(state)
        if self._trainable_keys and missing:
            raise UcaiError(
                f"checkpoint does not match this model: {len(missing)} trainable weight(s) missing "
                f"(e.g. {sorted(missing)[0]}); was it written with other LoRA settings?"
            )

    # ------------------------------------------------------------------ export

    def _load_base(self):
        from ucai.models import load_causal_lm

        # Merged in float32 on CPU, then stored in the training dtype's storage type.
        return load_causal_lm(self.model_name, dtype=torch.float32, trust_remote_code=self.trust_remote_code, seed=self.seed)

    def on_fit_end(self) -> None:
        if not self.export or self.lm is None:
            return
        trainer = self.trainer
        # A collective under FSDP (full weights gathered to rank 0); a plain state_dict otherwise.
        full = trainer.strategy.lightning_module_state_dict()
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if trainer.logger is None:  # no run folder: log_dir would be the cwd
            log_dir = None
        if trainer.is_global_zero:
            state = {k[len("lm.") :]: v.detach().cpu() for k, v in full.items() if k in self._trainable_keys}
            self.export_model(state, log_dir=log_dir)
        trainer.strategy.barrier("sft_export")

    def export_model(self, trainable_state: dict[str, torch.Tensor] | None = None, log_dir: str | None = None) -> Path:
        """Write adapter + merged model + tokenizer to ``output_dir``; note it in the log dir."""
        from ucai.stages.lora_io import export_full_model, export_lora_model

        output_dir = Path(self.output_dir)
        # The data module rendered every training prompt with it: the exported template
        # defaults to it, so the model answers as trained without being told it.
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        system_prompt = getattr(datamodule, "system_prompt", None)
        tokenizer = tokenizer_for_export(self.tokenizer, system_prompt)
        info = {
            "stage": "sft",
            "ucai_version": ucai_version(),
            "base_model": self.model_name,
            "system_prompt": system_prompt,
            "global_step": int(self.trainer.global_step) if self._trainer is not None else None,
            "lora": None if self.lora is None else {
                "r": self.lora.r, "alpha": self.lora.alpha, "dropout": self.lora.dropout,
                "target_modules": self.lora.target_modules,
            },
        }
        extra = {"ucai_sft.json": info}
        if self.lora is not None:
            export_lora_model(
                self.lm, tokenizer, output_dir, extra_files=extra, base_loader=self._load_base, state_dict=trainable_state
            )
        else:
            state = trainable_state
            if state is not None:
                state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
            export_full_model(self._causal_lm(), tokenizer, output_dir, extra_files=extra, state_dict=state)
        log.info("SFT model written to %s (adapter in %s/adapter)", output_dir, output_dir)
        if log_dir:
            with atomic_output(Path(log_dir) / "exported_model.json") as handle:
                handle.write(json.dumps({**info, "output_dir": str(output_dir.resolve())}, indent=2) + "\n")
        return output_dir
