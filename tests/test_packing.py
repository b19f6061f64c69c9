"""Shared-prefix packing: the layout and mask by hand, the grouping of sequences into
rows by hand, and packed forwards equal to unpacked ones on the tiny model (PPO/RLOO
episodes with gradients, reward-model scoring)."""

from __future__ import annotations

import pytest
import torch

from ucai.packing import (
    PAD,
    PREFIX,
    PackedEpisodes,
    common_prefix_length,
    group_into_rows,
    pack_rows,
    packed_attention_mask,
    packed_layout,
)
from ucai.rl import logprobs_from_logits


def test_layout_of_three_replies_and_an_unused_slot_by_hand():
    # row 0: prefix 2, replies of 1 and 2 tokens, one pad column; row 1: prefix 1, one reply
    segment, position = packed_layout(torch.tensor([[2, 1, 2, 0], [1, 1, 0, 0]]), 6)
    assert segment.tolist() == [[PREFIX, PREFIX, 1, 2, 2, PAD], [PREFIX, 1, PAD, PAD, PAD, PAD]]
    # every reply counts on from the end of its prefix
    assert position.tolist() == [[0, 1, 2, 2, 3, 0], [0, 1, 0, 0, 0, 0]]
    expected = [  # row 0, query rows, key columns
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # reply 1: prefix and itself
        [1, 1, 0, 1, 0, 0],  # reply 2: prefix and itself, not reply 1
        [1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding: itself only
    ]
    assert packed_attention_mask(segment)[0, 0].int().tolist() == expected


def test_layout_without_a_prefix_by_hand():
    # no shared prefix: two replies of 2 and 1 tokens, each its own sequence from position 0
    segment, position = packed_layout(torch.tensor([[0, 2, 1]]), 4)
    assert segment.tolist() == [[1, 1, 2, PAD]]
    assert position.tolist() == [[0, 1, 0, 0]]
    assert packed_attention_mask(segment)[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 0],  # reply 2 sees itself only
        [0, 0, 0, 1],
    ]


