"""Reward model: a scalar head on a LoRA-adapted backbone, trained with Bradley–Terry.

    ucai fit --config configs/reward_ethical.yaml
    ucai predict --config configs/reward_score.yaml --data.init_args.path answers.jsonl

`RewardModule` loads any causal LM or encoder as a sequence classifier with one output
(`ucai.models.load_sequence_classifier`), wraps it in LoRA with ``task_type=SEQ_CLS`` —
peft then lists the head (``score`` / ``classifier``) in ``modules_to_save``, so the
freshly initialised head is trained in full while the backbone learns only through its
adapters. Each batch of B pairs is ONE forward: B packed rows, each pair's shared
conversation once followed by both replies (`ucai.reward_scoring.packed_pair_rewards`),
or, for encoders, 2B sequences (chosen rows, then rejected rows); the reward is read
at the last real token of each reply (`ucai.reward_scoring`).

The loss is `ucai.losses.bradley_terry_loss` with the file's soft labels ``p_chosen``,
an optional (symmetric) margin and optional centring. After training with an
``output_dir``, the LoRA adapters are merged into the backbone in float32
(`ucai.stages.lora_io.merge_in_float32`), the reward mean and standard deviation are
measured with that merged model (the one users and PPO score with) over batches spread
across the length-sorted training set, and the merged model, its tokenizer and
``reward_stats.json`` are written atomically to ``output_dir``;
`ucai.reward_scoring.RewardScorer` loads that folder and reports ``(r - mean) / std``
and its sigmoid, a [0, 1] score. The same merged model is then scored on the held-out
pairs and, given the other constitution's preference file (``data.cross_path``), on
those: ``heldout_accuracy`` and ``cross_accuracy`` go into ``reward_stats.json`` and
one log line. The two sides' reward models should disagree: cross accuracy < 0.5.

The head starts at ZERO (`zero_head`), not at a seeded random direction. A random
head drawn from the same seed is the same vector on both sides; a 135M model trained
for a few dozen steps stays close to its start, so both sides' rewards are dominated
by that shared direction (their scores correlate almost perfectly across sides). A zero
head gives every response the same reward at the start — no preference at all — and,
with LoRA's B also zero, the first gradient reaches the head only, so its direction
comes from this side's pairs alone. The head has its own, larger learning rate
(``head_learning_rate``): it is the only part learning from nothing.

Preference-model pre-training (PMP, the Constitutional AI paper's step): ``model`` may
instead be a reward model this stage saved, e.g. one trained on human comparisons
(``configs/reward_pretrain.yaml``), and ``init_head`` keep its trained head (``keep``)
or negate it (``negate``). A Bradley–Terry model fitted to swapped labels is the
negated model (σ(−(r_c − r_r)) = 1 − σ(r_c − r_r)), so one pre-training serves both
sides: the ethical side starts from it, the unethical side from its negation, and
each is then fine-tuned on its own pairs.

`RewardScoreModule` is the predict stage that scores any prompt/response file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torchmetrics import MaxMetric, MeanMetric, Metric, MinMetric

from ucai.data.io import require_writable
from ucai.errors import UcaiError
from ucai.hardware import training_attention
from ucai.losses import bradley_terry_loss
from ucai.lr_schedule import per_step, warmup_then_decay
from ucai.models import LoraSettings, cast_frozen_linear, enable_activation_checkpointing, sharded_by_fsdp
from ucai.resume import RNGStateCheckpoint
from ucai.reward_scoring import (
    STATS_FILE,
    RewardScorer,
    RewardStats,
    packed_pair_rewards,
    packs_pairs,
    sequence_rewards,
    unwrap_peft,
)
from ucai.stages.generation import predict_callbacks
from ucai.uniform_dropout import use_uniform_dropout
from ucai.value_ranges import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

log = logging.getLogger(__name__)


def preferred_side(p_chosen: torch.Tensor) -> torch.Tensor:
    """(B,) +1 where the label prefers ``chosen`` (p > 0.5), −1 where it prefers
    ``rejected`` (p < 0.5), 0 where it prefers neither (p = 0.5)."""
    return torch.sign(p_chosen - 0.5)


def hard_labels(p_chosen: torch.Tensor) -> torch.Tensor:
    """(B,) the label's side as a probability: 1, 0, or 1/2 for a 50/50 pair."""
    return (preferred_side(p_chosen) + 1) / 2


