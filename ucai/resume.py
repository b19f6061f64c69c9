"""What a checkpoint needs beyond weights and optimiser state for a resumed run to equal
an uninterrupted one: the random number generators' states and the position in the
epoch's data.

Lightning saves the model, optimisers, schedulers and loop counters, but not the RNGs,
so a run resumed mid-epoch samples different rollouts (PPO) and different dropout masks
(LoRA dropout) than the run it continues: `RNGStateCheckpoint`. It saves a training
dataloader's ``state_dict()`` but does not skip the batches already seen, and the
default shuffle draws from the global RNG, so a resumed run replays the first batches
of the epoch in a new order and never sees the last ones: `ResumableLoader` and
`ShardSampler`.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from ucai.gather import gather_from_ranks

log = logging.getLogger(__name__)


def run_seed() -> int:
    """The seed ``seed_everything`` set for this run (Lightning's own default: 0)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def rng_states() -> dict[str, Any]:
    """This process's RNG states in types a ``weights_only`` checkpoint load accepts
    (Lightning 2.6 loads with ``weights_only=True``, which refuses NumPy arrays)."""
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    if "numpy" in states:
        kind, keys, position, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, keys.tolist(), int(position), int(has_gauss), float(gauss))
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` collected."""
    states = dict(states)
    if "numpy" in states:
        import numpy as np

        kind, keys, position, has_gauss, gauss = states["numpy"]
        states["numpy"] = (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)
    _set_rng_states(states)


def own_generator(seed: int = 0) -> torch.Generator:
    """A generator for a DataLoader that is not resumable (validation, statistics).

    Creating a DataLoader's iterator draws a seed from the loader's generator, or from
    the global torch RNG when it has none. Validation at an epoch's end runs between a
    checkpoint and the next training batch, so a global draw there would shift the
    random stream of the uninterrupted run and not that of the resumed one.
    """
    return torch.Generator().manual_seed(seed)


class RNGStateCheckpoint(Callback):
    """Save the RNG states (Python, NumPy, torch, CUDA) of every process into each
    checkpoint and restore each process's own on resume, just before the first
    training batch.

    Processes draw different amounts (a DDP rank that generates longer responses
    consumes more of its stream), so one state for all would not continue any rank but
    the first: the states are gathered from all ranks when the checkpoint is written,
    which every rank takes part in (Lightning's ``save_checkpoint`` runs on all ranks).

    The restore waits for ``on_train_batch_start`` because a lot draws from the global
    RNG between loading the checkpoint and training (model set-up, LoRA initialisation,
    dataloader iterators). The restored stream therefore continues exactly when nothing
    draws between the checkpoint and the next training batch in the uninterrupted run:
    true for checkpoints written at the end of a training batch (``every_n_train_steps``)
    with `ResumableLoader`, which draws nothing from the global RNG.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_from_ranks(rng_states())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict["ranks"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds the RNG states of %d processes and this run has %d; "
                "random draws will differ from the run it continues",
                len(states), trainer.world_size,
            )
            return
        set_rng_states(states[trainer.global_rank])


class ShardSampler(DistributedSampler):
    """This process's share of a dataset's indices, in an order fixed by ``seed +
    epoch`` (its own generator, never the global RNG), able to start part-way through.

    It is `torch.utils.data.DistributedSampler` (same order, padding and sharding: rank
    r takes every ``num_replicas``-th index) plus ``skip``: the number of leading
    indices the next iteration leaves out, set by `ResumableLoader` after a restore.
    Being a `DistributedSampler`, Lightning leaves it in place under DDP/FSDP rather
    than swapping in its own; it is given ``num_replicas``/``rank`` explicitly and works
    without a process group.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    @classmethod
    def for_trainer(cls, dataset, trainer, shuffle: bool = True, seed: int = 0) -> ShardSampler:
        """This process's shard under ``trainer`` (the whole dataset when there is none)."""
        return cls(
            dataset,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            shuffle=shuffle,
            seed=seed,
        )

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(super().__iter__(), skip, None)


class ResumableLoader(DataLoader):
    """A training DataLoader whose position in the epoch is checkpointed.

    ``state_dict()`` (which Lightning saves with the fit loop) records the epoch, how
    many batches of it were handed out, and what fixes the order (sampler seed, number
    of replicas, dataset size). After ``load_state_dict()`` the next iteration of THAT
    epoch leaves those batches out (their indices only; nothing is loaded or collated),
    so a run resumed mid-epoch continues with the very next batch; a checkpoint from the
    end of an epoch skips nothing in the next one. A restore whose order would differ
    (another seed, data size or number of processes) starts the epoch over, with a
    warning.

    The sampler must be a `DistributedSampler` with a ``skip`` attribute counting what
    it yields (`ShardSampler`: indices; a batch sampler given with ``batch_size=None``:
    batches). Iteration starts lazily, at the first batch, because Lightning sets the
    sampler's epoch after creating the epoch's iterator. The loader has its own
    ``generator`` so that creating an iterator draws nothing from the global RNG.

    Under DDP every rank restores rank 0's state, which is right because all ranks
    hand out the same number of batches per epoch (the sampler pads the shards).
    """

    def __init__(self, dataset, sampler: DistributedSampler, **kwargs):
        if not hasattr(sampler, "skip"):
            raise TypeError(f"ResumableLoader needs a sampler with `skip`, not {type(sampler).__name__}")
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch = 0
        self._served = 0
        self._restored: dict[str, int] | None = None

    def _order_key(self) -> dict[str, int]:
        sampler = self.sampler
        return {"seed": sampler.seed, "replicas": sampler.num_replicas, "size": len(sampler.dataset)}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._served, **self._order_key()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored = dict(state)

    def _batches_to_skip(self) -> int:
        """Batches of the epoch now starting that a restored checkpoint already saw."""
        state, self._restored = self._restored, None
        if state is None or state.get("epoch") != self.sampler.epoch:
            return 0
        saved = {key: state.get(key) for key in self._order_key()}
        if saved != self._order_key():
            log.warning(
                "the checkpoint's training data order was %s and this run's is %s; "
                "the interrupted epoch starts over",
                saved, self._order_key(),
            )
            return 0
        return min(int(state["batches"]), len(self))

    def __iter__(self) -> Iterator[Any]:
        return self._serve()

    def _serve(self) -> Iterator[Any]:
        self._epoch = self.sampler.epoch
        self._served = self._batches_to_skip()
        self.sampler.skip = self._served * (1 if self.batch_size is None else self.batch_size)
        for batch in super().__iter__():
            self._served += 1
            yield batch
