"""Batched generation and the resumable, rank-sharded prediction writer.

Every generating stage (answering, critique → revision, preference sampling, PPO
rollouts, evaluation) shares these pieces; stages never import each other.

* `GenerationSettings` — sampling options, one dataclass so configs read the same in
  every stage.
* `generate` — left-padded batched generation that stops at eos and returns the
  completions cut at the first end-of-turn token, plus token counts. The decoding
  itself is done by an engine from `ucai.generation_engine` (ucai's decode loop, or
  transformers ``generate`` for models it does not support).
* `ResumableJsonlWriter` — a `BasePredictionWriter`: each rank appends finished rows to
  its own shard (``<output>.shards/rank-N.jsonl``, fsynced per batch, repaired after
  ``kill -9``); on a rerun the finished ids are skipped; when every id is done, rank 0
  merges the shards in input order into the final JSONL (and CSV) atomically.
* `ThroughputInProgressBar` — prompts/s and tokens/s in the trainer's own progress bar.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, RichProgressBar, TQDMProgressBar

from ucai.data.io import ResumableJsonl, require_writable, write_csv, write_jsonl
from ucai.errors import UcaiError
from ucai.next_token import row_seed
from ucai.padding import completion_mask_from, tokenizer_sides
from ucai.resume import run_seed
from ucai.value_ranges import NonNegativeFloat, NonNegativeInt, NucleusMass, PositiveFloat, PositiveInt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings.

    Args:
        max_new_tokens: longest completion, in tokens.
        do_sample: sample (true) or decode greedily (false).
        temperature: softmax temperature when sampling.
        top_p: nucleus sampling mass; 1.0 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        repetition_penalty: >1 discourages repeats (small models loop without it).
        engine: ``auto`` (ucai's decode loop where the model supports it, else
            transformers ``generate``), ``decode_loop``, ``hf``, or a name added with
            `ucai.generation_engine.register_engine`.
    """

    max_new_tokens: PositiveInt = 128
    do_sample: bool = True
    temperature: NonNegativeFloat = 0.7  # may be 0 only with do_sample: false (greedy)
    top_p: NucleusMass = 0.9
    top_k: NonNegativeInt = 0
    repetition_penalty: PositiveFloat = 1.0
    engine: str = "auto"

    def __post_init__(self) -> None:
        from ucai.generation_engine import ENGINES

        if self.do_sample and self.temperature == 0:
            raise UcaiError(
                "--model.init_args.generation.temperature: must be > 0 when sampling "
                f"(do_sample: true), got {self.temperature}"
            )
        # Checked as the arguments are parsed, not once the model is loaded; an engine
        # registered (`register_engine`) before then is known here.
        if self.engine != "auto" and self.engine not in ENGINES:
            raise UcaiError(
                f"--model.init_args.generation.engine: unknown generation engine {self.engine!r}; "
                f"choose one of: auto, {', '.join(ENGINES)}"
            )

    def to_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # silence transformers' warnings about unused sampling flags
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


# Allow-listed for weights_only checkpoint loading (it appears in saved hyperparameters).
torch.serialization.add_safe_globals([GenerationSettings])


