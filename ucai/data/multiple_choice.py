"""`MultipleChoiceDataModule`: multiple-choice items for the judge quality check.

Batches are lists of `MultipleChoiceItem` (validated by `ucai.judge_check.load_items`,
which names ``file:line`` on a bad row), each tagged with its index in the file so that
results gathered from several devices can be put back in order and de-duplicated.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from ucai.data.prompt_datamodule import RowDataset, collate_rows
from ucai.judge_check import SHIPPED_ITEMS, MultipleChoiceItem, load_items


class MultipleChoiceDataModule(L.LightningDataModule):
    """Items from a JSONL file of ``prompt`` / ``corrects`` / ``incorrects`` rows.

    Args:
        path: the file; the default is the shipped ``data/judge_check.jsonl``.
        batch_size: items per batch (each item is asked in K option orders).
        limit: keep the first this many items (quick runs).
    """

    def __init__(self, path: str = SHIPPED_ITEMS, batch_size: int = 8, limit: int | None = None):
        super().__init__()
        self.path = path
        self.batch_size = batch_size
        self.limit = limit
        self.items: list[MultipleChoiceItem] | None = None

    def load(self) -> list[MultipleChoiceItem]:
        if self.items is None:
            items = load_items(self.path)
            self.items = items[: self.limit] if self.limit is not None else items
        return self.items

    def setup(self, stage: str) -> None:
        self.load()

    def test_dataloader(self) -> DataLoader:
        rows = [{"index": i, "item": item} for i, item in enumerate(self.load())]
        return DataLoader(RowDataset(rows), batch_size=self.batch_size, shuffle=False, collate_fn=collate_rows)

    predict_dataloader = test_dataloader

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # items are text; the stage tokenises them for its model
