"""The reward stage's export after a bf16-mixed run: the saved model scores like the
module that trained, and its reward_stats.json describes that saved model over pairs
of every length."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from ucai.data.preference_data import PreferenceDataModule
from ucai.resume import RNGStateCheckpoint
from ucai.reward_scoring import RewardScorer, RewardStats, sequence_rewards, tokenize_for_reward
from ucai.stages.reward import RewardModule, spread_batch_indices

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "preferences_small.jsonl"
STATS_PAIRS = 16


class _Recorder(L.Callback):
    """Keeps an fp32 copy of the trained, UNMERGED module (callbacks' on_train_end runs
    before the module's, which merges), then records what the stats pass scores."""

    def __init__(self):
        self.trained_fp32 = None
        self.stats_widths: list[int] = []
        self.stats_net_has_lora: list[bool] = []
        self.measuring = False

    def on_train_end(self, trainer, module):
        self.trained_fp32 = copy.deepcopy(module.net).float().eval()
        pair_rewards, measure_stats = module.pair_rewards, module.measure_stats

        def recording(batch):
            if self.measuring:  # not the held-out accuracy pass that follows
                self.stats_widths += batch["pair_segments"].sum(1).tolist()
                self.stats_net_has_lora.append(any("lora_" in name for name, _ in module.net.named_parameters()))
            return pair_rewards(batch)

        def measuring():
            self.measuring = True
            try:
                return measure_stats()
            finally:
                self.measuring = False

        module.pair_rewards, module.measure_stats = recording, measuring


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_lora, tiny_trainer):
    out = tmp_path_factory.mktemp("rm") / "rm_model"
    L.seed_everything(0)  # the LoRA initialisation draws from the global RNG
    module = RewardModule(
        model="tiny-llama",
        output_dir=str(out),
        lora=dataclasses.replace(tiny_lora, r=8, alpha=16),
        learning_rate=3e-3,
        stats_max_pairs=STATS_PAIRS,
    )
    assert module.frozen_linear_bf16  # the default: frozen linears held in bf16
    data = PreferenceDataModule(path=str(FIXTURE), tokenizer="tiny-llama", max_length=64, batch_size=4, val_size=16)
    recorder = _Recorder()
    trainer = tiny_trainer(
        out.parent, 3, precision="bf16-mixed", limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)
    return out, recorder, data


def test_bf16_export_scores_like_the_trained_module_in_fp32(bf16_run):
    out, recorder, _ = bf16_run
    trained = recorder.trained_fp32
    lora_b = [p for name, p in trained.named_parameters() if "lora_B" in name]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 1e-3  # the adapters really moved
    scorer = RewardScorer(out)  # fp32
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()][:16]
    texts = scorer.render([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    batch = tokenize_for_reward(scorer.tokenizer, texts, scorer.stats.max_length)
    with torch.no_grad():
        exported = sequence_rewards(scorer.model, batch["input_ids"], batch["attention_mask"])
        expected = sequence_rewards(trained, batch["input_ids"], batch["attention_mask"])
        with trained.disable_adapter():  # base weights and the untrained head
            untrained = sequence_rewards(trained, batch["input_ids"], batch["attention_mask"])
    assert (expected - untrained).abs().max() > 1e-2  # what training changed is far above the tolerance
    # Merging into bf16 weights rounds the update to bf16: off by ~1e-3 on this model.
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=0)


def test_stats_are_measured_on_the_merged_model_over_pairs_of_every_length(bf16_run):
    out, recorder, data = bf16_run
    stats = json.loads((out / "reward_stats.json").read_text())
    assert recorder.stats_net_has_lora and not any(recorder.stats_net_has_lora)  # merged before measuring
    widths = sorted(len(r["chosen"]) + len(r["rejected"]) - r["shared"] for r in data._encoded["train"])
    assert len(recorder.stats_widths) == stats["pairs"] == STATS_PAIRS
    # not the shortest-first prefix of the length-sorted loader: longer pairs are in
    assert max(recorder.stats_widths) > widths[STATS_PAIRS - 1]
    assert min(recorder.stats_widths) < widths[-STATS_PAIRS]
    # the held-out figure covers all 16 validation pairs (limit_val_batches=0 does not
    # skip it); no cross_path, so no cross figure
    assert stats["heldout_pairs"] == 16 and 0.0 <= stats["heldout_accuracy"] <= 1.0
    assert stats["cross_accuracy"] is None and stats["cross_pairs"] == 0


def test_reward_stats_read_old_files_and_round_trip_the_accuracies(tmp_path):
    (tmp_path / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))  # written before the figures
    old = RewardStats.read(tmp_path)
    assert (old.heldout_accuracy, old.heldout_pairs, old.cross_accuracy, old.cross_pairs) == (None, 0, None, 0)
    new = RewardStats(mean=0.5, std=2.0, heldout_accuracy=0.75, heldout_pairs=8, cross_accuracy=0.25, cross_pairs=12)
    (tmp_path / "reward_stats.json").write_text(json.dumps(new.to_json()))
    assert RewardStats.read(tmp_path) == new


def test_spread_batch_indices_by_hand():
    # 20 batches, 4 wanted: strata [0,5) [5,10) [10,15) [15,20), their middles 2, 7, 12, 17
    assert spread_batch_indices(20, 4) == [2, 7, 12, 17]
    assert spread_batch_indices(3, 10) == [0, 1, 2]  # more wanted than there are: all
    assert spread_batch_indices(5, 0) == []
    assert spread_batch_indices(7, 1) == [3]


def test_reward_module_saves_rng_state_in_checkpoints():
    callbacks = RewardModule(model="tiny-llama").configure_callbacks()
    assert any(isinstance(c, RNGStateCheckpoint) for c in callbacks)


def test_merge_in_float32_keeps_an_update_below_bf16_resolution():
    from peft import LoraConfig, get_peft_model

    from ucai.stages.lora_io import merge_in_float32

    torch.manual_seed(0)
    net = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)),
        LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0, target_modules=["0"]),
    )
    layer = net.base_model.model[0]
    layer.base_layer.to(torch.bfloat16)  # frozen weights in bf16, as frozen_linear_bf16 keeps them
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-4)  # an update of ~1e-4·|A|, far below a bf16 ulp of W
    x = torch.randn(8, 64)
    with torch.no_grad():
        expected = copy.deepcopy(net).float()(x)  # (8, 64) upcast, adapter unmerged
        update = expected - copy.deepcopy(net).float().base_model.model[0].base_layer(x)
        merged = merge_in_float32(net)(x)
    assert merged.dtype == torch.float32
    assert update.abs().max() > 1e-4  # the update is there to be lost
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_the_scorer_batches_by_length_and_returns_rewards_in_input_order(bf16_run):
    # Texts of very different lengths, interleaved: scored in batches of like length,
    # each reward must come back at its text's place, equal (fp32, up to matmul
    # rounding) to scoring that text alone.
    out, _, _ = bf16_run
    scorer = RewardScorer(out, batch_size=2)
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()][:6]
    prompts = [r["prompt"] for r in rows]
    responses = [r["chosen"] * (3 if i % 2 else 1) for i, r in enumerate(rows)]  # long, short, long, ...
    together = scorer.raw_rewards(prompts, responses)
    alone = torch.cat([scorer.raw_rewards([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert len(set(together.tolist())) == len(rows)  # distinct rewards: a permutation would show
