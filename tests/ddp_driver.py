"""Runs the SFT, reward, PPO, DPO and RLOO fits one after another through ``ucai.cli.main``
and records, per rank, each step's loss and the trainable weights at the end; then the
critique-revision stage's predict, whose ranks each write a shard that rank 0 merges (for
tests/test_ddp.py).

    python tests/ddp_driver.py FOLDER            # 2-process DDP (gloo) on CPU
    # in a test: run_stage(stage, FOLDER, devices=1) for the single-process reference

Under DDP the stages compose with the shipped ``configs/strategies/ddp.yaml`` as a user
would. Lightning's subprocess launcher starts rank 1 by re-running this script with the
same arguments; after the first fit both processes have the process group and the
environment of their rank, so the later stages reuse them instead of launching again.

The data are sized so that a single process given the doubled batch size sees, in each
step, the union of the two ranks' batches of that step: SFT 12 rows in global batches
of 8 and 4 (`LengthBucketSampler` deals each global batch out to the ranks), reward and
DPO 16 pairs and PPO 8 prompts, one batch per rank and epoch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"
STAGES = ("sft", "reward", "ppo", "dpo", "rloo", "critique_revision")
STEPS = 3  # optimiser steps per fit
CR_PROMPTS = 6  # critique-revision's prompts (critique_revision_tiny.yaml's limit): 3 per rank


class RankRecorder(Callback):
    """Writes ``FOLDER/STAGE-rankR.pt``: {"losses", "counts", "weights", "world_size"}.

    ``losses[i]`` is step i's loss as this rank computed it (before that step's update;
    for SFT the rank's mean weighted by its share of the step's tokens, the loss DDP
    averages);
    ``counts[i]`` what the loss is a mean over (response tokens for SFT, pairs for the
    reward model and DPO). PPO optimises manually and returns nothing; its record is the logged
    value loss, which is already averaged over ranks, and the mean response length. RLOO
    has no value loss: its record is the logged (rank-averaged) policy loss.
    """

    def __init__(self, folder: str, stage: str):
        self.folder = Path(folder)
        self.stage = stage
        self.losses: list[float] = []
        self.counts: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stage in ("ppo", "rloo"):
            self.losses.append(float(trainer.callback_metrics["loss/value" if self.stage == "ppo" else "loss/policy"]))
            self.counts.append(float(trainer.callback_metrics["response/length"]))
            return
        self.losses.append(float(outputs["loss"]))
        if self.stage == "sft":
            self.counts.append(float((batch["labels"][:, 1:] != -100).sum()))
        else:
            self.counts.append(float(batch["p_chosen"].shape[0]))

    def on_train_end(self, trainer, pl_module) -> None:
        # Before the module's own on_train_end, where the reward model merges its LoRA.
        weights = {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters() if p.requires_grad}
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"losses": self.losses, "counts": self.counts, "weights": weights, "world_size": trainer.world_size}
        torch.save(record, self.folder / f"{self.stage}-rank{trainer.global_rank}.pt")


def critique_revision_args(folder: Path, devices: int) -> list[str]:
    """``ucai predict`` arguments of the tiny critique-revision stage, writing
    ``FOLDER/sl.jsonl``."""
    strategy = ["--config", str(ROOT / "configs" / "strategies" / "ddp.yaml")] if devices > 1 else []
    return [
        "predict", "--config", str(CONF / "critique_revision_tiny.yaml"), *strategy,
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        f"--data.init_args.path={ROOT / 'data/red_team_prompts.jsonl'}", f"--data.init_args.limit={CR_PROMPTS}",
        f"--model.init_args.output={folder / 'sl.jsonl'}",
    ]


def stage_args(stage: str, folder: Path, devices: int) -> list[str]:
    """``ucai fit`` arguments of one tiny stage; ``devices=1`` doubles the batch so the
    single process sees both ranks' rows in each step."""
    if stage == "critique_revision":
        return critique_revision_args(folder, devices)
    per_rank = {"sft": 4, "reward": 8, "ppo": 4, "dpo": 8, "rloo": 2}[stage]
    batch = per_rank * 2 if devices == 1 else per_rank
    recorder = {"class_path": "ddp_driver.RankRecorder", "init_args": {"folder": str(folder), "stage": stage}}
    common = [
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.max_steps={STEPS}",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0", f"--trainer.callbacks=[{json.dumps(recorder)}]",
    ]
    if devices > 1:
        common = ["--config", str(ROOT / "configs" / "strategies" / "ddp.yaml"), *common]
    # PPO and RLOO keep their TensorBoard logger: rank 0 writes every rank's episodes to its run folder.
    online = stage in ("ppo", "rloo")
    common.append(f"--trainer.logger.init_args.save_dir={folder}" if online else "--trainer.logger=false")
    if stage == "sft":
        # 12 rows, no validation split: one global batch of 8 and one of 4 per epoch.
        specific = [
            f"--data.init_args.path={ROOT / 'tests/fixtures/sl_small.jsonl'}", "--data.init_args.val_fraction=0",
            f"--data.init_args.batch_size={batch}", "--model.init_args.export=false",
        ]
    elif stage == "reward":
        # The first 16 pairs train (the next 8 are the validation split): one batch per rank.
        specific = [
            f"--data.init_args.path={ROOT / 'tests/fixtures/preferences_small.jsonl'}", "--data.init_args.limit=24",
            "--data.init_args.val_size=8", f"--data.init_args.batch_size={batch}",
            "--model.init_args.output_dir=null",
        ]
    elif stage == "dpo":
        # As the reward model: 16 training pairs, one batch per rank and epoch.
        specific = [
            f"--data.init_args.path={ROOT / 'tests/fixtures/preferences_small.jsonl'}", "--data.init_args.limit=24",
            "--data.init_args.val_size=8", f"--data.init_args.batch_size={batch}",
            "--model.init_args.export=false",
        ]
    elif stage == "rloo":
        # 4 prompts, 2 per rank, each sampled rloo_k = 2 times at temperature 0.1
        # (rloo_tiny.yaml): greedy samples of a prompt would be identical, their
        # advantages 0, and the weights would never move.
        specific = [
            f"--data.init_args.path={ROOT / 'data/red_team_prompts.jsonl'}", "--data.init_args.limit=4",
            f"--data.init_args.batch_size={batch}", f"--model.init_args.minibatch_size={batch * 2}",
            "--model.init_args.export=false",
        ]
    else:
        # 8 prompts, greedy responses (so both runs roll out the same episodes), one
        # minibatch per rollout: each step's value loss is computed before its update.
        specific = [
            f"--data.init_args.path={ROOT / 'data/red_team_prompts.jsonl'}", "--data.init_args.limit=8",
            f"--data.init_args.batch_size={batch}", f"--model.init_args.minibatch_size={batch}",
            "--model.init_args.generation.do_sample=false", "--model.init_args.export=false",
        ]
    return ["fit", "--config", str(CONF / f"{stage}_tiny.yaml"), *common, *specific]


def run_stage(stage: str, folder: Path, devices: int) -> int:
    from ucai.cli import main

    return main(stage_args(stage, Path(folder), devices))


def run_all(folder: Path, devices: int = 2) -> int:
    for stage in STAGES:
        code = run_stage(stage, folder, devices)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))  # the recorder's class_path: ddp_driver.RankRecorder
    sys.exit(run_all(Path(sys.argv[1])))