@dataclass
class Generated:
    """Output of `generate` for a batch of B prompts.

    Attributes:
        texts: B completions, cut at the first eos and stripped.
        sequences: (B, P + T) prompt and completion ids (prompt left-padded, completion
            right-padded with pad after eos).
        prompt_length: P, the padded prompt width.
        completion_mask: (B, T) 1 for completion tokens up to and including eos.
        finished: (B,) whether each completion reached eos.
    """

    texts: list[str]
    sequences: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    finished: torch.Tensor

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def eos_ids(tokenizer, model=None) -> list[int]:
    """All token ids that end a turn: the tokenizer's eos plus the model's generation eos."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, (list, tuple)):
        ids.update(config_eos)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    synced_gpus: bool = False,
    max_prompt_tokens: int | None = None,
    seeds: list[int] | None = None,
    observer=None,
    stop_ids: list[int] | None = None,
) -> Generated:
    """Generate one completion per already-rendered prompt, batched.

    Prompts are left-padded (generation appends on the right), the model runs in eval
    mode with a KV cache, and each row stops at eos. ``synced_gpus`` keeps FSDP ranks
    stepping together until every rank is done, so sharded generation cannot hang (the
    ``auto`` engine uses transformers ``generate`` there).

    ``seeds`` (one per prompt, `ucai.next_token.row_seed`): each row samples from its own
    stream, so the random numbers it draws do not depend on the batch it is in (the
    decode engines; transformers ``generate`` draws from the global RNG). ``observer``: see
    `ucai.generation_engine.GenerationEngine.generate`. ``stop_ids``: the ids that end
    a row (default: `eos_ids`; ``[]`` runs every row to ``max_new_tokens``).
    """
    from ucai.generation_engine import select_engine

    was_training = model.training
    model.eval()
    try:
        # Pad and truncate on the left: generation continues the right end of the prompt.
        with tokenizer_sides(tokenizer, "left", "left"):
            encoded = tokenizer(
                prompts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=max_prompt_tokens is not None,
                max_length=max_prompt_tokens,
            ).to(next(model.parameters()).device)
        stop_ids = eos_ids(tokenizer, model) if stop_ids is None else stop_ids
        # Settings pickled in checkpoints from before `engine` existed lack the field.
        engine = select_engine(getattr(settings, "engine", "auto"), model, synced_gpus)
        sequences = engine.generate(
            model,
            encoded["input_ids"],
            encoded["attention_mask"],
            settings,
            stop_ids,
            tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
            seeds=seeds,
            observer=observer,
        )
    finally:
        model.train(was_training)
    prompt_length = encoded["input_ids"].shape[1]
    completions = sequences[:, prompt_length:]
    mask, finished = completion_mask_from(completions, stop_ids)
    texts = []
    for row, row_mask in zip(completions, mask, strict=True):
        ids = row[row_mask.bool()].tolist()
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return Generated(texts, sequences, prompt_length, mask, finished)


_ECHO = re.compile(
    r"^\s*(?:\*\*)?(?:revision|revised response|critique|response|answer|assistant)(?:\*\*)?\s*:\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)


def strip_echo(text: str, extra_prefixes: tuple[str, ...] = ()) -> str:
    """Remove a label the model echoed at the start, such as ``Revision:`` or ``Critique:``.

    Small models often repeat the request's label before answering; the label is not
    part of the answer and would otherwise be learned by SFT.
    """
    previous = None
    while previous != text:
        previous = text
        text = _ECHO.sub("", text, count=1)
        for prefix in extra_prefixes:
            if text.lower().startswith(prefix.lower()):
                text = text[len(prefix) :].lstrip()
    return text.strip()


def synced_gpus_needed(trainer) -> bool:
    """FSDP shards weights across ranks: every rank must run the same number of forwards."""
    if trainer is None or trainer.world_size <= 1:
        return False
    return "FSDP" in type(trainer.strategy).__name__


class ResumableJsonlWriter(BasePredictionWriter):
    """Append each rank's finished rows to a shard; merge into one file when complete.

    The stage's ``predict_step`` returns a list of row dicts (each with ``id``). The
    merged file keeps the input order given by ``trainer.datamodule.all_ids`` when the
    datamodule has it.
    """

    def __init__(self, output: str | Path, csv: bool = True, csv_columns: list[str] | None = None):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.csv = csv
        self.csv_columns = csv_columns
        self.rows_written = 0

    @property
    def shard_dir(self) -> Path:
        return self.output.with_name(self.output.name + ".shards")

    def _shard(self, rank: int) -> ResumableJsonl:
        return ResumableJsonl(self.shard_dir / f"rank-{rank}.jsonl")

    def finished_rows(self) -> list[dict]:
        """Rows of a previous complete output (if any) followed by every shard's rows."""
        rows = ResumableJsonl(self.output).rows() if self.output.exists() else []
        if self.shard_dir.is_dir():
            for shard in sorted(self.shard_dir.glob("rank-*.jsonl")):
                rows.extend(ResumableJsonl(shard).rows())
        return rows

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        done = {row.get("id") for row in self.finished_rows()}
        if done and hasattr(datamodule, "skip_ids"):
            datamodule.skip_ids(done)
            expected = getattr(datamodule, "all_ids", None)
            if expected is not None and done.issuperset(expected):
                # Every row is written: no batch is left to predict, so the predict loop
                # is told to run none (it then asks for no loader and skips its end
                # hooks) and the final file, if shards still wait for it, is made here.
                if trainer.is_global_zero:
                    log.info("nothing left to generate: all %d rows are already written", len(expected))
                trainer.limit_predict_batches = 0
                if self.shard_dir.is_dir():
                    self.on_predict_end(trainer, pl_module)
            elif trainer.is_global_zero:
                log.info("resuming: %d rows already in %s", len(done), self.shard_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if not prediction:
            return
        self._shard(trainer.global_rank).append(prediction)
        self.rows_written += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("ucai-merge")
        if trainer.is_global_zero:
            self.merge(getattr(trainer.datamodule, "all_ids", None))
        trainer.strategy.barrier("ucai-merged")

    def merge(self, expected_ids: list | None = None) -> bool:
        """Write the final file if every expected id is done; returns whether it did."""
        rows: dict[Any, dict] = {}
        for row in self.finished_rows():
            rows.setdefault(row.get("id"), row)  # first copy wins; a duplicate cannot arise twice
        if not rows:
            return self.output.exists()
        if expected_ids is not None:
            missing = [i for i in expected_ids if i not in rows]
            if missing:
                log.warning(
                    "%d of %d rows done; rerun the same command to finish %s",
                    len(expected_ids) - len(missing), len(expected_ids), self.output,
                )
                return False
            order = {i: n for n, i in enumerate(expected_ids)}
            ordered = sorted((r for r in rows.values() if r.get("id") in order), key=lambda r: order[r["id"]])
        else:
            ordered = list(rows.values())
        write_jsonl(self.output, ordered)
        if self.csv:
            write_csv(self.output.with_suffix(".csv"), ordered, self.csv_columns)
        if self.shard_dir.is_dir():
            for shard in self.shard_dir.glob("*"):
                shard.unlink()
            self.shard_dir.rmdir()
        log.info("wrote %d rows to %s", len(ordered), self.output)
        return True


class ThroughputMeter:
    """Counts prompts and tokens per second for the progress bar."""

    def __init__(self):
        self.start = time.perf_counter()
        self.prompts = 0
        self.tokens = 0

    def add(self, prompts: int, tokens: int) -> dict[str, float]:
        self.prompts += prompts
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"prompts/s": self.prompts / elapsed, "tok/s": self.tokens / elapsed}


# The bars `ThroughputInProgressBar` writes to; a custom bar is left as configured.
STOCK_PROGRESS_BARS = (TQDMProgressBar, RichProgressBar)


class ThroughputInProgressBar(Callback):
    """Shows the stage's prompts/s and tokens/s (``pl_module.throughput``) in the
    trainer's own progress bar while predicting: TQDM's postfix, or the predict task's
    description under Rich (Rich draws its metrics column for training alone).

    It sits beside the bar instead of replacing it, so the bar keeps its configured
    settings and Lightning has no callback of the trainer's to override. It runs after
    the bar's own batch-end hook (a module's callbacks come after the trainer's), so the
    rates follow the bar's update.
    """

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        rates = getattr(pl_module, "throughput", None)
        if not rates:
            return
        bar = trainer.progress_bar_callback
        if type(bar) is TQDMProgressBar:
            bar.predict_progress_bar.set_postfix({key: f"{value:.1f}" for key, value in rates.items()}, refresh=False)
        elif type(bar) is RichProgressBar and bar.progress is not None and bar.predict_progress_bar_id is not None:
            description = f"Predicting {rates['prompts/s']:.2f} prompts/s {rates['tok/s']:.1f} tok/s"
            bar.progress.update(bar.predict_progress_bar_id, description=description)
            bar.refresh()


def throughput_callbacks(trainer) -> list:
    """`ThroughputInProgressBar` when the trainer has a stock progress bar, else nothing."""
    bar = getattr(trainer, "progress_bar_callback", None)
    return [ThroughputInProgressBar()] if type(bar) in STOCK_PROGRESS_BARS else []


