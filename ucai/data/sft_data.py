"""`SFTDataModule`: prompt → response pairs, tokenised once, for supervised fine-tuning.

    ucai fit --config configs/sft_ethical.yaml

Accepted inputs (JSONL, optionally ``.gz``), one example per line:

* SL data from the critique–revision stage (``id``, ``prompt``, ..., ``response``): the
  target is the final revision in ``response``;
* any JSONL with ``prompt`` (a string, or a list of ``{role, content}`` messages) and
  ``response``;
* chat JSONL with ``messages`` whose last message is the assistant reply;
* hh-rlhf preference files (``chosen`` transcripts): every turn before the last
  assistant reply is the prompt conversation, that reply is the target.

Each example becomes ``render_chat(prompt conversation, add_generation_prompt=True)``
followed by the response tokens and the end-of-turn token (eos). The loss covers exactly
the response tokens and eos. The mask is built from the *position* where the response
starts, never from the pad id: SmolLM2's own config pads with ``<|im_end|>``, its eos.

Padding is kept small in two ways: batches are drawn from length buckets (examples are
sorted by length within shuffled chunks, and the batches are shuffled), and with
``packing: true`` a batch is one padding-free row in which the examples are laid end to
end, with position ids restarting at each example so transformers keeps them apart in
attention.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ucai.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from ucai.data.io import read_jsonl
from ucai.data.prompts import parse_transcript, stable_id
from ucai.errors import UcaiError, located
from ucai.resume import ResumableLoader, own_generator
from ucai.value_ranges import AtLeastTwo, ClosedUnitInterval, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SFTExample:
    """One training pair: the conversation before the reply, and the reply."""

    id: str
    messages: tuple[dict[str, str], ...]
    response: str


def _messages_from(path, line: int, value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        messages = []
        for message in value:
            if (
                not isinstance(message, dict)
                or message.get("role") not in _ROLES
                or not isinstance(message.get("content"), str)
            ):
                raise located(path, line, f"field {field!r}: each message needs a role in {_ROLES} and a string content")
            messages.append({"role": message["role"], "content": message["content"]})
        return messages
    raise located(path, line, f"field {field!r} must be a string or a non-empty list of messages")


def _example_from_row(path, line: int, row: dict) -> SFTExample | None:
    """Parse one row; None for an example with an empty reply (nothing to learn)."""
    if "prompt" in row and "response" in row:
        messages = _messages_from(path, line, row["prompt"], "prompt")
        response = row["response"]
        if not isinstance(response, str):
            raise located(path, line, f"field 'response' must be a string, got {type(response).__name__}")
    elif "messages" in row:
        messages = _messages_from(path, line, row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise located(path, line, "field 'messages' must end with the assistant reply to train on")
        messages, response = messages[:-1], messages[-1]["content"]
    elif "chosen" in row:
        if not isinstance(row["chosen"], str):
            raise located(path, line, "field 'chosen' must be an hh-rlhf transcript string")
        turns = parse_transcript(row["chosen"])
        if not turns or turns[-1]["role"] != "assistant":
            raise located(path, line, "field 'chosen' does not end with an '\\n\\nAssistant:' turn")
        messages, response = turns[:-1], turns[-1]["content"]
    else:
        raise located(
            path,
            line,
            "expected fields 'prompt' and 'response' (SL data), 'messages' (chat) or 'chosen' (hh-rlhf); "
            f"found {sorted(row)}",
        )
    if not any(m["role"] == "user" for m in messages):
        raise located(path, line, "the prompt conversation has no user turn")
    if not response.strip():
        return None
    text_id = row.get("id")
    if not isinstance(text_id, str) or not text_id:
        text_id = stable_id("\x1f".join(m["content"] for m in messages) + "\x1e" + response, "sft")
    return SFTExample(text_id, tuple(messages), response.strip())


def read_sft_examples(path: str | Path) -> list[SFTExample]:
    """All examples of an SFT file; errors name ``file:line``."""
    path = Path(path)
    if not path.exists():
        raise UcaiError(
            f"{path}: SFT data not found; it is written by the critique-revision stage "
            "(ucai predict --config configs/critique_revision_<side>.yaml), or point data.path "
            "at a prompt/response JSONL or an hh-rlhf .jsonl(.gz) file"
        )
    examples, empty = [], 0
    for line, row in read_jsonl(path):
        example = _example_from_row(path, line, row)
        if example is None:
            empty += 1
        else:
            examples.append(example)
    if empty:
        log.warning("%s: skipped %d example(s) with an empty response", path, empty)
    if not examples:
        raise UcaiError(f"{path}: no training examples (file is empty or every response is empty)")
    return examples


# --------------------------------------------------------------------------- tokenising


@dataclass(frozen=True)
class Encoded:
    """A tokenised example: ``input_ids`` (L,) and the number of leading prompt tokens.

    Labels are ``input_ids`` with the first ``prompt_length`` positions set to -100, so
    the loss covers the response and the eos that ends it.
    """

    input_ids: torch.Tensor
    prompt_length: int

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into ``max_length`` tokens.

    The prompt loses tokens from the left first (its end — the assistant header — is
    what the reply follows). The prompt keeps at least ``max_length // 4`` tokens (or
    all of it if shorter) so the reply still has some context; only then is the reply
    cut on the right, in which case it no longer ends with eos (it did not end there).
    """
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = max(min(len(prompt), max_length // 4, max_length - 1), 1)
    keep_prompt = max(keep_prompt, max_length - len(response))
    prompt = prompt[len(prompt) - keep_prompt :]
    return prompt, response[: max_length - len(prompt)]


def encode_examples(
    tokenizer,
    examples: Sequence[SFTExample],
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    max_length: int = 1024,
) -> list[Encoded]:
    """Tokenise every example once (batched through the fast tokenizer).

    Prompt and response are tokenised separately, so the boundary between them is a
    token position rather than a guess from decoded text.
    """
    if tokenizer.eos_token_id is None:
        raise UcaiError("the tokenizer has no eos token, so a trained reply could never end")
    prompts = [render_chat(tokenizer, list(e.messages), system_prompt, add_generation_prompt=True) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    encoded, truncated = [], 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        r = list(r) + [tokenizer.eos_token_id]
        p2, r2 = truncate(list(p), r, max_length)
        truncated += (len(p2), len(r2)) != (len(p), len(r))
        encoded.append(Encoded(torch.tensor(p2 + r2, dtype=torch.long), len(p2)))
    if truncated:
        log.info("truncated %d of %d examples to %d tokens", truncated, len(examples), max_length)
    return encoded


def labels_for(example: Encoded) -> torch.Tensor:
    """(L,) labels: -100 on the prompt, the token ids on the response and its eos."""
    labels = example.input_ids.clone()
    labels[: example.prompt_length] = IGNORE_INDEX
    return labels


# --------------------------------------------------------------------------- batching


def collate_padded(examples: Sequence[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded batch.

    Returns ``input_ids``, ``labels``, ``attention_mask`` of shape (B, L_max) and
    ``num_tokens`` (non-pad tokens). Pad positions have label -100 and mask 0.
    """
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = example.input_ids
        labels[row, :n] = labels_for(example)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "num_tokens": int(attention_mask.sum()),
    }


def collate_packed(examples: Sequence[Encoded]) -> dict[str, Any]:
    """One padding-free row: examples end to end, position ids restarting at each.

    Returns ``input_ids``, ``labels``, ``position_ids`` of shape (1, sum L_i) and
    ``num_tokens``. No attention mask: transformers detects the restarts in
    ``position_ids`` and masks attention across examples. The first token of each
    example is a prompt token (label -100), so no loss crosses a boundary.
    """
    input_ids = torch.cat([e.input_ids for e in examples]).unsqueeze(0)
    labels = torch.cat([labels_for(e) for e in examples]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(e)) for e in examples]).unsqueeze(0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "num_tokens": int(input_ids.numel()),
    }


class _BatchDataset(Dataset):
    """Indexed by a list of example indices (from `LengthBucketSampler`); returns a batch."""

    def __init__(self, examples: list[Encoded], packing: bool, pad_id: int):
        self.examples = examples
        self.packing = packing
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        chosen = [self.examples[i] for i in indices]
        return collate_packed(chosen) if self.packing else collate_padded(chosen, self.pad_id)


class LengthBucketSampler(DistributedSampler):
    """Yields this rank's batches (lists of indices) of similar-length examples.

    Per epoch (seeded by ``seed + epoch``, so a resumed run draws the same order):
    shuffle all indices; cut them into chunks of ``bucket_batches`` global batches;
    sort each chunk by length; cut it into global batches of ``batch_size *
    num_replicas``; shuffle the batches. Rank r takes every ``num_replicas``-th example
    of each global batch, so all ranks step through batches of similar length together.

    It subclasses `DistributedSampler` so Lightning leaves it in place under DDP/FSDP
    instead of swapping in its own sampler (which would undo the bucketing); it is
    given ``num_replicas``/``rank`` explicitly and works without a process group.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        bucket_batches: int = 16,
    ):
        super().__init__(
            range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        if batch_size < 1:
            raise UcaiError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.bucket_batches = max(int(bucket_batches), 1)
        self.skip = 0  # batches the next iteration leaves out, set by ResumableLoader after a restore

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        # Every rank must take the same number of steps: pad with repeats, as
        # DistributedSampler does, up to a multiple of the number of ranks.
        order += order[: (-n) % self.num_replicas]
        global_size = self.batch_size * self.num_replicas
        chunk = global_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), chunk):
            bucket = sorted(order[start : start + chunk], key=lambda i: self.lengths[i], reverse=True)
            batches += [bucket[i : i + global_size] for i in range(0, len(bucket), global_size)]
        if self.shuffle:
            permutation = torch.randperm(len(batches), generator=generator).tolist()
            batches = [batches[i] for i in permutation]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # Built eagerly (not a generator) so `skip` is read when iteration starts.
        skip, self.skip = self.skip, 0
        batches = self._global_batches()[skip:]
        return iter([batch[self.rank :: self.num_replicas] for batch in batches])

    def __len__(self) -> int:
        padded = len(self.lengths) + (-len(self.lengths)) % self.num_replicas
        global_size = self.batch_size * self.num_replicas
        chunk = global_size * self.bucket_batches
        full, rest = divmod(padded, chunk)
        return full * self.bucket_batches + math.ceil(rest / global_size)


# --------------------------------------------------------------------------- the module


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded train/val split; at least one validation example when a fraction is asked
    and there are two or more examples."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    n_val = min(max(1, round(val_fraction * len(examples))), len(examples) - 1)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


class SFTDataModule(L.LightningDataModule):
    """Prompt/response pairs for `SFTModule`.

    Args:
        path: SL JSONL from the critique-revision stage, any prompt/response (or chat
            ``messages``) JSONL, or hh-rlhf ``chosen`` transcripts (``.jsonl``/``.jsonl.gz``).
        tokenizer: tokenizer to encode with; null uses the model's (``model.init_args.model``).
        system_prompt: system message of every rendered prompt (null: the template's own).
        max_length: longest example in tokens; longer prompts lose tokens on the left.
        val_fraction: share of examples held out for validation (seeded split).
        split_seed: seed of the train/val split and of the batch order.
        limit: use at most this many examples (read order), for quick runs.
        batch_size: examples per batch on each device.
        packing: lay a batch's examples end to end in one row with no padding
            (position ids restart per example); false pads each batch on the right.
        bucket_batches: batches per length bucket; larger means less padding and less
            randomness in what is batched together (1 turns bucketing off).
        num_workers: DataLoader workers (batches are pre-tokenised; 0 is usually right).
    """

    def __init__(
        self,
        path: str = "lightning_logs/data/ethical/sl.jsonl",
        tokenizer: str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_length: AtLeastTwo = 1024,
        val_fraction: ClosedUnitInterval = 0.05,
        split_seed: int = 0,
        limit: PositiveInt | None = None,
        batch_size: PositiveInt = 8,
        packing: bool = False,
        bucket_batches: PositiveInt = 16,
        num_workers: NonNegativeInt = 0,
    ):
        super().__init__()
        self.path = path
        self.tokenizer_name = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.limit = limit
        self.batch_size = batch_size
        self.packing = packing
        self.bucket_batches = bucket_batches
        self.num_workers = num_workers
        self.tokenizer = None
        self.train_examples: list[Encoded] | None = None
        self.val_examples: list[Encoded] | None = None

    def _tokenizer(self):
        if self.tokenizer is None:
            from ucai.models import load_tokenizer

            name = self.tokenizer_name
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if name is None:
                name = getattr(module, "model_name", None)
            if name is None:
                raise UcaiError("data.tokenizer is not set and the model names no tokenizer")
            self.tokenizer = load_tokenizer(name, padding_side="right")
        return self.tokenizer

    def setup(self, stage: str) -> None:
        if self.train_examples is None:
            self._read_and_encode()
        if not self.val_examples and self.trainer is not None:
            # No validation split: the fit loop runs no validation and asks for no loader
            # (an empty one would be reported as a mistake).
            self.trainer.limit_val_batches = 0

    def _read_and_encode(self) -> None:
        examples = read_sft_examples(self.path)
        if self.limit is not None:
            examples = examples[: self.limit]
        train, val = split_examples(examples, self.val_fraction, self.split_seed)
        tokenizer = self._tokenizer()
        self.train_examples = encode_examples(tokenizer, train, self.system_prompt, self.max_length)
        self.val_examples = encode_examples(tokenizer, val, self.system_prompt, self.max_length) if val else []
        response_tokens = sum(len(e) - e.prompt_length for e in self.train_examples)
        log.info(
            "SFT data %s: %d train / %d val examples, %d train tokens (%d in responses)",
            self.path,
            len(self.train_examples),
            len(self.val_examples),
            sum(len(e) for e in self.train_examples),
            response_tokens,
        )

    def _loader(self, examples: list[Encoded], shuffle: bool) -> DataLoader:
        trainer = self.trainer
        sampler = LengthBucketSampler(
            [len(e) for e in examples],
            self.batch_size,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            shuffle=shuffle,
            seed=self.split_seed,
            bucket_batches=self.bucket_batches if shuffle else len(examples),
        )
        pad_id = self._tokenizer().pad_token_id
        # batch_size=None: the sampler yields whole batches of indices and the dataset
        # builds the batch, so workers collate in parallel with no extra collate step.
        dataset = _BatchDataset(examples, self.packing, pad_id if pad_id is not None else 0)
        options = {"batch_size": None, "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if shuffle:
            return ResumableLoader(dataset, sampler=sampler, **options)
        return DataLoader(dataset, sampler=sampler, generator=own_generator(), **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []
