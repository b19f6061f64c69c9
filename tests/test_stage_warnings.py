"""Warnings ucai's own use of Lightning would cause are fixed where they arise, not
filtered: a data module without a validation split runs no validation loop and asks for
no loader; the prompt data module offers no validation loader to a stage without a
validation step; a predict stage shows its rates in the trainer's own progress bar
instead of replacing it; a resumed prediction with every row written runs no loop (and
still makes its final file)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from ucai.data.preference_data import PreferenceDataModule
from ucai.data.prompt_datamodule import PromptDataModule
from ucai.data.sft_data import SFTDataModule

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ANSWER_TINY = ROOT / "tests" / "conf" / "answer_tiny.yaml"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _Probe(L.LightningModule):
    """Trains one weight whatever the batch holds; counts validation batches."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.validated = 0

    def training_step(self, batch, batch_idx):
        return (self.weight**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _ValidatingProbe(_Probe):
    def validation_step(self, batch, batch_idx):
        self.validated += 1


def _fit(module: L.LightningModule, data: L.LightningDataModule) -> list[str]:
    """Fit for one epoch; the warnings raised meanwhile."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    return [str(w.message) for w in caught]


def _sft_data(val_fraction: float) -> SFTDataModule:
    return SFTDataModule(
        path=str(FIXTURES / "sl_small.jsonl"), tokenizer="tiny-llama", val_fraction=val_fraction,
        batch_size=2, max_length=64,
    )


def _preference_data(val_fraction: float) -> PreferenceDataModule:
    return PreferenceDataModule(
        path=str(FIXTURES / "preferences_small.jsonl"), tokenizer="tiny-llama", val_fraction=val_fraction,
        batch_size=2, max_length=64, limit=8,
    )


@pytest.mark.parametrize("make_data", [_sft_data, _preference_data], ids=["sft", "preferences"])
def test_no_validation_split_runs_no_validation_and_says_nothing(make_data):
    module = _ValidatingProbe()
    messages = _fit(module, make_data(0.0))
    assert module.validated == 0
    assert not any("across ranks is zero" in m or "val_dataloader" in m for m in messages), messages
    # With a split, validation runs as configured.
    module = _ValidatingProbe()
    _fit(module, make_data(0.5))
    assert module.validated > 0


def test_a_stage_without_validation_is_offered_no_validation_loader():
    data = PromptDataModule(path=str(ROOT / "data" / "red_team_prompts.jsonl"), limit=4, batch_size=2)
    messages = _fit(_Probe(), data)
    assert not any("val_dataloader" in m for m in messages), messages


@pytest.fixture
def lightning_info(collect):
    """Every message sent to Lightning's rank-zero loggers during the test."""
    return collect(*RANK_ZERO_LOGGERS).messages


def _predict(run_cli, output: Path) -> list[str]:
    """``ucai predict`` of the tiny answer stage (Rich progress bar); the warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli("predict", "--config", ANSWER_TINY, f"--model.init_args.output={output}") == 0
    return [str(w.message) for w in caught]


def test_a_predict_stage_keeps_the_trainers_bar_and_a_finished_rerun_runs_no_loop(
    tmp_path, run_cli, lightning_info, capsys
):
    output = tmp_path / "answers.jsonl"
    messages = _predict(run_cli, output)
    assert not any("will override existing callbacks" in m for m in lightning_info), lightning_info
    assert "prompts/s" in capsys.readouterr().out  # the rates, in the trainer's Rich bar
    assert not any("across ranks is zero" in m for m in messages), messages
    # Killed after its last row and before the merge: every row is in a shard.
    written = output.read_text()
    shards = tmp_path / "answers.jsonl.shards"
    shards.mkdir()
    output.rename(shards / "rank-0.jsonl")
    (tmp_path / "answers.csv").unlink()
    messages = _predict(run_cli, output)
    assert not any("across ranks is zero" in m for m in messages), messages
    assert output.read_text() == written and (tmp_path / "answers.csv").exists() and not shards.exists()