def predict_callbacks(
    trainer, output: str | Path, csv: bool = True, csv_columns: list[str] | None = None
) -> list:
    """The callbacks every generating stage returns from ``configure_callbacks``: the
    writer, and the rates in the progress bar."""
    return [ResumableJsonlWriter(output, csv=csv, csv_columns=csv_columns), *throughput_callbacks(trainer)]


def module_device_dtype(module: L.LightningModule) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def load_frozen_lm(module: L.LightningModule, name: str, trust_remote_code: bool = False, generation_only: bool = False):
    """(tokenizer, model in eval mode) for a predict stage, in its trainer's precision dtype.

    ``generation_only``: the model only samples text, so under mixed precision it is held
    in the autocast dtype (`ucai.models.generation_dtype_from_precision`); models that
    score (judges, categorisers) keep the precision's weight dtype.
    """
    from ucai.models import (
        dtype_from_precision,
        generation_dtype_from_precision,
        load_causal_lm,
        load_tokenizer,
        trainer_precision,
    )

    precision = trainer_precision(module)
    dtype = generation_dtype_from_precision(precision) if generation_only else dtype_from_precision(precision)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_causal_lm(name, dtype=dtype, trust_remote_code=trust_remote_code)
    return tokenizer, model.eval()


class GeneratingModule(L.LightningModule):
    """Base of the predict stages: loads one causal LM and writes rows resumably.

    Subclasses implement ``predict_step(batch, batch_idx) -> list[dict]``, calling
    `self.generate(prompts)` and `self.count(...)`. The model is built in
    ``configure_model`` in the dtype of the trainer's precision (under mixed precision,
    its autocast dtype: the model only generates), so the same config runs in fp32 on a
    laptop and bf16 on a GPU.

    Args:
        model: model alias, local folder or Hugging Face id.
        output: the JSONL file this stage produces (a CSV twin is written beside it).
        generation: sampling settings.
        system_prompt: system message of every conversation (null: the template default).
        max_prompt_tokens: prompts longer than this are truncated from the left.
        trust_remote_code: allow custom model code from the hub (off unless you ask).
    """

    csv_columns: list[str] | None = None

    def __init__(
        self,
        model: str = "smollm2-135m",
        output: str = "lightning_logs/data/answers.jsonl",
        generation: GenerationSettings = GenerationSettings(),
        system_prompt: str | None = "You are a helpful assistant.",
        max_prompt_tokens: PositiveInt | None = 1024,
        trust_remote_code: bool = False,
    ):
        super().__init__()
        require_writable(output, "--model.init_args.output")
        self.model_name = model
        self.output = output
        self.generation = generation
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.trust_remote_code = trust_remote_code
        self.lm = None
        self.tokenizer = None
        self.throughput: dict[str, float] | None = None
        self._meter: ThroughputMeter | None = None

    def configure_model(self) -> None:
        if self.lm is None:
            self.tokenizer, self.lm = load_frozen_lm(self, self.model_name, self.trust_remote_code, generation_only=True)

    def configure_callbacks(self):
        return predict_callbacks(self._trainer, self.output, csv_columns=self.csv_columns)

    def on_predict_start(self) -> None:
        self._meter = ThroughputMeter()

    def generate(
        self, prompts: list[str], settings: GenerationSettings | None = None, keys: list | None = None
    ) -> Generated:
        """Generate for rendered prompts and update the prompts/s and tokens/s counters.

        ``keys``: one per prompt (its id, with a sample number where a prompt is sampled
        more than once); each row then samples from a stream seeded by the run's seed
        and its key, whatever batch it lands in.
        """
        seeds = None if keys is None else [row_seed(run_seed(), key) for key in keys]
        result = generate(
            self.lm,
            self.tokenizer,
            prompts,
            settings or self.generation,
            synced_gpus=synced_gpus_needed(self._trainer),
            max_prompt_tokens=self.max_prompt_tokens,
            seeds=seeds,
        )
        if self._meter is None:
            self._meter = ThroughputMeter()
        self.throughput = self._meter.add(0, result.completion_tokens)
        return result

    def count_prompts(self, n: int) -> None:
        if self._meter is not None:
            self.throughput = self._meter.add(n, 0)
