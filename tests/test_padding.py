"""Masks and positions of padded rows (ucai.padding), by hand; the generation engine's
prefill positions are these for the left-padded prompts it is given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ucai.padding import last_real_index, position_ids, prompt_attention_mask, tokenizer_sides

PAD = 0


def test_position_ids_count_from_the_first_real_token():
    # Left padding: 0 on the pads, then 0, 1, 2, ... from the first real token.
    # Right padding (a response cut after eos): the pads repeat the last real position.
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2], [0, 0, 1, 2, 2]]


def test_left_padded_positions_are_those_of_cumsum_with_padding_at_zero():
    # The prefill formula of `generate`-style decoding: (cumsum − 1), padding set to 0.
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (16,), generator=generator)
    mask = (torch.arange(8).unsqueeze(0) >= 8 - lengths.unsqueeze(1)).long()  # (16, 8), left-padded
    expected = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    assert torch.equal(position_ids(mask), expected)


def test_prompt_attention_mask_keeps_a_pad_id_inside_the_prompt():
    # Row 0 is left-padded; row 1 has the pad id as a real token in its middle.
    prompts = torch.tensor([[PAD, 5, 6], [7, PAD, 9]])
    assert prompt_attention_mask(prompts, PAD).tolist() == [[0, 1, 1], [1, 1, 1]]


def test_last_real_index_either_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_real_index(right).tolist() == [2, 0, 3]
    assert last_real_index(left).tolist() == [3, 3, 3]
    assert last_real_index(torch.tensor([[0, 1, 0, 0]]).bool()).tolist() == [1]


def test_tokenizer_sides_are_restored_after_the_block_even_on_error():
    tokenizer = SimpleNamespace(padding_side="right", truncation_side="right")
    with tokenizer_sides(tokenizer, "left", "left"):
        assert (tokenizer.padding_side, tokenizer.truncation_side) == ("left", "left")
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")
    with pytest.raises(RuntimeError), tokenizer_sides(tokenizer, "left", "right"):
        raise RuntimeError("tokenising failed")
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")
