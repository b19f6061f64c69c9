"""SFTDataModule: readers, the label mask, truncation, packing and length buckets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from ucai.chat import render_chat
from ucai.data.sft_data import (
    IGNORE_INDEX,
    Encoded,
    LengthBucketSampler,
    SFTExample,
    collate_packed,
    collate_padded,
    encode_examples,
    read_sft_examples,
    split_examples,
    truncate,
)
from ucai.errors import UcaiError

FIXTURE = Path(__file__).parent / "fixtures" / "sl_small.jsonl"
SYSTEM = "You are a helpful assistant."


def test_label_mask_is_exactly_response_plus_end_of_turn(tiny_tokenizer):
    example = SFTExample("x", ({"role": "user", "content": "What is 2+2?"},), "Four, of course.")
    (encoded,) = encode_examples(tiny_tokenizer, [example], SYSTEM, max_length=512)
    batch = collate_padded([encoded], tiny_tokenizer.pad_token_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # The real template rendering of the whole conversation is prompt + reply + "<|im_end|>\n";
    # the trained sequence is exactly that without the template's trailing newline.
    full = tiny_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four, of course."},
        ],
        tokenize=False,
    )
    assert full.endswith("<|im_end|>\n")
    assert tiny_tokenizer.decode(ids) == full[: -len("\n")]
    labelled = labels != IGNORE_INDEX
    # Labelled positions form one contiguous block at the end: the reply and its eos.
    first = int(labelled.nonzero()[0])
    assert labelled[first:].all() and not labelled[:first].any()
    assert tiny_tokenizer.decode(ids[labelled]) == "Four, of course.<|im_end|>"
    assert int(ids[-1]) == tiny_tokenizer.eos_token_id == 2
    assert tiny_tokenizer.decode(ids[:first]) == render_chat(
        tiny_tokenizer, [{"role": "user", "content": "What is 2+2?"}], SYSTEM
    )


def test_mask_is_by_position_even_when_pad_equals_eos(tiny_tokenizer):
    # SmolLM2's own config pads with <|im_end|> (= eos, id 2): a mask built from the pad
    # id would drop the eos the model must learn. Collate with pad_id = eos on purpose.
    eos = tiny_tokenizer.eos_token_id
    short = Encoded(torch.tensor([5, 6, 7, 8, eos]), prompt_length=3)  # reply = 8, eos
    long = Encoded(torch.tensor([5, 6, 9, 9, 9, 8, eos]), prompt_length=4)  # reply = 9, 8, eos
    batch = collate_padded([short, long], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, eos, eos, eos], [5, 6, 9, 9, 9, 8, eos]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 8, eos, -100, -100],
        [-100, -100, -100, -100, 9, 8, eos],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["num_tokens"] == 12


def test_packed_batch_restarts_positions_and_never_crosses_examples():
    a = Encoded(torch.tensor([10, 11, 12]), prompt_length=2)
    b = Encoded(torch.tensor([20, 21, 22, 23]), prompt_length=1)
    batch = collate_packed([a, b])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, 23]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3]]
    # The first token of b is a prompt token, so position 2 (end of a) predicts nothing.
    assert batch["labels"].tolist() == [[-100, -100, 12, -100, 21, 22, 23]]
    assert batch["num_tokens"] == 7 and "attention_mask" not in batch


def test_packed_row_matches_examples_run_alone(tiny_model, tiny_tokenizer):
    """Packing is only correct if attention stays inside each example: every example's
    hidden states in the packed row must equal those of the example run alone, and the
    summed loss must equal that of the padded batch. (use_cache=False matters: with a
    cache transformers ignores the position-id restarts and attends across examples,
    which moves these hidden states by ~3.)"""
    from ucai.stages.sft import response_token_loss

    examples = [SFTExample(str(i), ({"role": "user", "content": p},), r) for i, (p, r) in enumerate(
        [("Hi there", "Hello! How can I help?"), ("Name a colour", "Blue."), ("Count to three", "One, two, three.")]
    )]
    encoded = encode_examples(tiny_tokenizer, examples, SYSTEM, 256)
    decoder, head = tiny_model.get_decoder(), tiny_model.get_output_embeddings()
    with torch.no_grad():
        packed = collate_packed(encoded)
        hidden = decoder(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).last_hidden_state
        start = 0
        for e in encoded:
            alone = decoder(input_ids=e.input_ids[None], use_cache=False).last_hidden_state
            assert torch.allclose(hidden[:, start : start + len(e)], alone, atol=1e-4)
            start += len(e)
        loss_packed, n_packed = response_token_loss(hidden, packed["labels"], head, "sum")
        padded = collate_padded(encoded, tiny_tokenizer.pad_token_id)
        hidden = decoder(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False
        ).last_hidden_state
        loss_padded, n_padded = response_token_loss(hidden, padded["labels"], head, "sum")
    assert n_packed == n_padded == sum(len(e) - e.prompt_length for e in encoded)
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5)


def test_truncate_keeps_response_and_cuts_prompt_from_left():
    prompt, response = list(range(100)), [900, 901, 902]
    p, r = truncate(prompt, response, 10)
    assert p == list(range(93, 100)) and r == response  # 7 prompt tokens + 3 = 10
    # A reply longer than the budget: the prompt keeps max_length // 4 = 2 tokens and
    # the reply is cut on the right (it loses its eos: it did not end there).
    p, r = truncate(list(range(5)), list(range(500, 520)), 8)
    assert p == [3, 4] and r == list(range(500, 506))
    assert truncate([1, 2], [3], 8) == ([1, 2], [3])


def test_encode_respects_max_length(tiny_tokenizer):
    examples = read_sft_examples(FIXTURE)
    encoded = encode_examples(tiny_tokenizer, examples, SYSTEM, max_length=24)
    assert all(len(e) <= 24 for e in encoded)
    assert all(e.input_ids[-1] == tiny_tokenizer.eos_token_id for e in encoded if len(e) < 24)


def test_readers_sl_prompt_response_messages_and_hh_rlhf(tmp_path):
    examples = read_sft_examples(FIXTURE)
    assert len(examples) == 12 and examples[0].id == "sl-000"
    assert examples[10].messages == ({"role": "user", "content": "What is the capital of France?"},)
    assert examples[10].response == "The capital of France is Paris."

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}) + "\n")
    (example,) = read_sft_examples(chat)
    assert [m["content"] for m in example.messages] == ["a", "b", "c"] and example.response == "d"

    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as handle:
        handle.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you",
                                 "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: no"}) + "\n")
    (example,) = read_sft_examples(hh)
    assert example.messages == (
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}
    )
    assert example.response == "see you"


def test_real_hh_rlhf_file_reads(hh_rlhf_path):
    examples = read_sft_examples(hh_rlhf_path)
    assert len(examples) > 2000
    # A handful of transcripts hold two assistant turns in a row; nearly all end on the user.
    assert sum(e.messages[-1]["role"] == "user" for e in examples) > 0.99 * len(examples)


def test_bad_input_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n')
    with pytest.raises(UcaiError, match=r"bad\.jsonl:2: field 'response' must be a string"):
        read_sft_examples(bad)
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"text": "x"}\n')
    with pytest.raises(UcaiError, match=r"bad\.jsonl:3: expected fields 'prompt' and 'response'"):
        read_sft_examples(bad)
    bad.write_text('{"prompt": "a", "response": "b"\n')
    with pytest.raises(UcaiError, match=r"bad\.jsonl:1: invalid JSON"):
        read_sft_examples(bad)
    with pytest.raises(UcaiError, match=r"missing\.jsonl: SFT data not found; it is written by the critique-revision stage"):
        read_sft_examples(tmp_path / "missing.jsonl")


def test_split_is_seeded_and_disjoint():
    items = list(range(40))
    train, val = split_examples(items, 0.1, seed=3)
    assert len(val) == 4 and sorted(train + val) == items
    assert split_examples(items, 0.1, seed=3) == (train, val)
    assert split_examples(items, 0.1, seed=4)[1] != val
    assert split_examples([1, 2], 0.01, 0)[1] != []  # at least one validation example


def test_length_buckets_cover_every_example_and_group_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(50)]
    sampler = LengthBucketSampler(lengths, batch_size=4, seed=0, bucket_batches=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for b in batches for i in b) == list(range(50))
    # Padding waste: bucketed batches pad far less than the same batches drawn at random.
    def waste(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    random_batches = [list(range(50))[i : i + 4] for i in range(0, 50, 4)]
    assert waste(batches) < 0.5 * waste(random_batches)
    # Same epoch -> same order (resume); a new epoch -> a new order.
    assert list(LengthBucketSampler(lengths, 4, seed=0, bucket_batches=4)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_length_buckets_shard_evenly_across_ranks():
    lengths = list(range(1, 24))  # 23 examples, 2 ranks: one example repeated to even out
    ranks = [list(LengthBucketSampler(lengths, 3, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(LengthBucketSampler(lengths, 3, num_replicas=2, rank=0))
    seen = [i for rank in ranks for b in rank for i in b]
    assert set(seen) == set(range(23)) and len(seen) == 24
    # Both ranks step through batches of similar length together.
    for b0, b1 in zip(*ranks, strict=True):
        assert abs(max(lengths[i] for i in b0) - max(lengths[i] for i in b1)) <= 1


def test_an_exported_template_defaults_to_the_trained_system_prompt_and_keeps_a_given_one(tiny_tokenizer):
    from ucai.chat import tokenizer_for_export

    user = [{"role": "user", "content": "hi"}]
    trained = 'Be "careful".\nAlways.'  # quotes and a newline survive as a Jinja literal
    exported = tokenizer_for_export(tiny_tokenizer, trained)
    assert exported.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == render_chat(
        tiny_tokenizer, user, trained
    )
    assert exported.apply_chat_template(user, tokenize=False, add_generation_prompt=True).count("<|im_start|>system") == 1
    # A conversation that brings its own system message keeps it.
    given = [{"role": "system", "content": "Other."}, *user]
    assert exported.apply_chat_template(given, tokenize=False) == tiny_tokenizer.apply_chat_template(given, tokenize=False)
    # Exported again (PPO from an SL model's tokenizer): the new prompt replaces the old.
    again = tokenizer_for_export(exported, "Second.")
    assert again.chat_template.count("ucai: the trained system prompt") == 1
    assert again.apply_chat_template(user, tokenize=False) == render_chat(tiny_tokenizer, user, "Second.", add_generation_prompt=False)
    # Trained with the template's own (null): nothing to change.
    assert tokenizer_for_export(tiny_tokenizer, None) is tiny_tokenizer


def test_named_templates_each_get_the_prompt_and_a_templates_leading_text_is_kept(tiny_tokenizer):
    import copy

    from ucai.chat import tokenizer_for_export

    user = [{"role": "user", "content": "hi"}]
    plain = "\n{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
    tokenizer = copy.copy(tiny_tokenizer)
    tokenizer.chat_template = plain
    exported = tokenizer_for_export(tokenizer, "S")
    # The leading newline is the template's own text: kept after the added prefix.
    assert exported.apply_chat_template(user, tokenize=False) == "\n[system:S][user:hi]"
    tokenizer.chat_template = {"default": plain, "tool_use": plain + "(tools)"}
    named = tokenizer_for_export(tokenizer, "S").chat_template
    assert isinstance(named, dict) and set(named) == {"default", "tool_use"}
    exported.chat_template = named["tool_use"]
    assert exported.apply_chat_template(user, tokenize=False) == "\n[system:S][user:hi](tools)"
