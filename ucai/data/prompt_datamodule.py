"""`PromptDataModule`: prompts for the generating stages (predict) and for PPO (fit).

Batches are lists of row dicts (``id``, ``prompt``, ``principle`` ...), not tensors:
each stage tokenises for its own model and chat template. The held-out split is chosen
by a hash of the prompt id, so it is the same set whatever the file order, the
principle filter or the number of devices — PPO never trains on a prompt that
evaluation later uses. The training order is a function of ``seed + epoch`` and the
loader's position is checkpointed (`ucai.resume.ResumableLoader`), so a PPO run resumed
mid-epoch continues with the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ucai.data.prompts import DEFAULT_PROMPTS, PromptRecord, read_prompts
from ucai.resume import ResumableLoader, ShardSampler, own_generator, run_seed
from ucai.value_ranges import ClosedUnitInterval, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)

Split = Literal["all", "train", "heldout"]


def is_heldout(prompt_id: str, fraction: float, seed: int = 0, salt: str = "") -> bool:
    """Whether an id falls in the held-out fraction (stable across runs and machines).

    ``salt`` draws an independent split: a second split of rows that already passed
    the unsalted one (a validation set inside the training prompts) must not reuse its
    hash, or it would take its rows from the hash range the first split removed.
    """
    if fraction <= 0:
        return False
    key = f"{seed}:{salt}:{prompt_id}" if salt else f"{seed}:{prompt_id}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class RowDataset(Dataset):
    """A list of row dicts as a map-style dataset."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def bucketed(rows: list[dict]) -> list[dict]:
    """Rows grouped by principle tag, each group longest prompt first (a stable sort:
    ties keep file order)."""
    return sorted(rows, key=lambda row: (str(row.get("principle") or ""), -len(row["prompt"])))


def collate_rows(batch: list[dict]) -> list[dict]:
    """Keep a batch as the list of row dicts (stages tokenise for their own model)."""
    return batch


class PromptDataModule(L.LightningDataModule):
    """Prompts from a JSONL/CSV/JSON/text file, filtered and split.

    Args:
        path: prompt file (any format `read_prompts` accepts); the shipped default set
            is ``data/red_team_prompts.jsonl``.
        principles: keep only prompts tagged with these principles (``none`` is the tag
            of benign controls); null keeps all.
        split: ``all``, ``train`` (drops the held-out prompts) or ``heldout``.
        heldout_fraction: share of prompts reserved for evaluation, by id hash.
        split_seed: salt of the id hash; change it to draw another held-out set.
        limit: keep at most this many prompts after filtering (small demo runs).
        batch_size: prompts per batch.
        num_workers: DataLoader workers (reading is cheap; 0 is usually right).
        empty: ``error`` stops at the first empty prompt naming file and line;
            ``drop`` skips empty prompts.
        max_chars: drop prompts longer than this many characters.
        shuffle: shuffle training batches (fit only).
        seed: seed of the training order, drawn anew each epoch from ``seed + epoch``;
            null: the run's ``seed_everything``.
        bucket: predict batches hold prompts of one principle and of like length
            (sorted by principle, then longest first): less padding, and a principle's
            shared system prompt is prefilled once per batch. The output is written
            in file order, and the decode engines seed each row's sample by its id, so
            bucketing changes a sample only through rounding (transformers generate,
            the fallback engine, draws from the global RNG: there it does change
            them); false keeps file order.
    """

    def __init__(
        self,
        path: str = DEFAULT_PROMPTS,
        principles: list[str] | None = None,
        split: Split = "all",
        heldout_fraction: ClosedUnitInterval = 0.1,
        split_seed: int = 0,
        limit: PositiveInt | None = None,
        batch_size: PositiveInt = 8,
        num_workers: NonNegativeInt = 0,
        empty: Literal["drop", "error"] = "error",
        max_chars: PositiveInt | None = 2000,
        shuffle: bool = True,
        seed: int | None = None,
        bucket: bool = True,
    ):
        super().__init__()
        self.path = path
        self.principles = principles
        self.split = split
        self.heldout_fraction = heldout_fraction
        self.split_seed = split_seed
        self.limit = limit
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.empty = empty
        self.max_chars = max_chars
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = bucket
        self.records: list[PromptRecord] | None = None
        self._skip: set = set()

    def load(self) -> list[PromptRecord]:
        """Read, filter and split the prompts (cached)."""
        if self.records is None:
            records = read_prompts(
                self.path, empty=self.empty, max_chars=self.max_chars, principles=self.principles
            )
            if self.split != "all":
                want_heldout = self.split == "heldout"
                records = [
                    r
                    for r in records
                    if is_heldout(r.id, self.heldout_fraction, self.split_seed) == want_heldout
                ]
            if self.limit is not None:
                records = records[: self.limit]
            self.records = records
            counts = Counter(r.principle or "untagged" for r in records)
            log.info("%d prompts from %s (%s split): %s", len(records), self.path, self.split, dict(counts))
        return self.records

    @property
    def all_ids(self) -> list[str]:
        return [r.id for r in self.load()]

    def skip_ids(self, ids) -> None:
        """Leave these ids out of the next dataloader (finished rows of a resumed run)."""
        self._skip = set(ids)

    def rows(self) -> list[dict]:
        return [r.to_row() for r in self.load() if r.id not in self._skip]

    def setup(self, stage: str) -> None:
        self.load()

    def _loader(self) -> DataLoader:
        """All rows (prediction and evaluation), bucketed (see ``bucket``) or in file order."""
        rows = self.rows()
        if self.bucket:
            rows = bucketed(rows)
        return DataLoader(
            RowDataset(rows),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_rows,
            generator=own_generator(),
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's share of the prompts, resumable mid-epoch (`ResumableLoader`)."""
        dataset = RowDataset(self.rows())
        seed = run_seed() if self.seed is None else self.seed
        sampler = ShardSampler.for_trainer(dataset, self.trainer, shuffle=self.shuffle, seed=seed)
        return ResumableLoader(
            dataset, sampler, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_rows
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
