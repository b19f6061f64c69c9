"""Preference pairs for DPO: the reward stage's pairs, plus where each reply starts.

    data:
      class_path: ucai.data.dpo_data.DPODataModule
      init_args: {path: lightning_logs/data/ethical/preferences.jsonl}

DPO reads the same preference files as the reward stage, rendered and tokenised the
same way and batched the same way (`ucai.data.preference_data.PreferenceDataModule`:
length buckets, shared-prefix packed rows, resumable sharded loading). A reward model
reads one position per reply; DPO sums the log-probs of every token of the reply, so it
also needs to know where the reply starts. Two replies can begin with the same words,
so the shared prefix of the pair is not the answer; the prompt is: the conversation
rendered alone up to the assistant header (``add_generation_prompt``), which is how TRL
splits prompt from completion. The reply is everything after it, its end-of-turn token
included (what SFT trained the policy to produce).
"""

from __future__ import annotations

import torch

from ucai.chat import DEFAULT_SYSTEM_PROMPT, render_chat
from ucai.data.preference_data import (
    PreferenceDataModule,
    PreferencePair,
    shared_prefix_length,
    truncate_pair,
)
from ucai.reward_scoring import render_for_reward, tokenize_for_reward_lists
from ucai.value_ranges import FractionBelowOne, NonNegativeInt, PositiveInt


def reply_start(prompt_length: int, full_length: int, kept_length: int) -> int:
    """Index of a reply's first token in its truncated sequence.

    Truncation (`truncate_pair`) removes ``full_length - kept_length`` tokens from the
    start; the prompt loses them first. At least 1: the first token kept has nothing
    before it to predict it from.
    """
    return max(prompt_length - (full_length - kept_length), 1)


class DPODataModule(PreferenceDataModule):
    """Tokenised preference pairs for `ucai.stages.dpo.DPOModule`.

    Batches are the reward stage's (`PreferenceDataModule.collate`) plus
    ``response_start`` (B, 2): the index of the first reply token of the chosen and
    the rejected sequence (in ``input_ids``' rows, which are the full sequences).

    Args:
        path: preference JSONL (from the preference stage) or an hh-rlhf file.
        tokenizer: model whose tokenizer and chat template render the texts; null uses
            the DPO module's ``policy``.
        system_prompt: system message of the rendered conversations (as in SFT).
        max_length: tokens per sequence; longer pairs lose the start of their shared
            conversation, the same number of tokens on both sides (`truncate_pair`).
        batch_size: pairs per batch.
        val_fraction: share of pairs held out for validation, chosen by a hash of the id.
        val_size: if set, the LAST ``val_size`` pairs of the file are the validation set.
        limit: read at most this many pairs.
        bucket_batches: batches per length-sorting bucket (1 disables sorting).
        pad_to_multiple_of: batch widths are rounded up to a multiple of this; null: by
            precision and device (`PreferenceDataModule.width_multiple`).
        share_prefix: give each batch every pair packed into ONE row, the conversation
            once and then both replies (exact; the policy falls back to two sequences
            per pair when its attention cannot take the packed mask).
        seed: seed of the bucket shuffling and, with the epoch, of the batch order.
        num_workers: DataLoader workers (batches are pre-tokenised; 0 is usually right).
    """

    def __init__(
        self,
        path: str = "lightning_logs/data/ethical/preferences.jsonl",
        tokenizer: str | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_length: PositiveInt = 512,
        batch_size: PositiveInt = 4,
        val_fraction: FractionBelowOne = 0.1,
        val_size: NonNegativeInt | None = None,
        limit: PositiveInt | None = None,
        bucket_batches: PositiveInt = 50,
        pad_to_multiple_of: PositiveInt | None = None,
        share_prefix: bool = True,
        seed: int = 0,
        num_workers: NonNegativeInt = 0,
    ):
        super().__init__(
            path=path,
            tokenizer=tokenizer,
            system_prompt=system_prompt,
            max_length=max_length,
            batch_size=batch_size,
            val_fraction=val_fraction,
            val_size=val_size,
            limit=limit,
            bucket_batches=bucket_batches,
            pad_to_multiple_of=pad_to_multiple_of,
            share_prefix=share_prefix,
            seed=seed,
            num_workers=num_workers,
        )

    def encode(self, pairs: list[PreferencePair]) -> list[dict]:
        """Token ids of both sides of each pair, as the reward stage makes them, and
        the index where each side's reply starts (``starts``)."""
        texts, prompts = [], []
        for pair in pairs:
            texts.append(render_for_reward(self.tokenizer, pair.conversation, pair.chosen, self.system_prompt))
            texts.append(render_for_reward(self.tokenizer, pair.conversation, pair.rejected, self.system_prompt))
            prompts.append(render_chat(self.tokenizer, pair.conversation, self.system_prompt, add_generation_prompt=True))
        ids = tokenize_for_reward_lists(self.tokenizer, texts, None)
        prompt_ids = tokenize_for_reward_lists(self.tokenizer, prompts, None)
        rows = []
        for i, pair in enumerate(pairs):
            full_chosen, full_rejected = ids[2 * i], ids[2 * i + 1]
            # The prompt's tokens as they occur in each sequence (a merge across the
            # boundary would make the two differ at its last token).
            prompt = min(common_prefix_length(prompt_ids[i], full_chosen), common_prefix_length(prompt_ids[i], full_rejected))
            chosen, rejected = truncate_pair(full_chosen, full_rejected, self.max_length)
            rows.append(
                {
                    "chosen": chosen,
                    "rejected": rejected,
                    "p_chosen": pair.p_chosen,
                    "shared": shared_prefix_length(chosen, rejected),
                    "starts": (
                        reply_start(prompt, len(full_chosen), len(chosen)),
                        reply_start(prompt, len(full_rejected), len(rejected)),
                    ),
                }
            )
        return rows

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The reward stage's batch plus ``response_start`` (B, 2) long: where the
        chosen and the rejected reply start in their own sequences."""
        batch = super().collate(rows)
        batch["response_start"] = torch.tensor([r["starts"] for r in rows], dtype=torch.long)
        return batch


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
