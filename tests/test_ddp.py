"""DDP on two CPU processes (gloo) for SFT, reward, PPO, DPO, RLOO and critique-revision,
as a user runs it: the stage configs composed with ``configs/strategies/ddp.yaml``
through ``ucai fit`` and ``ucai predict``.

One launch of tests/ddp_driver.py runs the five fits and the predict in turn (two
interpreters that import torch cost ~10 s each, so they are paid once). After a few
optimiser steps the trainable weights (LoRA and heads) must be bit-identical on both
ranks, and the losses must equal a single-process run on the same global batch, the
union of the two ranks' batches (run here, in the pytest process, while DDP
runs beside it). The predict must give each rank half of the prompts and merge the
ranks' shards into one file in input order.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ddp_driver
import pytest
import torch

from ucai.constitution import load_constitution
from ucai.stages.critique_revision import draw_principle

DRIVER = Path(ddp_driver.__file__)


class DDPRun:
    """The driver running in the background; `records` waits for it once."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.log = folder / "driver.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(DRIVER), str(folder / "ddp")], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        """Both ranks' console output, once the driver has succeeded."""
        try:
            code = self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        output = self.log.read_text()
        assert code == 0, output[-4000:]
        assert "distributed_backend=gloo" in output
        return output

    def records(self, stage: str) -> tuple[dict, dict]:
        self.output()
        return tuple(torch.load(self.folder / "ddp" / f"{stage}-rank{rank}.pt") for rank in (0, 1))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run = DDPRun(tmp_path_factory.mktemp("ddp"))
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def single_process(stage: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    assert ddp_driver.run_stage(stage, folder / "single", devices=1) == 0
    return torch.load(folder / "single" / f"{stage}-rank0.pt")


def assert_same_weights_on_both_ranks(rank0: dict, rank1: dict) -> None:
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["losses"]) == len(rank1["losses"]) == ddp_driver.STEPS
    assert rank0["weights"] and rank0["weights"].keys() == rank1["weights"].keys()
    for name, weight in rank0["weights"].items():
        assert torch.equal(weight, rank1["weights"][name]), name
    # The steps did update the weights: LoRA's B matrices start at zero.
    assert any(w.abs().sum() > 0 for name, w in rank0["weights"].items() if "lora_B" in name)