def test_pack_rows_pads_on_the_right_and_counts_segments():
    ids, lengths = pack_rows([([1, 2], [[3], [4, 5]]), ([6], [[7]])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert lengths.tolist() == [[2, 1, 2], [1, 1, 0]]


def test_grouping_by_hand():
    a, b, c, d = [1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9], [7, 8]
    assert common_prefix_length([a, b]) == 3 and common_prefix_length([a, b, c]) == 2
    rows = group_into_rows([a, b, c, d], ["p", "p", "p", "q"], max_row_tokens=9)
    # a and b share 3 tokens; c shares 2 with them, so the row's prefix shrinks to 2:
    # 2 + (2 + 3 + 1) = 8 tokens. d is alone and keeps one token as its own reply.
    assert rows == [([0, 1, 2], [1, 2], [[3, 4], [3, 5, 6], [9]]), ([3], [7], [[8]])]
    # with 7 tokens c does not fit (8): it starts a row of its own
    rows = group_into_rows([a, b, c, d], ["p", "p", "p", "q"], max_row_tokens=7)
    assert rows == [([0, 1], [1, 2, 3], [[4], [5, 6]]), ([2], [1, 2], [[9]]), ([3], [7], [[8]])]
    # a sequence equal to the start of another still keeps a token of its own
    assert group_into_rows([[1, 2], [1, 2, 3]], [0, 0], 10) == [([0, 1], [1], [[2], [2, 3]])]
    # one that shares nothing (e.g. truncated on the left) waits for a row of its own
    assert group_into_rows([[1, 2, 3], [9, 2, 3], [1, 2, 4]], [0, 0, 0], 10) == [
        ([0, 2], [1, 2], [[3], [4]]),
        ([1], [9, 2], [[3]]),
    ]
    # once a row is full, the rest of the group goes to the next rows
    assert group_into_rows([[1, 2, 3], [1, 2, 4], [1, 2, 5]], [0, 0, 0], 4) == [
        ([0, 1], [1, 2], [[3], [4]]),
        ([2], [1, 2], [[5]]),
    ]


def episodes(tokenizer, module):
    """Five episodes: prompt A three times, prompt B twice (B shorter: left padding),
    responses of different lengths after a stop token, two of A's starting alike."""
    prompts = module.render(["Tell me about the sea and the ships on it.", "Hi."])
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    order = [0, 0, 0, 1, 1]
    prompt_ids, prompt_mask = encoded["input_ids"][order], encoded["attention_mask"][order]
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generator = torch.Generator().manual_seed(0)
    responses = torch.randint(3, 1000, (5, 6), generator=generator)
    responses[1:3, :3] = responses[0, :3]  # A's samples share a start beyond the prompt
    responses[4] = responses[3]  # B's two samples are the same, stopped after 2 tokens
    completion = torch.ones(5, 6, dtype=torch.long)
    for row, length in ((0, 4), (3, 2), (4, 2)):  # stopped early: the stop token, then padding
        responses[row, length - 1] = stop
        responses[row, length:] = tokenizer.pad_token_id
        completion[row, length:] = 0
    ids = torch.cat([prompt_ids, responses], dim=1)
    attention = torch.cat([prompt_mask, completion], dim=1)
    return ids, attention, prompt_ids.shape[1], completion


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [1024, "tight"])
def test_packed_episodes_equal_unpacked_logprobs_and_gradients(tiny_ppo, monkeypatch, attention, budget):
    import ucai.stages.ppo as ppo

    module = tiny_ppo(advantage="rloo", rloo_k=2)
    module.configure_model()
    monkeypatch.setattr(module._causal_lm().config, "_attn_implementation", attention)
    with torch.no_grad():  # a policy adapter that changes the model
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    ids, mask, width, completion = episodes(module.tokenizer, module)
    prompt_a = int(mask[0, :width].sum())
    # "tight": a row holds prompt A and two of its samples, so A's third starts a row
    tokens = 1024 if budget == 1024 else prompt_a + 3 + 6 - 3 + 4 - 3
    monkeypatch.setattr(ppo, "PACKED_ROW_TOKENS", tokens)
    packed = PackedEpisodes.build(ids, mask, width, module.tokenizer.pad_token_id, tokens)
    assert packed is not None and packed.ids.shape[0] == (2 if budget == 1024 else 3)
    # the shared start of A's samples is in the prefix: the row is prompt + 3 + their rests
    assert packed.lengths[0, 0] == prompt_a + 3

    def logprobs_and_grads(pack: bool):
        module.pack_shared_prompts = pack
        module.policy.zero_grad()
        hidden = module.response_hidden(ids, mask, width)  # (5, 6, H)
        logprobs = logprobs_from_logits(module.response_logits(hidden), ids[:, width:])
        (logprobs * completion).sum().backward()
        grads = [p.grad.clone() for p in module.policy.parameters() if p.requires_grad]
        return logprobs.detach(), grads

    packed_logprobs, packed_grads = logprobs_and_grads(True)
    plain_logprobs, plain_grads = logprobs_and_grads(False)
    real = completion.bool()
    torch.testing.assert_close(packed_logprobs[real], plain_logprobs[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(packed_logprobs).all()  # padding positions too
    assert any(g.abs().max() > 0 for g in plain_grads)
    for a, b in zip(packed_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_episodes_with_distinct_prompts_are_not_packed(tiny_ppo):
    module = tiny_ppo()
    module.configure_model()
    ids, attention, width, _ = episodes(module.tokenizer, module)
    keep = [0, 3]  # one episode per prompt
    assert PackedEpisodes.build(ids[keep], attention[keep], width, module.tokenizer.pad_token_id, 1024) is None


def test_scorer_packs_answers_to_one_prompt_and_scores_as_alone(tmp_path, monkeypatch):
    from ucai.reward_scoring import RewardScorer, RewardStats, unwrap_peft
    from ucai.stages.reward import RewardModule

    module = RewardModule(model="tiny-llama", seed=0)
    module.configure_model()
    with torch.no_grad():  # a head that reads the hidden state (it starts at zero)
        unwrap_peft(module.net).score.modules_to_save["default"].weight.normal_(
            0.0, 0.5, generator=torch.Generator().manual_seed(0)
        )
    module.stats = RewardStats(mean=0.3, std=2.0, max_length=48)
    folder = module.save(tmp_path / "rm_model")
    prompts = ["Tell me about your day."] * 5 + ["What is the capital of France?"] * 3 + ["Hi"]
    responses = [
        "Quiet.", "Quiet, kindly and calm.", "A long day " * 20, "Busy.", "Busy with the sun and the road.",
        "Paris.", "Paris, of course.", "I do not know.", "Hello!",
    ]
    packed = RewardScorer(folder, batch_size=4)
    plain = RewardScorer(folder, batch_size=4, pack_tokens=None)
    import ucai.reward_scoring as scoring

    tokens = []
    original = scoring.packed_rewards

    def counted(model, ids, lengths):
        tokens.append(int(lengths.sum()))
        return original(model, ids, lengths)

    monkeypatch.setattr(scoring, "packed_rewards", counted)
    together = packed.raw_rewards(prompts, responses)
    plain_rewards = plain.raw_rewards(prompts, responses)
    alone = torch.cat([plain.raw_rewards([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_rewards, alone, atol=1e-5, rtol=1e-5)
    assert together.unique().numel() == len(responses)
    # each prompt's conversation ran once per row: fewer tokens than the texts hold
    rendered = packed.tokenizer(packed.render(prompts, responses), truncation=True, max_length=48)["input_ids"]
    assert sum(tokens) < 0.85 * sum(len(ids) for ids in rendered)
    # the long answer was truncated to 48 tokens (its end kept) and still scored alike
    assert len(packed.tokenizer(packed.render(prompts[2:3], responses[2:3]))["input_ids"][0]) > 48


def test_episode_packer_builds_once_per_batch(tiny_ppo, monkeypatch):
    from ucai.packing import EpisodePacker

    module = tiny_ppo()
    module.configure_model()
    ids, mask, width, _ = episodes(module.tokenizer, module)
    builds = []
    original = PackedEpisodes.build.__func__
    monkeypatch.setattr(PackedEpisodes, "build", classmethod(lambda cls, *a: builds.append(1) or original(cls, *a)))
    packer = EpisodePacker(module.tokenizer.pad_token_id)
    first = packer(ids, mask, width)
    assert packer(ids, mask, width) is first and len(builds) == 1  # policy, reference, value: one layout
    copy = ids.clone()  # equal values, another batch: built again
    assert packer(copy, mask, width) is not first and len(builds) == 2
