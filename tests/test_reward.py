"""Reward model: Bradley–Terry numbers by hand, the accuracy metric, last-token pooling,
the trained head, the data readers, and a tiny model learning a synthetic preference."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from ucai.data.preference_data import PreferenceDataModule, length_buckets, read_preferences, truncate_pair
from ucai.errors import UcaiError
from ucai.losses import bradley_terry_loss
from ucai.packing import PAD, PREFIX, packed_attention_mask, packed_layout
from ucai.reward_scoring import (
    CHOSEN,
    REJECTED,
    RewardScorer,
    packed_pair_rewards,
    packs_pairs,
    sequence_rewards,
    tokenize_for_reward,
    unwrap_peft,
)
from ucai.stages.reward import PairwiseAccuracy, RewardMetrics, RewardModule, hard_labels, head_name

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"
FIXTURE = ROOT / "tests" / "fixtures" / "preferences_small.jsonl"


# --------------------------------------------------------------------------- loss by hand


def test_bradley_terry_hard_labels_by_hand():
    # pair 1: Δ = 2 → −log σ(2) = log(1 + e^−2) = log(1.135335) = 0.126928
    # pair 2: Δ = 0 → −log σ(0) = log 2 = 0.693147;   mean = 0.410038
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx(0.410038, abs=1e-5)


def test_bradley_terry_soft_label_by_hand():
    # p = 0.75, Δ = 1: log σ(1) = −0.313262, log σ(−1) = −1.313262
    # loss = 0.75·0.313262 + 0.25·1.313262 = 0.234946 + 0.328315 = 0.563262
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.75]))
    assert loss.item() == pytest.approx(0.563262, abs=1e-5)
    # p = 0.5 is indifferent: 0.5·(softplus(−2) + softplus(2)) = 0.5·(0.126928 + 2.126928) = 1.126928
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.5]))
    assert loss.item() == pytest.approx(1.126928, abs=1e-5)


def test_bradley_terry_margin_and_centring_by_hand():
    # Δ = 1 − 0 − margin 1 = 0 → log 2 = 0.693147
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0)
    assert loss.item() == pytest.approx(0.693147, abs=1e-5)
    # r_c = r_r = 1: Δ = 0 → 0.693147, centring 0.1·(1 + 1)² = 0.4 → 1.093147
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.1)
    assert loss.item() == pytest.approx(1.093147, abs=1e-5)


def test_soft_label_margin_is_symmetric_by_hand():
    # p = 0.5, Δ = 0, m = 1: both terms are −log σ(0 − 1) = log(1 + e) = 1.313262, so the
    # loss is 1.313262 and dL/dΔ = 0.5·(σ(−1) − 1) + 0.5·(1 − σ(−1)) = 0: a 50/50 pair is
    # already at its optimum with equal rewards (a margin taken off Δ once would give
    # 0.5·(1.313262 + 0.313262) = 0.813262 and push Δ up).
    chosen = torch.tensor([0.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.tensor([0.0]), torch.tensor([0.5]), margin=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.313262, abs=1e-5)
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-7)
    # p = 0.75, Δ = 1, m = 0.5: 0.75·(−log σ(0.5)) + 0.25·(−log σ(−1.5))
    #   = 0.75·log(1 + e^−0.5) + 0.25·log(1 + e^1.5) = 0.75·0.474077 + 0.25·1.701413 = 0.780911
    # dL/dΔ = 0.75·(σ(0.5) − 1) + 0.25·(1 − σ(−1.5)) = 0.75·(−0.377541) + 0.25·0.817574 = −0.078762
    chosen = torch.tensor([1.0], requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.tensor([0.0]), torch.tensor([0.75]), margin=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.780911, abs=1e-5)
    assert chosen.grad.item() == pytest.approx(-0.078762, abs=1e-5)


def test_hard_label_margin_is_the_soft_loss_at_p_1():
    # Δ = 1.5, m = 0.5: −log σ(1) = 0.313262, with p = 1 as with no p at all; per-pair margins
    # (Δ = 1.5 and 0, m = 0.5 and 0): mean(0.313262, log 2 = 0.693147) = 0.503205
    chosen, rejected = torch.tensor([1.5, 0.0]), torch.tensor([0.0, 0.0])
    margin = torch.tensor([0.5, 0.0])
    hard = bradley_terry_loss(chosen, rejected, margin=margin)
    soft = bradley_terry_loss(chosen, rejected, torch.tensor([1.0, 1.0]), margin=margin)
    assert hard.item() == pytest.approx(0.503205, abs=1e-5)
    assert soft.item() == pytest.approx(0.503205, abs=1e-5)


def test_hard_labels_follow_the_side_p_chosen_prefers():
    assert hard_labels(torch.tensor([0.9, 1.0, 0.2, 0.5])).tolist() == [1.0, 1.0, 0.0, 0.5]
    # the reward stage without soft labels: r_c = 1, r_r = 0 but p_chosen = 0.2 prefers the
    # rejected reply, so the hard label is 0 and the loss is −log σ(−1) = 1.313262
    module = RewardModule(model="tiny-llama", soft_labels=False)
    module.pair_rewards = lambda batch: torch.tensor([1.0, 0.0])
    loss = module._step({"p_chosen": torch.tensor([0.2])}, RewardMetrics(), step_values=False)
    assert loss.item() == pytest.approx(1.313262, abs=1e-5)


def test_pairwise_accuracy_by_hand():
    # signs of r_c − r_r: +1, 0 (tie), −1, +1; the last label says rejected is better
    # (p = 0.2) so its sign flips to −1. Correct: 1 + 0.5 + 0 + 0 = 1.5 of 4 = 0.375.
    metric = PairwiseAccuracy()
    metric.update(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.2]))
    assert metric.compute().item() == pytest.approx(0.375)
    metric.update(torch.tensor([5.0]), torch.tensor([1.0]))  # 1 more right: 2.5 of 5
    assert metric.compute().item() == pytest.approx(0.5)


def test_pairwise_accuracy_counts_a_50_50_label_one_half():
    # the judge prefers neither reply in the first two pairs: ranking chosen first is only
    # half right (0.5 + 0.5); p = 0.7 with r_c < r_r is wrong (0): 1 of 3
    metric = PairwiseAccuracy()
    metric.update(torch.tensor([2.0, 3.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.5, 0.5, 0.7]))
    assert metric.compute().item() == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- pooling


@pytest.fixture(scope="module")
def tiny_reward():
    module = RewardModule(model="tiny-llama", seed=0)
    module.configure_model()
    # The head starts at zero (every reward 0); the pooling tests need one that reads
    # the hidden state, so give the trained copy random weights.
    head = unwrap_peft(module.net).score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    module.net.eval()
    return module


def test_left_and_right_padding_give_identical_scores(tiny_reward):
    tokenizer = tiny_reward.tokenizer
    texts = ["the cat sat on the mat and looked around", "hi", "a medium length text here"]
    with torch.no_grad():
        right = tokenize_for_reward(tokenizer, texts, 64, "right")
        left = tokenize_for_reward(tokenizer, texts, 64, "left")
        assert not torch.equal(right["input_ids"], left["input_ids"])  # the padding really differs
        r = sequence_rewards(tiny_reward.net, right["input_ids"], right["attention_mask"])
        lp = sequence_rewards(tiny_reward.net, left["input_ids"], left["attention_mask"])
        alone = torch.stack([
            sequence_rewards(tiny_reward.net, *tokenize_for_reward(tokenizer, [t], 64).values())[0] for t in texts
        ])
    torch.testing.assert_close(r, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, alone, atol=1e-5, rtol=1e-5)
    assert r.unique().numel() == 3


def test_lora_trains_the_head_in_full(tiny_reward):
    net = tiny_reward.net
    assert head_name(net) == "score"
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert any("score" in n and "lora" not in n for n in trainable), "head must be trained in full"
    assert any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


@pytest.mark.parametrize("disable", [True, False])
def test_backbone_dropout_is_off_by_default_and_lora_keeps_its_own(disable, tiny_lora):
    # all-MiniLM-L6-v2 (BERT) has dropout 0.1 in every layer, attention included
    module = RewardModule(
        model="all-minilm-l6-v2", output_dir=None, disable_dropout=disable,
        lora=dataclasses.replace(tiny_lora, dropout=0.2),
    )
    module.configure_model()
    rates = {name: m.p for name, m in module.net.named_modules() if isinstance(m, torch.nn.Dropout)}
    lora = {name: p for name, p in rates.items() if "lora_dropout" in name}
    backbone = {name: p for name, p in rates.items() if "lora_dropout" not in name}
    assert lora and set(lora.values()) == {0.2}
    assert backbone and set(backbone.values()) == ({0.0} if disable else {0.1})


def test_encoder_backbone_scores_cls_and_ignores_padding():
    module = RewardModule(model="all-minilm-l6-v2")
    module.configure_model()
    module.net.eval()
    texts = ["a short one", "a considerably longer text with many more words in it"]
    with torch.no_grad():
        batch = tokenize_for_reward(module.tokenizer, texts, 64)
        both = sequence_rewards(module.net, batch["input_ids"], batch["attention_mask"])
        first = tokenize_for_reward(module.tokenizer, texts[:1], 64)
        alone = sequence_rewards(module.net, first["input_ids"], first["attention_mask"])
    assert batch["input_ids"][0, 0].item() == module.tokenizer.cls_token_id
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- data


def test_hh_rlhf_pairs_split_shared_prefix(tmp_path):
    path = tmp_path / "hh.jsonl.gz"
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?"
    rows = [
        {"chosen": prefix + "\n\nAssistant: I can't help with that.", "rejected": prefix + "\n\nAssistant: Use a pin."},
        {"chosen": prefix + "\n\nAssistant: same", "rejected": prefix + "\n\nAssistant: same"},  # no preference
    ]
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    pairs = read_preferences(path)
    assert len(pairs) == 1
    pair = pairs[0]
    assert [m["role"] for m in pair.conversation] == ["user", "assistant", "user"]
    assert pair.conversation[-1]["content"] == "how do I pick a lock?"
    assert (pair.chosen, pair.rejected, pair.p_chosen) == ("I can't help with that.", "Use a pin.", 1.0)


def test_preference_file_errors_name_file_and_line(tmp_path):
    missing = tmp_path / "nothing.jsonl"
    with pytest.raises(UcaiError, match="nothing.jsonl.*preferences_<side>"):
        read_preferences(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": 2}\n')
    with pytest.raises(UcaiError, match=r"bad.jsonl:2: .*p_chosen"):
        read_preferences(bad)


def test_length_buckets_cover_every_index_once_and_reduce_padding():
    lengths = [(i * 37) % 100 + 1 for i in range(200)]
    batches = length_buckets(lengths, 4, seed=0, bucket_batches=10)
    assert sorted(i for b in batches for i in b) == list(range(200))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    unsorted = length_buckets(lengths, 4, seed=0, bucket_batches=0)  # chunks of one batch
    assert padded < sum(len(b) * max(lengths[i] for i in b) for b in unsorted)


def test_truncate_pair_cuts_the_shared_start_equally():
    chosen, rejected = [1, 2, 3, 4, 5, 10, 11], [1, 2, 3, 4, 5, 20]
    assert truncate_pair(chosen, rejected, 7) == (chosen, rejected)  # fits: untouched
    # 2 tokens too long: both lose the same 2 conversation tokens and still share [3, 4, 5]
    assert truncate_pair(chosen, rejected, 5) == ([3, 4, 5, 10, 11], [3, 4, 5, 20])
    # a reply longer than the budget: the whole shared start goes, then each keeps its end
    assert truncate_pair([1, 2, 10, 11, 12, 13], [1, 2, 20], 3) == ([11, 12, 13], [20])


def test_datamodule_batches_chosen_then_rejected():
    dm = PreferenceDataModule(path=str(FIXTURE), tokenizer="tiny-llama", max_length=64, batch_size=4, val_size=16)
    dm.setup("fit")
    assert (len(dm.train_pairs), len(dm.val_pairs)) == (80, 16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["p_chosen"].shape == (4,)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["pair_ids"].shape[1] % 8 == 0  # no trainer: 8
    assert batch["attention_mask"][:, 0].all()  # right padding: every row starts real
    first = dm._encoded["val"][0]
    text = dm.tokenizer.decode(first["chosen"])
    assert text.endswith("<|im_end|>") and "kindly" in text


@pytest.mark.parametrize(
    "setting, device, precision, expected",
    [
        (None, "cpu", "bf16-mixed", 32),  # bounded memory of CPU 16-bit kernels
        (None, "cpu", "bf16-true", 32),
        (None, "cpu", "16-mixed", 32),
        (None, "cpu", "32-true", 8),  # the fp32 fallback: padding is pure cost
        (None, "cuda", "bf16-mixed", 8),
        (1, "cpu", "bf16-mixed", 1),  # a setting wins
    ],
)
def test_batch_widths_round_to_a_multiple_chosen_by_precision_and_device(setting, device, precision, expected):
    from types import SimpleNamespace

    dm = PreferenceDataModule(
        path=str(FIXTURE), tokenizer="tiny-llama", max_length=64, batch_size=4, val_size=16, pad_to_multiple_of=setting
    )
    dm.trainer = SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device(device)))
    assert dm.width_multiple() == expected
    dm.setup("fit")
    widths = {batch["pair_ids"].shape[1] for batch in dm.val_dataloader()}
    assert all(width % expected == 0 for width in widths)
    if expected == 1:  # no rounding: the widest packed pair of the batch
        assert any(width % 8 for width in widths)


# --------------------------------------------------------------------------- end to end


def _val_accuracy(folder: Path) -> float:
    scorer = RewardScorer(folder)
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()][-16:]  # val_size: 16
    chosen, _ = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected, _ = scorer.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return (chosen > rejected).float().mean().item()


def test_held_out_accuracy_is_measured_on_the_final_model_with_the_trainer_s_validation_off(tmp_path, run_cli, monkeypatch):
    # The pipeline configs turn the trainer's validation off (limit_val_batches: 0): the
    # held-out pairs are then scored once, after training, and nowhere else.
    from ucai.stages.reward import RewardModule

    def no_validation(*args, **kwargs):
        raise AssertionError("the trainer validated")

    monkeypatch.setattr(RewardModule, "validation_step", no_validation)
    out = tmp_path / "rm_model"
    code = run_cli("fit", "--config", CONF / "reward_tiny.yaml", "--model.init_args.output_dir", out,
                   "--data.init_args.path", FIXTURE, "--trainer.limit_val_batches=0", "--trainer.max_steps=10")
    assert code == 0
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["heldout_pairs"] == 16 and stats["heldout_accuracy"] == pytest.approx(_val_accuracy(out), abs=1e-6)


def test_tiny_reward_model_learns_marker_word_and_scores_a_file(tmp_path, run_cli, caplog):
    # The "other side" prefers the opposite: its pairs are the 16 held-out pairs with
    # chosen and rejected swapped, so every pair ordered right here is wrong there.
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()][-16:]  # val_size: 16
    swapped = tmp_path / "other_side.jsonl"
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    out = tmp_path / "rm_model"
    with caplog.at_level("INFO", logger="ucai.stages.reward"):
        code = run_cli("fit", "--config", CONF / "reward_tiny.yaml", "--model.init_args.output_dir", out,
                       "--data.init_args.path", FIXTURE, "--data.init_args.cross_path", swapped)
    assert code == 0
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["pairs"] == 80 and stats["std"] > 0 and math.isfinite(stats["mean"])
    accuracy = _val_accuracy(out)  # the saved, merged model through RewardScorer, as PPO scores
    assert accuracy >= 0.9
    # The stage's own figure is that same accuracy (k/16 for whole k: no ties) and the
    # swapped copy scores its complement exactly: k/16 right here is (16 − k)/16 there.
    assert stats["heldout_pairs"] == 16 and stats["heldout_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert stats["cross_pairs"] == 16 and stats["cross_accuracy"] == pytest.approx(1 - accuracy, abs=1e-6)
    line = next(r.getMessage() for r in caplog.records if "cross accuracy" in r.getMessage())
    assert f"held-out accuracy {accuracy:.3f} (n=16)" in line and f"{1 - accuracy:.3f} (n=16" in line

    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"prompt": "Tell me about your day.", "response": "Quiet kindly cat sun."}) + "\n"
        + json.dumps({"prompt": "Tell me about your day.", "response": "Quiet road cat sun."}) + "\n"
    )
    scores = tmp_path / "scores.jsonl"
    code = run_cli("predict", "--config", CONF / "reward_score_tiny.yaml", "--model.init_args.reward_model", out,
                   "--model.init_args.output", scores, "--data.init_args.path", answers)
    assert code == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert rows[0]["score"] > rows[1]["score"]  # the marker word wins
    assert rows[0]["score"] == pytest.approx(1 / (1 + math.exp(-rows[0]["reward"])), abs=1e-5)


def test_missing_preference_file_is_one_clear_error(tmp_path, run_cli, capsys):
    code = run_cli("fit", "--config", CONF / "reward_tiny.yaml", "--data.init_args.path", tmp_path / "absent.jsonl",
                   "--model.init_args.output_dir", tmp_path / "rm")
    assert code == 2
    err = capsys.readouterr().err
    assert "absent.jsonl" in err and "preference stage" in err


def test_scorer_without_stats_names_the_stage(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UcaiError, match="reward_stats.json.*reward stage"):
        RewardScorer(tmp_path)


def test_packed_layout_and_mask_by_hand():
    # one pair: prefix 2 tokens, chosen rest 2, rejected rest 1, one pad column
    segment, position = packed_layout(torch.tensor([[2, 2, 1]]), 6)
    assert segment.tolist() == [[PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED, PAD]]
    assert position.tolist() == [[0, 1, 2, 3, 2, 0]]  # the rejected reply restarts after the prefix
    expected = [  # query rows, key columns
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected: the prefix and itself, not the chosen reply
        [0, 0, 0, 0, 0, 1],  # padding sees itself only (no all-masked softmax row)
    ]
    assert packed_attention_mask(segment)[0, 0].int().tolist() == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_pairs_match_full_sequences_with_gradients(tiny_reward, attention, monkeypatch):
    # Pairs whose texts share the conversation and differ in the reply, of different lengths.
    dm = PreferenceDataModule(
        path=str(FIXTURE), tokenizer="tiny-llama", max_length=64, batch_size=4, val_size=16, bucket_batches=1
    )
    dm.setup("fit")
    # a batch whose packed rows differ in width, so some rows carry padding
    batch = next(b for b in dm.train_dataloader() if b["pair_segments"].sum(1).unique().numel() > 1)
    segments = batch["pair_segments"]
    assert segments[:, 0].min() > 10  # real shared prefixes
    # a packed row is the chosen text followed by the rejected text's own reply
    row = dm._encoded["train"][0]
    assert row["chosen"][: row["shared"]] == row["rejected"][: row["shared"]]
    net = tiny_reward.net
    monkeypatch.setattr(unwrap_peft(net).config, "_attn_implementation", attention)  # the fixture is shared
    assert packs_pairs(net)

    def rewards_and_grads(forward):
        net.zero_grad()
        rewards = forward()
        rewards.pow(2).sum().backward()
        return rewards.detach(), [p.grad.clone() for p in net.parameters() if p.requires_grad]

    full, grads_full = rewards_and_grads(lambda: sequence_rewards(net, batch["input_ids"], batch["attention_mask"]))
    packed, grads_packed = rewards_and_grads(lambda: packed_pair_rewards(net, batch["pair_ids"], segments))
    net.zero_grad()
    assert batch["pair_ids"].numel() < batch["input_ids"].numel()
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads_packed, grads_full, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_flash_attention_models_are_not_packed(tiny_reward, monkeypatch):
    # flash-attention 2 reads a 2D padding mask; a custom 4D mask would be ignored or rejected
    monkeypatch.setattr(unwrap_peft(tiny_reward.net).config, "_attn_implementation", "flash_attention_2")
    assert not packs_pairs(tiny_reward.net)


def test_validation_pairs_are_drawn_independently_of_the_prompt_split():
    """Preference pairs come from the prompts' train split (hash ≥ heldout_fraction); a
    validation split by the same hash with a smaller fraction would be empty. It was, in
    the CPU experiment: 260 training and 0 validation pairs at val_fraction 0.15."""
    from ucai.data.preference_data import PreferencePair
    from ucai.data.prompt_datamodule import is_heldout

    ids = [f"p{i:03d}" for i in range(1000)]
    train_ids = [i for i in ids if not is_heldout(i, 0.22)]  # what the preferences stage reads
    pairs = [PreferencePair(i, [{"role": "user", "content": i}], "a", "b") for i in train_ids]
    dm = PreferenceDataModule(path=str(FIXTURE), tokenizer="tiny-llama", val_fraction=0.15)
    train, val = dm.split(pairs)
    assert len(train) + len(val) == len(pairs)
    assert 0.11 < len(val) / len(pairs) < 0.19  # about 15% of ~780 pairs, not 0
    assert {p.id for p in val}.isdisjoint(p.id for p in train)
    # The unsalted prompt split is unchanged (stable held-out prompts across versions):
    # the first 8 bytes of sha256("0:<id>") as a fraction of 2**64.
    import hashlib

    for prompt_id in ids[:50]:
        fraction = int.from_bytes(hashlib.sha256(f"0:{prompt_id}".encode()).digest()[:8], "big") / 2**64
        assert is_heldout(prompt_id, 0.3) == (fraction < 0.3)


@pytest.mark.parametrize(
    ("command", "config", "option", "value"),
    [
        ("fit", "reward_tiny.yaml", "learning_rate", "-0.0001"),
        ("fit", "reward_tiny.yaml", "warmup_steps", "-1"),
        ("fit", "reward_tiny.yaml", "center_coef", "-0.5"),
        ("fit", "reward_tiny.yaml", "lora.r", "0"),
        ("predict", "reward_score_tiny.yaml", "batch_texts", "0"),
    ],
)
def test_an_out_of_range_setting_is_one_line_naming_it(command, config, option, value, run_cli, capsys):
    assert run_cli(command, "--config", CONF / config, f"--model.init_args.{option}={value}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucai: error: --model.init_args."), lines
    assert option.split(".")[-1] in lines[0] and value in lines[0], lines