def test_sft_ddp_matches_one_process_on_the_union_batch(ddp_run, tmp_path, monkeypatch):
    single = single_process("sft", tmp_path, monkeypatch)
    rank0, rank1 = ddp_run.records("sft")
    assert_same_weights_on_both_ranks(rank0, rank1)
    # The ranks hold different numbers of response tokens, so their own means would
    # weigh tokens unequally; each rank's loss is its mean times world · its count /
    # the step's count (`share_of_global_mean`), and the two ranks' average is the mean
    # over the union's tokens, which is what one process computes, at every step.
    assert any(c0 != c1 for c0, c1 in zip(rank0["counts"], rank1["counts"]))
    for step in range(ddp_driver.STEPS):
        assert rank0["counts"][step] + rank1["counts"][step] == single["counts"][step], step
        union = (rank0["losses"][step] + rank1["losses"][step]) / 2
        assert union == pytest.approx(single["losses"][step], rel=1e-5), step
    assert rank0["losses"][0] != pytest.approx(rank1["losses"][0], rel=1e-5)  # the ranks saw different rows
    # And so the averaged gradients, and the weights after the steps, are one process's.
    for name, weight in single["weights"].items():
        torch.testing.assert_close(rank0["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_reward_ddp_trains_the_same_model_as_one_process(ddp_run, tmp_path, monkeypatch):
    single = single_process("reward", tmp_path, monkeypatch)
    rank0, rank1 = ddp_run.records("reward")
    assert_same_weights_on_both_ranks(rank0, rank1)
    # 8 pairs per rank, 16 in the single process: the mean of the two ranks' mean
    # Bradley-Terry losses is the mean over all 16, and so is the averaged gradient.
    assert rank0["counts"] == rank1["counts"] == [8.0] * ddp_driver.STEPS
    assert single["counts"] == [16.0] * ddp_driver.STEPS
    for step in range(ddp_driver.STEPS):
        ddp_loss = (rank0["losses"][step] + rank1["losses"][step]) / 2
        assert ddp_loss == pytest.approx(single["losses"][step], rel=1e-5), step
    for name, weight in single["weights"].items():
        torch.testing.assert_close(rank0["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def _rollouts(folder: Path, run: str = "ppo_tiny") -> list[dict]:
    return list(csv.DictReader(open(folder / run / "version_0" / "rollouts.csv", encoding="utf-8")))


def test_ppo_ddp_matches_one_process_on_the_union_batch(ddp_run, tmp_path, monkeypatch):
    single = single_process("ppo", tmp_path, monkeypatch)
    rank0, rank1 = ddp_run.records("ppo")
    assert_same_weights_on_both_ranks(rank0, rank1)
    # Greedy responses of 8 tokens on every rank: the rank-averaged value loss of the
    # first rollout (one minibatch, before its update) is the mean over the union.
    assert rank0["counts"][0] == single["counts"][0] == 8.0
    assert rank0["losses"][0] == pytest.approx(single["losses"][0], rel=1e-4)
    # Rank 0 gathers both ranks' episodes: each step covers all 8 prompts once.
    ddp_rows, single_rows = _rollouts(ddp_run.folder / "ddp"), _rollouts(tmp_path / "single")
    assert len(ddp_rows) == len(single_rows) == 8 * ddp_driver.STEPS
    for step in range(ddp_driver.STEPS):
        prompts = [r["prompt"] for r in ddp_rows if int(r["step"]) == step]
        assert len(prompts) == len(set(prompts)) == 8
        assert set(prompts) == {r["prompt"] for r in single_rows if int(r["step"]) == step}

    def first_episodes(rows):
        return sorted((r["prompt"], r["response"], float(r["score"])) for r in rows if r["step"] == "0")

    assert first_episodes(ddp_rows) == first_episodes(single_rows)


def test_dpo_ddp_trains_the_same_policy_as_one_process(ddp_run, tmp_path, monkeypatch):
    single = single_process("dpo", tmp_path, monkeypatch)
    rank0, rank1 = ddp_run.records("dpo")
    assert_same_weights_on_both_ranks(rank0, rank1)
    # 8 pairs per rank, 16 in the single process. Step 0 starts at policy = reference
    # (loss log 2 everywhere); the later steps' losses depend on the averaged gradients
    # of the steps before, so all of them must agree.
    assert rank0["counts"] == rank1["counts"] == [8.0] * ddp_driver.STEPS
    assert single["counts"] == [16.0] * ddp_driver.STEPS
    assert single["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    for step in range(ddp_driver.STEPS):
        ddp_loss = (rank0["losses"][step] + rank1["losses"][step]) / 2
        assert ddp_loss == pytest.approx(single["losses"][step], rel=1e-5), step
    assert single["losses"][-1] < single["losses"][0]
    assert rank0["losses"][1] != pytest.approx(rank1["losses"][1], rel=1e-5)  # the ranks saw different pairs
    for name, weight in single["weights"].items():
        torch.testing.assert_close(rank0["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_rloo_ddp_keeps_each_prompts_samples_on_one_rank(ddp_run, tmp_path, monkeypatch):
    """Sampled episodes differ from one process's (other random draws), so unlike PPO's
    test this one checks the ranks agree, trained, and kept each prompt's k samples together."""
    single_process("rloo", tmp_path, monkeypatch)
    rank0, rank1 = ddp_run.records("rloo")
    assert_same_weights_on_both_ranks(rank0, rank1)
    assert not any("value" in name for name in rank0["weights"])  # no critic under DDP either
    assert rank0["losses"] == rank1["losses"]  # logged metrics are rank means
    ddp_rows, single_rows = _rollouts(ddp_run.folder / "ddp", "rloo_tiny"), _rollouts(tmp_path / "single", "rloo_tiny")
    assert len(ddp_rows) == len(single_rows) == 4 * 2 * ddp_driver.STEPS
    for step in range(ddp_driver.STEPS):
        prompts = [r["prompt"] for r in ddp_rows if int(r["step"]) == step]
        # rank 0 gathers rank by rank: a prompt's group split across ranks would break the pairs
        assert prompts[0::2] == prompts[1::2] and len(set(prompts)) == 4
        assert set(prompts) == {r["prompt"] for r in single_rows if int(r["step"]) == step}


def test_critique_revision_ddp_shards_and_merges(ddp_run):
    output = ddp_run.output()
    # Each rank generated half of the six prompts ...
    for rank in (0, 1):
        assert f"rank {rank}: 3 prompts critiqued and revised in this run" in output, output[-3000:]
    # ... and rank 0 merged both shards into one file, in input order, nothing twice.
    sl = ddp_run.folder / "ddp" / "sl.jsonl"
    rows = [json.loads(line) for line in sl.read_text().splitlines()]
    prompts = (ddp_driver.ROOT / "data/red_team_prompts.jsonl").read_text().splitlines()
    assert [r["id"] for r in rows] == [json.loads(line)["id"] for line in prompts[: ddp_driver.CR_PROMPTS]]
    assert not (ddp_run.folder / "ddp" / "sl.jsonl.shards").exists()
    principles = load_constitution().principles("ethical")
    assert all(r["principle"] == draw_principle(principles, 0, r["id"], 0).pair for r in rows)
