"""Shared fixtures: paths to the real data in ../shared (skipped when absent), the
tiny model, and a helper that runs the ``ucai`` CLI in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = "tiny-llama"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach a model hub
# One thread per process: the tiny models gain nothing from more, and on a busy 2-core
# machine OpenMP threads contending with other processes slow small matmuls 1000-fold.
# Set in the environment so the subprocesses of CLI and DDP tests inherit it.
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
