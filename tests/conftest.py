"""Shared fixtures: paths to the real data in ../shared (skipped when absent), the
tiny model, its LoRA settings, a tiny PPO module and CPU trainer (factories: call them
with the settings a test changes), a helper that runs the ``ucai`` CLI in-process, and
one that records what a logger prints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = "tiny-llama"
NEWLINE = 198  # "\n" in the SmolLM2 tokenizer: the synthetic reward of the tiny PPO module

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a model hub
# One thread per process: the tiny models gain nothing from more, and on a busy 2-core
# machine OpenMP threads contending with other processes slow small matmuls by orders
# of magnitude. Set in the environment so the subprocesses of CLI and DDP tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (it ships beside the repo in ../shared)")
    return path


@pytest.fixture
def hh_rlhf_path() -> Path:
    return shared_file("hh-rlhf/harmless-base-test.jsonl.gz")


@pytest.fixture
def cai_instructions_path() -> Path:
    return shared_file("cai-paper/CritiqueRevisionInstructions.json")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from ucai.models import load_tokenizer

    return load_tokenizer(TINY)


@pytest.fixture(scope="session")
def tiny_model():
    from ucai.models import load_causal_lm

    return load_causal_lm(TINY, seed=0)


@pytest.fixture
def run_cli():
    """Run ``ucai ARGS`` in this process and return its exit status."""
    from ucai.cli import main

    def run(*args: str) -> int:
        return main([str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def tiny_lora():
    """LoRA rank 4 on the attention's query and value projections, no dropout; tests that
    need other settings use ``dataclasses.replace(tiny_lora, ...)``."""
    from ucai.models import LoraSettings

    return LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="session")
def tiny_ppo(tiny_lora):
    """``tiny_ppo(**overrides)``: a PPOModule on the tiny model, rewarded for newlines
    (``token:198``), one PPO epoch over minibatches of 4, six sampled tokens at
    temperature 1, no export."""
    from ucai.stages.generation import GenerationSettings
    from ucai.stages.ppo import PPOModule

    def build(**overrides):
        settings = dict(
            policy=TINY,
            reward_model=f"token:{NEWLINE}",
            lora=tiny_lora,
            ppo_epochs=1,
            minibatch_size=4,
            learning_rate=1e-3,
            generation=GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=1.0),
            export=False,  # tests of the export turn it on with a tmp_path output_dir
        )
        return PPOModule(**{**settings, **overrides})

    return build


@pytest.fixture(scope="session")
def tiny_trainer():
    """``tiny_trainer(root, max_steps, **kwargs)``: a one-process CPU Trainer in ``root``
    that logs every step to a CSV logger, without checkpoints, progress bar or summary
    (each can be given back in ``kwargs``)."""
    import lightning as L

    def build(root: Path, max_steps: int, **kwargs) -> L.Trainer:
        if "logger" not in kwargs:
            kwargs["logger"] = L.pytorch.loggers.CSVLogger(root, name="run")
        settings = dict(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            log_every_n_steps=1,
        )
        return L.Trainer(**{**settings, **kwargs})

    return build


class _Recorded(logging.Handler):
    """Keeps every message sent to the loggers it is attached to."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def collect():
    """``collect(*names)`` records what those loggers print during the test (all levels);
    the handler's ``messages`` lists it."""
    attached = []

    def attach(*names: str) -> _Recorded:
        handler = _Recorded()
        for name in names:
            logger = logging.getLogger(name)
            attached.append((logger, handler, logger.level))
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)
        return handler

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


def pytest_collection_finish(session):
    """Exempt what collection loaded (torch, Lightning, transformers, peft: about half a
    million objects, none of which will become garbage) from garbage collection. Each
    full collection, the automatic ones and those `ucai.models.release_memory` makes
    after every model it frees, otherwise walks them all, 0.3 s a time in a test process
    (the collector's time in the whole suite on 2 cores: 70 s before, 41 s after). A
    stage process holds fewer objects: frozen the same way, the demo's evaluation spent
    2.3 s in collections instead of 4.8 and PPO the same 2 s, so stages do not freeze."""
    import gc

    gc.collect()  # collection's own garbage, before what is frozen can no longer be freed
    gc.freeze()
