"""Bit-for-bit mid-epoch resume: a run that crashes mid-epoch and resumes from its last
checkpoint equals the run that was never interrupted (PPO and reward, tiny model, fp32),
and the data position and RNG machinery behind it (`ucai.resume`)."""

from __future__ import annotations

import csv
import dataclasses
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ucai.data.preference_data import PreferenceDataModule
from ucai.data.prompt_datamodule import PromptDataModule, RowDataset
from ucai.resume import ResumableLoader, RNGStateCheckpoint, ShardSampler
from ucai.stages.ppo import PPOCheckpoint
from ucai.stages.reward import RewardModule

TINY = "tiny-llama"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "preferences_small.jsonl"


class Crash(Exception):
    """Stands for the process dying."""


class CrashAt(L.Callback):
    """Raise at the start of the first training batch at or past optimiser step ``step``
    (after the checkpoint of the batch before it was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Crash(f"crash at step {trainer.global_step}")


class RecordBatches(L.Callback):
    def __init__(self):
        self.batches: list = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch)


@pytest.fixture
def crash_and_resume(tmp_path, tiny_trainer):
    """``crash_and_resume(make_module, make_data, max_steps, crash_step, checkpoint=...)``:
    the (uninterrupted, crashed, resumed) runs' module, trainer and batches seen, each
    run in its own folder of ``tmp_path``, checkpointing ``ckpt/last.ckpt`` after every
    batch with ``checkpoint`` (a ModelCheckpoint class); the resumed run starts from the
    crashed run's last checkpoint. The modules' own callbacks (`RNGStateCheckpoint`)
    are all that restores the RNG."""

    def fit(module, data, root: Path, max_steps: int, checkpoint, *callbacks, ckpt_path=None) -> L.Trainer:
        L.seed_everything(0)
        every_step = checkpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
        trainer = tiny_trainer(
            root, max_steps, precision="32-true", callbacks=[every_step, *callbacks], enable_checkpointing=True
        )
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return trainer

    def run(make_module, make_data, max_steps: int, crash_step: int, checkpoint=ModelCheckpoint) -> dict:
        runs = {}
        module, record = make_module(), RecordBatches()
        runs["full"] = (module, fit(module, make_data(), tmp_path / "full", max_steps, checkpoint, record), record.batches)

        module, record = make_module(), RecordBatches()
        with pytest.raises(Crash):  # CrashAt first: the batch it stops at is not recorded
            fit(module, make_data(), tmp_path / "crashed", max_steps, checkpoint, CrashAt(crash_step), record)
        runs["crashed"] = (module, None, record.batches)

        module, record = make_module(), RecordBatches()
        last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
        trainer = fit(module, make_data(), tmp_path / "resumed", max_steps, checkpoint, record, ckpt_path=str(last))
        runs["resumed"] = (module, trainer, record.batches)
        return runs

    return run


# --------------------------------------------------------------------------- PPO


def ppo_data() -> PromptDataModule:
    return PromptDataModule(limit=12, batch_size=4, split="train")  # 3 rollout batches per epoch, shuffled


def test_ppo_resumed_mid_epoch_equals_the_uninterrupted_run(crash_and_resume, tiny_ppo):
    # 4 rollout batches = 8 optimiser steps: all of epoch 0 and the first batch of epoch 1.
    # The crash comes after 2 batches (step 4), so the resumed run finishes epoch 0 with
    # its third batch, then starts epoch 1 in its own new order. Minibatches of 2: two
    # optimiser steps per rollout batch of 4.
    runs = crash_and_resume(
        lambda: tiny_ppo(minibatch_size=2), ppo_data, max_steps=8, crash_step=4, checkpoint=PPOCheckpoint
    )
    full, full_trainer, full_batches = runs["full"]
    _, _, crashed_batches = runs["crashed"]
    resumed, resumed_trainer, resumed_batches = runs["resumed"]

    assert full_trainer.global_step == resumed_trainer.global_step == 8
    assert crashed_batches == full_batches[:2]
    assert resumed_batches == full_batches[2:]
    assert len({row["id"] for batch in full_batches[:3] for row in batch}) == 12  # epoch 0: all once
    assert full_batches[3] != full_batches[0]  # epoch 1 is in a new order

    state = {k: v for k, v in full.state_dict().items() if full.is_trainable_key(k)}
    resumed_state = resumed.state_dict()
    assert state and any("value_head" in k for k in state)
    for key, value in state.items():
        assert torch.equal(resumed_state[key], value), key

    def rollouts(trainer) -> list[dict]:
        return list(csv.DictReader(open(Path(trainer.log_dir) / "rollouts.csv")))

    # Same prompts, same sampled responses, same scores and KL for the resumed steps.
    expected = [row for row in rollouts(full_trainer) if int(row["step"]) >= 2]
    assert [int(r["step"]) for r in expected] == [2] * 4 + [3] * 4
    assert rollouts(resumed_trainer) == expected


# --------------------------------------------------------------------------- reward


def reward_data() -> PreferenceDataModule:
    # 40 training pairs in 5 batches of 8 per epoch (and 16 validation pairs).
    return PreferenceDataModule(
        path=str(FIXTURE), tokenizer=TINY, max_length=64, batch_size=8, val_size=16, limit=56
    )


def test_reward_resumed_mid_epoch_equals_the_uninterrupted_run(crash_and_resume, tiny_lora):
    # LoRA dropout on: its masks come from the global RNG, which the resume must continue.
    lora = dataclasses.replace(tiny_lora, r=8, alpha=16, dropout=0.1)

    def reward_module() -> RewardModule:
        return RewardModule(model=TINY, output_dir=None, lora=lora, learning_rate=0.01)

    # 7 steps: epoch 0 (5 batches, then validation) and 2 batches of epoch 1; crash after 3.
    runs = crash_and_resume(reward_module, reward_data, max_steps=7, crash_step=3)
    full, _, full_batches = runs["full"]
    _, _, crashed_batches = runs["crashed"]
    resumed, resumed_trainer, resumed_batches = runs["resumed"]

    def ids(batches) -> list[torch.Tensor]:
        return [batch["input_ids"] for batch in batches]

    assert resumed_trainer.global_step == 7 and len(full_batches) == 7
    assert all(torch.equal(a, b) for a, b in zip(ids(crashed_batches), ids(full_batches)[:3], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(ids(resumed_batches), ids(full_batches)[3:], strict=True))
    epochs = [[tuple(b.sum(1).tolist()) for b in ids(full_batches)[start : start + 2]] for start in (0, 5)]
    assert epochs[0] != epochs[1]  # epoch 1 is in a new order

    weights, resumed_weights = dict(full.named_parameters()), dict(resumed.named_parameters())
    assert weights.keys() == resumed_weights.keys()
    for name, value in weights.items():  # the trained LoRA and head, and the frozen rest
        assert torch.equal(resumed_weights[name], value), name


# --------------------------------------------------------------------------- the machinery


def test_shard_sampler_order_is_seed_plus_epoch_and_shards_are_disjoint():
    dataset = list(range(10))
    first = [list(ShardSampler(dataset, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert sorted(first[0] + first[1]) == dataset and len(first[0]) == len(first[1]) == 5
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert first[0] == order[0::2] and first[1] == order[1::2]
    sampler = ShardSampler(dataset, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    sampler.set_epoch(1)
    assert list(sampler) == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()


def loader_over(n: int, batch_size: int | None = 2, seed: int = 0, replicas: int = 1) -> ResumableLoader:
    dataset = RowDataset([{"i": i} for i in range(n)])
    sampler = ShardSampler(dataset, num_replicas=replicas, seed=seed)
    collate = (lambda rows: [r["i"] for r in rows]) if batch_size else None
    return ResumableLoader(dataset, sampler, batch_size=batch_size, collate_fn=collate)


def test_loader_restored_mid_epoch_skips_exactly_the_batches_seen():
    loader = loader_over(10)
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    seen = [next(iterator), next(iterator)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2, "seed": 0, "replicas": 1, "size": 10}
    rest = list(iterator)

    fresh = loader_over(10)
    fresh.load_state_dict(state)
    iterator = iter(fresh)
    fresh.sampler.set_epoch(2)  # as Lightning does, after creating the iterator
    assert list(iterator) == rest and len(seen + rest) == 5
    assert fresh.state_dict()["batches"] == 5  # a second checkpoint counts the skipped ones too


def test_loader_restored_from_another_epoch_or_order_skips_nothing(caplog):
    loader = loader_over(10)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()  # epoch 0, 1 batch

    next_epoch = loader_over(10)
    next_epoch.load_state_dict(state)
    next_epoch.sampler.set_epoch(1)  # the checkpoint's epoch is over: nothing to skip
    assert len(list(next_epoch)) == 5

    other_seed = loader_over(10, seed=1)
    other_seed.load_state_dict(state)
    assert len(list(other_seed)) == 5
    assert "starts over" in caplog.text


def test_prebatched_loader_skips_whole_batches():
    loader = loader_over(6, batch_size=None)  # items are the batches (batch_size=None)
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    rest = list(iterator)
    fresh = loader_over(6, batch_size=None)
    fresh.load_state_dict(state)
    assert list(fresh) == rest and len(rest) == 5


def test_datamodules_give_resumable_sharded_training_loaders():
    class FakeTrainer:
        world_size, global_rank = 2, 1

    data = PromptDataModule(limit=12, batch_size=4, split="train", seed=5)
    data.trainer = FakeTrainer()
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.sampler.seed) == (2, 1, 5)
    assert len(loader) == 2  # 6 of the 12 prompts, in batches of 4

    preferences = reward_data()
    preferences.setup("fit")
    loader = preferences.train_dataloader()
    assert isinstance(loader, ResumableLoader) and len(loader) == 5 and loader.batch_size is None


def test_rng_state_survives_a_weights_only_load_and_is_restored_at_the_first_batch(tmp_path):
    class FakeTrainer:
        world_size, global_rank = 1, 0

    L.seed_everything(7)
    torch.save({"callbacks": RNGStateCheckpoint().state_dict()}, tmp_path / "state.ckpt")
    expected = torch.rand(3), np.random.rand(2), random.random()

    resumed = RNGStateCheckpoint()
    resumed.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True)["callbacks"])
    L.seed_everything(99)  # model set-up and the dataloader draw after the load
    resumed.on_train_batch_start(FakeTrainer(), None, None, 0)
    got = torch.rand(3), np.random.rand(2), random.random()
    assert torch.equal(got[0], expected[0]) and (got[1] == expected[1]).all() and got[2] == expected[2]
    torch.manual_seed(99)
    resumed.on_train_batch_start(FakeTrainer(), None, None, 1)  # only once
    assert not torch.equal(torch.rand(3), expected[0])


def test_sft_loader_resumes_mid_epoch_and_skips_nothing_in_the_next_epoch():
    from ucai.data.sft_data import LengthBucketSampler
    from ucai.data.sft_data import ResumableLoader as SFTLoader

    class Echo(torch.utils.data.Dataset):  # a batch is its list of indices
        def __len__(self):
            return 12

        def __getitem__(self, indices):
            return indices

    def loader():
        sampler = LengthBucketSampler(list(range(1, 13)), batch_size=4, seed=0)
        return SFTLoader(Echo(), sampler=sampler, batch_size=None)

    first = loader()
    iterator = iter(first)
    seen = next(iterator)
    mid_epoch = first.state_dict()
    rest = list(iterator)
    end_of_epoch = first.state_dict()

    resumed = loader()
    resumed.load_state_dict(mid_epoch)
    assert list(resumed) == rest and seen not in rest

    resumed = loader()
    resumed.load_state_dict(end_of_epoch)  # Lightning moves on to epoch 1, which is whole
    iterator = iter(resumed)
    resumed.sampler.set_epoch(1)
    assert len(list(iterator)) == 3


def test_each_rank_restores_its_own_rng_state(caplog):
    from ucai.resume import rng_states

    class Rank1:
        world_size, global_rank = 2, 1

    states = []
    for seed in (1, 2):  # ranks that drew different amounts hold different states
        torch.manual_seed(seed)
        states.append(rng_states())
    expected = torch.rand(3)  # what rank 1 draws next

    callback = RNGStateCheckpoint()
    callback.load_state_dict({"ranks": states})
    callback.on_train_batch_start(Rank1(), None, None, 0)
    assert torch.equal(torch.rand(3), expected)

    callback.load_state_dict({"ranks": states[:1]})  # saved by one process, resumed by two
    torch.manual_seed(5)
    callback.on_train_batch_start(Rank1(), None, None, 0)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert "RNG states of 1 processes" in caplog.text
