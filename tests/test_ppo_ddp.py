"""PPO under DDP: two CPU processes (gloo) through the real CLI, as a user runs it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UCAI = Path(sys.executable).with_name("ucai")


@pytest.mark.slow
def test_ppo_runs_under_two_process_ddp(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        str(UCAI), "fit", "--config", str(ROOT / "tests/conf/ppo_tiny.yaml"),
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # max_steps 4 optimiser steps = 2 rollout batches (1 epoch x 2 minibatches each);
    # rank 0 gathers both ranks' episodes: 2 steps x 2 ranks x 4 prompts.
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs/ppo_tiny/version_0/rollouts.csv")))
    assert len(rows) == 16
    assert sorted({int(r["step"]) for r in rows}) == [0, 1]
    assert len({r["prompt"] for r in rows}) == 16  # each rank saw its own shard of prompts
    assert (tmp_path / "lightning_logs/models/tiny/rl_model/model.safetensors").is_file()
    assert (tmp_path / "lightning_logs/ppo_tiny/checkpoints/last.ckpt").is_file()


@pytest.mark.slow
def test_cli_resume_from_last_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    base = [str(UCAI), "fit", "--config", str(ROOT / "tests/conf/ppo_tiny.yaml")]
    first = subprocess.run(base + ["--trainer.max_steps=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(
        base + ["--trainer.max_steps=4", "--ckpt_path", "last"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    # The resumed run continues at rollout step 1 (step 0 was the first run's).
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs/ppo_tiny/version_1/rollouts.csv")))
    assert {int(r["step"]) for r in rows} == {1}
