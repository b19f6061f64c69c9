"""Masks and positions of padded token rows: one definition for generation, PPO's
forward passes and reward scoring, so that all three read a row the same way.

A mask is (B, L) with 1 on real tokens and 0 on padding. Prompts are padded on the left
(generation appends on the right); PPO responses and training rows are padded on the
right, after their last real token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position of each token, counted from its row's first real token.

    Left padding gets position 0. Right padding keeps the last real token's position:
    no real token attends to it, so its position changes no result. For a left-padded
    mask this is the ``cumsum - 1`` with padding set to 0 that the prefill of
    `ucai.generation_engine` relies on.
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def prompt_attention_mask(prompt_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, P) mask of a left-padded prompt block: everything from the first non-pad token.

    Counting from the first real token (not ``!= pad``) keeps a pad id that occurs
    inside a prompt attended to.
    """
    return ((prompt_ids != pad_id).long().cumsum(dim=1) > 0).long()


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last 1 in each row of a (B, L) mask, whatever the padding side.

    argmax returns the first maximum, so on the flipped mask it finds the last 1. A row
    of zeros gives L - 1; callers only see such rows if a sequence is empty, which
    neither tokenised text nor generation produces.
    """
    width = mask.shape[1]
    return width - 1 - mask.long().flip(1).argmax(dim=1)


def completion_mask_from(completions: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real completion tokens: everything up to and including the first stop id.

    Args:
        completions: (B, T) generated ids (after the prompt).
        stop_ids: ids that end a turn.
    Returns:
        mask: (B, T) long, 1 up to and including the first stop token, 0 after.
        finished: (B,) bool, whether a stop token occurred.
    """
    is_stop = torch.isin(completions, torch.tensor(stop_ids, device=completions.device))
    # Number of stop tokens strictly before each position; real tokens have none.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    return mask, is_stop.any(dim=1)


@contextmanager
def tokenizer_sides(tokenizer, padding: str, truncation: str) -> Iterator[None]:
    """Pad and truncate on the given sides inside the block; the tokenizer's own sides
    afterwards, whatever happens (the tokenizer is shared with the caller)."""
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = padding, truncation
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