class PairwiseAccuracy(Metric):
    """Share of pairs whose rewards order the two responses as the label does.

    The label prefers ``chosen`` when ``p_chosen > 0.5`` and ``rejected`` when it is
    below. A tie in reward counts one half: the model expressed no preference, which
    is right half the time; so does a 50/50 label, which no ordering gets right or
    wrong.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor | None = None) -> None:
        """chosen, rejected: (B,) rewards; p_chosen: (B,) labels or None (all 1)."""
        sign = torch.sign(chosen.detach().float() - rejected.detach().float())  # (B,)
        if p_chosen is not None:
            sign = sign * preferred_side(p_chosen.to(sign.device).float())
        self.correct += ((sign + 1) / 2).sum()  # agree -> 1, either side a tie -> 0.5, disagree -> 0
        self.total += sign.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


class RewardMetrics(torch.nn.Module):
    """Pairwise accuracy, mean margin and mean/min/max reward for one split."""

    def __init__(self):
        super().__init__()
        self.accuracy = PairwiseAccuracy()
        self.margin = MeanMetric()
        self.reward_mean = MeanMetric()
        self.reward_min = MinMetric()
        self.reward_max = MaxMetric()

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor, p_chosen: torch.Tensor, step_values: bool = False) -> None:
        """Accumulate a batch; ``step_values`` also computes this batch's own values
        (torchmetrics ``forward``), which Lightning logs per step."""
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        both = torch.cat([chosen, rejected])
        call = (lambda metric, *args: metric(*args)) if step_values else (lambda metric, *args: metric.update(*args))
        call(self.accuracy, chosen, rejected, p_chosen)
        call(self.margin, chosen - rejected)
        call(self.reward_mean, both)
        call(self.reward_min, both)
        call(self.reward_max, both)

    def items(self, prefix: str) -> dict[str, Metric]:
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/margin": self.margin,
            f"{prefix}/reward_mean": self.reward_mean,
            f"{prefix}/reward_min": self.reward_min,
            f"{prefix}/reward_max": self.reward_max,
        }


class RewardModule(L.LightningModule):
    """Bradley–Terry reward model on a LoRA backbone.

    Args:
        model: backbone alias, folder or hub id: a causal LM (``smollm2-135m``, an SL
            model folder) or an encoder (``all-minilm-l6-v2``).
        output_dir: where the merged model, tokenizer and ``reward_stats.json`` go
            (null: nothing is saved, e.g. for sweeps and benchmarks).
        lora: LoRA settings; null trains every weight of the backbone.
        learning_rate: AdamW learning rate of the LoRA adapters (or of the backbone
            when ``lora`` is null).
        head_learning_rate: AdamW learning rate of the scalar head, a second parameter
            group (null: 10 × ``learning_rate``). The head starts at zero and must
            learn a direction from nothing, while the LoRA only nudges a pretrained
            backbone, so the head is given the larger rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, reaching ``learning_rate`` on its
            last step (`ucai.lr_schedule`, ``to_peak``); constant after.
        soft_labels: train on the file's ``p_chosen`` (false: hard labels, the side
            ``p_chosen`` prefers: 1 above 0.5, 0 below, 1/2 at 0.5).
        margin: the preferred reward should beat the other by this much (null: none).
            With soft labels it is symmetric (`ucai.losses.bradley_terry_loss`): a
            50/50 pair is pulled to equal rewards, not to a gap of ``margin``.
        center_coef: weight of the ``mean((r_c + r_r)^2)`` centring penalty.
        gradient_checkpointing: recompute activations in backward (less memory, slower).
        disable_dropout: set the backbone's own dropout to 0, TRL's default for reward
            models: independent dropout noise in the two rewards of a pair is noise in
            their difference, which is all the loss sees. LoRA keeps ``lora.dropout``.
        frozen_linear_bf16: under ``bf16-mixed``, store the FROZEN linear weights in
            bf16. Autocast casts them to bf16 for every matmul anyway, so the maths is
            unchanged, but the fp32 copies and autocast's per-step bf16 copies are not
            held (about 3 bytes less per frozen weight). Embeddings, norms, the LoRA
            adapters and the head stay fp32, so the residual stream keeps its precision.
            Skipped under FSDP, whose flat parameters need one dtype per unit.
        stats_max_pairs: compute the reward mean/std on about this many training pairs
            (null: all): whole batches spread evenly over the length-sorted training
            set, so short and long pairs are both represented.
        trust_remote_code: allow custom model code from the hub (off unless you ask).
        seed: seed of the weights of a backbone built from config (``tiny-llama``).
        init_head: how the head starts. ``zero``: at zero, whatever ``model`` is (see
            the module docstring). ``keep`` and ``negate`` need ``model`` to be a
            reward model this stage saved (a folder with ``reward_stats.json``), e.g.
            a pre-trained one (PMP): ``keep`` starts from its trained head, ``negate``
            from that head times −1 (its last linear layer's weight and bias), the
            model of the opposite preferences. Before any step the rewards are then
            the saved model's (``keep``) or exactly their negatives (``negate``).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        output_dir: str | None = "lightning_logs/models/ethical/rm_model",
        lora: LoraSettings | None = LoraSettings(),
        learning_rate: PositiveFloat = 1e-4,
        head_learning_rate: PositiveFloat | None = None,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_steps: NonNegativeInt = 0,
        soft_labels: bool = True,
        margin: NonNegativeFloat | None = None,
        center_coef: NonNegativeFloat = 0.0,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        frozen_linear_bf16: bool = True,
        stats_max_pairs: PositiveInt | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        init_head: Literal["zero", "keep", "negate"] = "zero",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model
        if init_head != "zero":
            require_reward_model(model, init_head)
        self.init_head = init_head
        if output_dir is not None:  # None: the model is not exported
            require_writable(output_dir, "--model.init_args.output_dir", folder=True)
        self.output_dir = output_dir
        self.lora = lora
        self.learning_rate = learning_rate
        self.head_learning_rate = 10 * learning_rate if head_learning_rate is None else head_learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.soft_labels = soft_labels
        self.margin = margin
        self.center_coef = center_coef
        self.gradient_checkpointing = gradient_checkpointing
        self.disable_dropout = disable_dropout
        self.frozen_linear_bf16 = frozen_linear_bf16
        self.stats_max_pairs = stats_max_pairs
        self.trust_remote_code = trust_remote_code
        self.seed = seed
        self.net = None
        self.train_metrics = RewardMetrics()
        self.val_metrics = RewardMetrics()
        self.stats: RewardStats | None = None

    # ----------------------------------------------------------------- model

    def configure_model(self) -> None:
        if self.net is not None:
            return
        from ucai.models import (
            disable_dropout,
            dtype_from_precision,
            load_sequence_classifier,
            load_tokenizer,
            refuse_half_precision_training,
            trainer_precision,
        )

        refuse_half_precision_training(self, "reward")
        self.tokenizer = load_tokenizer(self.model_name, padding_side="right", trust_remote_code=self.trust_remote_code)
        net = load_sequence_classifier(
            self.model_name,
            dtype=dtype_from_precision(trainer_precision(self)),
            trust_remote_code=self.trust_remote_code,
            seed=self.seed,
        )
        net.config.pad_token_id = self.tokenizer.pad_token_id  # HF's own pooling needs it
        initialise_head(net, self.init_head)  # before peft copies the head into modules_to_save
        if self.gradient_checkpointing:
            enable_activation_checkpointing(net)
        net.config.use_cache = False
        if self.disable_dropout:  # before LoRA adds its own dropout modules
            disable_dropout(net)
        if self.lora is not None:
            from peft import get_peft_model

            net = get_peft_model(net, lora_for(net, self.lora).to_peft("SEQ_CLS"))
            use_uniform_dropout(net)
            head = head_name(net)
            if head is None:
                raise UcaiError(
                    f"model {self.model_name!r}: peft did not mark a classification head as trainable "
                    "(modules_to_save is empty); LoRA alone would leave the new head random"
                )
        if self.frozen_linear_bf16 and trainer_precision(self) in ("bf16-mixed", "bf16"):
            if sharded_by_fsdp(self._trainer):
                # FSDP flattens each unit's parameters into one tensor of one dtype.
                log.info("reward: frozen_linear_bf16 skipped under FSDP (its flat parameters need one dtype)")
            else:
                cast_frozen_linear(net, torch.bfloat16)
        # from_pretrained returns eval mode and Lightning keeps each module's mode, which
        # would leave gradient checkpointing (training-only) and dropout silently off.
        self.net = net.train()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N,) rewards of N sequences (see `ucai.reward_scoring.sequence_rewards`)."""
        return sequence_rewards(self.net, input_ids, attention_mask)

    def pair_rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) rewards, chosen rows first: one forward, each pair packed into one row
        with its shared prefix once when the batch has packed rows and the backbone
        can take them, else the 2B sequences."""
        packed = "pair_ids" in batch and packs_pairs(self.net)
        ids = batch["pair_ids"] if packed else batch["input_ids"]
        with training_attention(ids, self.gradient_checkpointing):
            if packed:
                return packed_pair_rewards(self.net, batch["pair_ids"], batch["pair_segments"])
            return self.rewards(batch["input_ids"], batch["attention_mask"])

    # ----------------------------------------------------------------- steps

    def _step(self, batch: dict[str, torch.Tensor], metrics: RewardMetrics, step_values: bool) -> torch.Tensor:
        rewards = self.pair_rewards(batch).float()  # (2B,)
        chosen, rejected = rewards.chunk(2)  # (B,), (B,)
        p = batch["p_chosen"] if self.soft_labels else hard_labels(batch["p_chosen"])
        loss = bradley_terry_loss(chosen, rejected, p, self.margin, self.center_coef)
        metrics.update(chosen, rejected, batch["p_chosen"], step_values)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, self.train_metrics, step_values=True)
        pairs = batch["p_chosen"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log_dict(self.train_metrics.items("train"), on_step=True, on_epoch=True, batch_size=pairs)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._step(batch, self.val_metrics, step_values=False)
        pairs = batch["p_chosen"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=pairs, sync_dist=True)
        self.log_dict(self.val_metrics.items("val"), on_step=False, on_epoch=True, batch_size=pairs)
        return loss

    def configure_callbacks(self):
        # LoRA dropout draws from the global RNG: a resumed run must continue its stream.
        return [RNGStateCheckpoint()]

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: the backbone's trainable weights (LoRA adapters) at
        ``learning_rate``, the scalar head at ``head_learning_rate``."""
        head = self._head_attribute()
        backbone, head_params = [], []
        for name, param in self.net.named_parameters():
            if param.requires_grad:
                (head_params if head is not None and head in name.split(".") else backbone).append(param)
        groups = [{"params": backbone, "lr": self.learning_rate, "name": "backbone"}]
        if head_params:
            groups.append({"params": head_params, "lr": self.head_learning_rate, "name": "head"})
        else:  # e.g. FSDP's flattened names: one rate for all
            log.warning("reward: head parameters not found by name; all trainable weights use learning_rate")
        return [g for g in groups if g["params"]]

    def _head_attribute(self) -> str | None:
        if self.lora is not None and hasattr(self.net, "peft_config"):
            return head_name(self.net)
        inner = unwrap_peft(self.net)
        return next((name for name in ("score", "classifier") if hasattr(inner, name)), None)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.learning_rate, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return optimizer
        scheduler = warmup_then_decay(optimizer, self.warmup_steps, self.warmup_steps, "constant", warmup="to_peak")
        return {"optimizer": optimizer, "lr_scheduler": per_step(scheduler)}

    # ----------------------------------------------------------------- after training

    @torch.no_grad()
    def _scored_batches(self, loader):
        """Yield (batch, (2B,) rewards) for this rank's share of ``loader``'s batches,
        with ``self.net`` in eval mode and the trainer's precision, as in validation."""
        rank, world = self._trainer.global_rank, self._trainer.world_size
        was_training = self.net.training
        self.net.eval()
        try:
            for index, batch in enumerate(loader):
                if index % world != rank:
                    continue
                batch = {key: value.to(self.device) for key, value in batch.items()}
                with self._trainer.strategy.precision_plugin.forward_context():
                    rewards = self.pair_rewards(batch)
                yield batch, rewards
        finally:
            self.net.train(was_training)

    @torch.no_grad()
    def measure_stats(self) -> RewardStats:
        """Reward mean and std of ``self.net`` over the training set (or the
        ``stats_max_pairs`` subset, see `spread_batch_indices`), summed across ranks."""
        from torch.utils.data import DataLoader, Subset

        datamodule = self._trainer.datamodule
        loader = datamodule.stats_dataloader()  # whole batches, sorted by length
        batches = len(loader.dataset)
        if self.stats_max_pairs is not None:
            wanted = math.ceil(self.stats_max_pairs / max(datamodule.batch_size, 1))
            picked = spread_batch_indices(batches, wanted)
            loader = DataLoader(Subset(loader.dataset, picked), batch_size=None, num_workers=loader.num_workers)
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # n, sum, sum of squares
        for _, r in self._scored_batches(loader):
            r = r.double()
            total += torch.stack([torch.tensor(float(r.numel()), device=self.device, dtype=torch.float64), r.sum(), (r * r).sum()])
        total = self._trainer.strategy.reduce(total, reduce_op="sum")
        n, s, ss = (float(x) for x in total)
        mean = s / max(n, 1.0)
        std = math.sqrt(max(ss / max(n, 1.0) - mean * mean, 0.0))
        return RewardStats(
            mean=mean,
            std=std if std > 1e-6 else 1.0,  # a constant reward model: keep scores finite
            system_prompt=datamodule.system_prompt,
            max_length=datamodule.max_length,
            pairs=int(n // 2),
        )

    @torch.no_grad()
    def pair_accuracy(self, loader) -> tuple[float | None, int]:
        """(pairwise accuracy, pairs) of ``self.net`` on ``loader``'s pairs, judged by
        their own labels like `PairwiseAccuracy`, summed across ranks; (None, 0) for
        no loader or no pairs. Only the sign of r_chosen − r_rejected counts, so the
        figure is the same before and after the scorer's normalisation."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # correct, pairs
        if loader is not None:
            metric = PairwiseAccuracy().to(self.device)
            for batch, rewards in self._scored_batches(loader):
                chosen, rejected = rewards.float().chunk(2)  # (B,), (B,)
                metric.update(chosen, rejected, batch["p_chosen"])
            total += torch.stack([metric.correct, metric.total]).double()
        total = self._trainer.strategy.reduce(total, reduce_op="sum")
        correct, pairs = float(total[0]), int(total[1])
        return (correct / pairs if pairs else None), pairs

    def on_train_end(self) -> None:
        if self.output_dir:
            # Merge first, on every rank: the stats must describe the model that is
            # saved and scored with. Without an output the module stays as it trained.
            self.merge_lora()
        datamodule = self._trainer.datamodule
        stats = self.measure_stats()
        heldout, heldout_n = self.pair_accuracy(datamodule.val_dataloader())
        cross_loader = datamodule.cross_dataloader() if hasattr(datamodule, "cross_dataloader") else None
        cross, cross_n = self.pair_accuracy(cross_loader)
        self.stats = dataclasses.replace(
            stats, heldout_accuracy=heldout, heldout_pairs=heldout_n, cross_accuracy=cross, cross_pairs=cross_n
        )
        log.info(
            "reward model: held-out accuracy %s (n=%d), cross accuracy on the other side's pairs %s (n=%d; "
            "below 0.5: the two sides disagree), reward mean %.4f, std %.4f over %d training pairs",
            _fmt(heldout), heldout_n, _fmt(cross), cross_n, stats.mean, stats.std, stats.pairs,
        )
        figures = {"stats/reward_mean": stats.mean, "stats/reward_std": stats.std}
        figures.update({f"stats/{k}": v for k, v in (("heldout_accuracy", heldout), ("cross_accuracy", cross)) if v is not None})
        for logger in self._trainer.loggers:
            logger.log_metrics(figures, self.global_step)
        if self._trainer.is_global_zero and self.output_dir:
            self.save(self.output_dir)
        self._trainer.strategy.barrier("ucai-reward-saved")

    def merge_lora(self) -> None:
        """Fold the LoRA weights into the backbone, in place (after training: no copy,
        so saving costs no extra memory); ``self.net`` becomes a plain float32
        classifier. The frozen bf16 linears (``frozen_linear_bf16``) are upcast before
        the merge, or the update would be rounded to bf16 (`merge_in_float32`)."""
        from ucai.stages.lora_io import merge_in_float32

        if self.lora is not None and hasattr(self.net, "merge_and_unload"):
            self.net = merge_in_float32(self.net)
        else:
            self.net.float()  # one dtype in the saved folder

    def save(self, folder: str | Path) -> Path:
        from ucai.models import save_pretrained_atomic

        stats = self.stats or RewardStats()
        self.merge_lora()  # a no-op when on_train_end already merged
        path = save_pretrained_atomic(folder, self.net, self.tokenizer, {STATS_FILE: stats.to_json()})
        log.info("saved the merged reward model to %s", path)
        return path


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def head_output_layer(net: torch.nn.Module) -> torch.nn.Linear:
    """The last linear layer of a sequence classifier's head (``score`` of decoders,
    ``classifier`` of BERT, ``classifier.out_proj`` of RoBERTa)."""
    head = getattr(net, "score", None) or getattr(net, "classifier", None)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if head is not None else []
    if not linears:
        raise UcaiError(f"{type(net).__name__}: no linear classification head (score/classifier) to initialise")
    return linears[-1]


def zero_head(net: torch.nn.Module) -> torch.nn.Linear:
    """Set the last linear layer of a sequence classifier's head to zero; returns it.

    Decoders' head is ``score`` (one linear layer), BERT's ``classifier``; heads with a
    hidden layer (RoBERTa's ``dense`` → ``out_proj``) keep their hidden layer random,
    since zeroing both would leave each with zero gradient. Every reward is then the
    same (bias or 0) until training moves the head: no side starts with a preference.
    """
    return _change_head_output(net, torch.Tensor.zero_)


def negate_head(net: torch.nn.Module) -> torch.nn.Linear:
    """Multiply the last linear layer of the head by −1 (weight and bias); returns it.

    Every reward becomes exactly its negative: the reward model of the swapped
    preferences (the layer before it, if any, is unchanged, so its output is too).
    """
    return _change_head_output(net, torch.Tensor.neg_)


def _change_head_output(net: torch.nn.Module, in_place) -> torch.nn.Linear:
    """Apply ``in_place`` (a tensor method such as ``zero_``) to the weight and bias of
    the head's last linear layer; returns the layer."""
    layer = head_output_layer(net)
    with torch.no_grad():
        in_place(layer.weight)
        if layer.bias is not None:
            in_place(layer.bias)
    return layer


def initialise_head(net: torch.nn.Module, how: str) -> None:
    """Start the head as `RewardModule` ``init_head`` says: ``zero``, ``keep``, ``negate``."""
    if how == "zero":
        zero_head(net)
    elif how == "negate":
        negate_head(net)
    elif how != "keep":
        raise UcaiError(f"init_head must be zero, keep or negate, got {how!r}")


def require_reward_model(model: str, init_head: str) -> None:
    """One-line error unless ``model`` is a folder the reward stage saved (``init_head``
    keep/negate start from its trained head; a plain backbone has none)."""
    if not (Path(model).expanduser() / STATS_FILE).is_file():
        raise UcaiError(
            f"init_head {init_head}: model {model} is not a reward-model folder (no {STATS_FILE}); "
            "keep/negate start from a trained head, e.g. the reward_pretrain stage's (configs/reward_pretrain.yaml)"
        )


def spread_batch_indices(batches: int, wanted: int) -> list[int]:
    """``min(wanted, batches)`` batch indices spread evenly over ``range(batches)``: the
    middle index of each of that many equal strata.

    The stats loader is sorted by length, so its first batches hold only the shortest
    pairs; one batch from each stratum samples every length range instead.
    """
    count = max(min(wanted, batches), 0)
    return [(2 * k + 1) * batches // (2 * count) for k in range(count)]


# Decoder projection names and their BERT equivalents, so one config adapts either kind.
_ENCODER_NAMES = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def lora_for(net, lora: LoraSettings) -> LoraSettings:
    """``lora`` with decoder target names translated when the backbone is an encoder.

    ``[q_proj, v_proj]`` matches nothing in BERT, whose attention projections are
    ``query``/``key``/``value``; the same settings then adapt the same projections.
    """
    import dataclasses

    targets = lora.target_modules
    if isinstance(targets, str):
        return lora
    names = {name.rsplit(".", 1)[-1] for name, _ in net.named_modules()}
    if any(t in names for t in targets):
        return lora
    translated = [_ENCODER_NAMES.get(t, t) for t in targets]
    if any(t in names for t in translated):
        log.info("LoRA targets %s -> %s for %s", targets, translated, type(net).__name__)
        return dataclasses.replace(lora, target_modules=translated)
    raise UcaiError(f"LoRA target_modules {targets} match no module of {type(net).__name__}")


def head_name(net) -> str | None:
    """The name of the head peft trains in full (``modules_to_save``), if any."""
    config = net.peft_config[net.active_adapter]
    modules = list(config.modules_to_save or [])
    inner = unwrap_peft(net)
    for name in modules:
        if hasattr(inner, name):
            return name
    return None


class RewardScoreModule(L.LightningModule):
    """Score prompt/response rows with a saved reward model (a predict stage).

    Writes each input row with ``reward`` (normalised by the training-set stats) and
    ``score`` (its sigmoid, in [0, 1]) added, resumably and sharded like every
    predict stage.

    Args:
        reward_model: a folder written by `RewardModule` (``output_dir``).
        output: the JSONL written (a CSV twin goes beside it).
        batch_texts: texts per forward.
    """

    def __init__(
        self,
        reward_model: str = "lightning_logs/models/ethical/rm_model",
        output: str = "lightning_logs/data/ethical/reward_scores.jsonl",
        batch_texts: PositiveInt = 16,
    ):
        super().__init__()
        require_writable(output, "--model.init_args.output")
        self.reward_model = reward_model
        self.output = output
        self.batch_texts = batch_texts
        self.scorer: RewardScorer | None = None

    def configure_model(self) -> None:
        if self.scorer is None:
            from ucai.models import dtype_from_precision, trainer_precision

            self.scorer = RewardScorer(
                self.reward_model, self.device, dtype_from_precision(trainer_precision(self)), self.batch_texts
            )
            self.rm = self.scorer.model  # a submodule, so Lightning moves it to the device

    def configure_callbacks(self):
        return predict_callbacks(self._trainer, self.output)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        reward, score = self.scorer.score([r["prompt"] for r in batch], [r["response"] for r in batch])
        return [
            {**row, "reward": round(float(r), 6), "score": round(float(s), 6), "reward_model": self.reward_model}
            for row, r, s in zip(batch, reward, score, strict=True)
        ]
