"""RLOO in the online RL stage (`PPOModule` with ``advantage: rloo``) on the tiny model, on
CPU: no critic anywhere, each prompt sampled k times in a row, resume (in this process,
and after SIGKILL of a ``ucai fit``), learning on the synthetic newline reward, fp32
rollouts under a bf16-mixed trainer, and the settings refused before any model loads.
The estimator's maths is in tests/test_rl.py."""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import ucai.stages.ppo_rollout
from ucai.data.prompt_datamodule import PromptDataModule
from ucai.errors import UcaiError
from ucai.stages.generation import GenerationSettings
from ucai.stages.ppo import PPOCheckpoint

ROOT = Path(__file__).resolve().parents[1]
RLOO_TINY = ROOT / "tests" / "conf" / "rloo_tiny.yaml"


def prompts(limit: int, batch_size: int, shuffle: bool = True) -> PromptDataModule:
    return PromptDataModule(limit=limit, batch_size=batch_size, split="train", shuffle=shuffle)


def rollout_rows(log_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(log_dir / "rollouts.csv", encoding="utf-8")))


def trainable_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if module.is_trainable_key(k)}


# --------------------------------------------------------------------------- no critic


def test_rloo_builds_no_critic_and_saves_and_exports_the_policy_alone(tmp_path, tiny_ppo, tiny_trainer, monkeypatch):
    # value_head: adapter would add a second adapter and a head under PPO; RLOO builds neither.
    # Two minibatches a rollout: the rollout keeps its own no-grad policy pass, so the
    # first-ratio check below compares two passes (a fused first update has 0 by construction).
    module = tiny_ppo(
        advantage="rloo", rloo_k=2, minibatch_size=2, value_head="adapter", export=True,
        output_dir=str(tmp_path / "rl_model"),
    )

    def no_value_pass(*args, **kwargs):
        raise AssertionError("a value forward ran")

    monkeypatch.setattr(module, "values_for", no_value_pass)
    checkpoint = PPOCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(module, datamodule=prompts(limit=2, batch_size=2))

    assert module.value_head is None and list(module.policy.peft_config) == ["policy"]
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.endswith(".policy.weight") for n in trainable), trainable
    assert len(module._trainable) == len(trainable)  # what the optimiser steps
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(trainable)
    assert saved["ucai_ppo"]["rollout_step"] == 1

    # The first minibatch sees the log-probs it was sampled with; TRL's names, no value ones.
    assert module.last_stats["first_ratio_max_dev"] < 1e-6
    for name in ("objective/rlhf_reward", "objective/kl", "objective/scores", "objective/entropy",
                 "policy/clipfrac", "policy/approxkl", "loss/policy", "response/length", "perf/episodes_per_s"):
        assert name in trainer.logged_metrics, name
    assert not {"loss/value", "val/clipfrac", "val/mean"} & set(trainer.logged_metrics)

    # 2 prompts x k = 2 episodes, each prompt's samples in a row.
    rows = rollout_rows(Path(trainer.log_dir))
    assert len(rows) == 4
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"] == rows[3]["prompt"]
    # The export is the merged policy, as under PPO.
    assert (tmp_path / "rl_model" / "model.safetensors").is_file()
    assert (tmp_path / "rl_model" / "tokenizer_config.json").is_file()


# --------------------------------------------------------------------------- resume


class Crash(Exception):
    """Stands for the process dying."""


class CrashAtStep(L.Callback):
    """Raise at the start of the first batch at or past optimiser step ``step`` (after the
    checkpoint of the batch before it was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Crash(f"crash at step {trainer.global_step}")


def test_episode_seeds_are_per_prompt_sample_and_iteration_whatever_the_batch(tiny_ppo):
    from ucai.next_token import row_seed

    module = tiny_ppo(advantage="rloo", rloo_k=3)
    a, b, c = {"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "prompt": "z"}
    seeds = module.episode_seeds([a, b])
    assert len(seeds) == 6 and len(set(seeds)) == 6  # each prompt's k samples draw differently
    assert seeds[:3] == [row_seed(0, "rollout/0/a", k) for k in range(3)]  # prompt a's group, in order
    assert module.episode_seeds([c, a])[3:] == seeds[:3]  # its neighbours and place do not matter
    module.rollout_step = 1
    assert not set(module.episode_seeds([a])) & set(seeds)  # the next iteration draws afresh


def test_rloo_stopped_and_resumed_from_last_equals_the_uninterrupted_run(tmp_path, tiny_ppo, tiny_trainer):
    # 3 rollout batches of 2 prompts x 2 samples, minibatches of 2 episodes: 2 optimiser
    # steps per batch, 6 in all, over the linear learning-rate decay. The stopped run dies
    # at step 4; the resumed one starts from `last` in the same checkpoint folder.
    # Temperature 0.1 samples the rewarded newline often enough for samples to differ.
    def fit(root: Path, *callbacks, ckpt_path=None):
        L.seed_everything(0)
        module = tiny_ppo(
            advantage="rloo", rloo_k=2, minibatch_size=2,
            generation=GenerationSettings(max_new_tokens=6, temperature=0.1, top_p=1.0),
        )
        checkpoint = PPOCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
        trainer = tiny_trainer(root, 6, callbacks=[checkpoint, *callbacks], enable_checkpointing=True)
        trainer.fit(module, datamodule=prompts(limit=6, batch_size=2), ckpt_path=ckpt_path)
        return module, trainer

    full, full_trainer = fit(tmp_path / "full")
    with pytest.raises(Crash):
        fit(tmp_path / "stopped", CrashAtStep(4))
    resumed, resumed_trainer = fit(tmp_path / "stopped", ckpt_path="last")

    assert full_trainer.global_step == resumed_trainer.global_step == 6
    assert full.updates_per_batch() == 2  # counts episodes (2 x k), not prompts, per minibatch
    assert full.rollout_step == resumed.rollout_step == 3
    state, resumed_state = trainable_state(full), trainable_state(resumed)
    assert state.keys() == resumed_state.keys() and not any("value" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # it did train
    for key, value in state.items():
        assert torch.equal(resumed_state[key], value), key
    # The resumed run sampled the third batch's episodes exactly as the uninterrupted one.
    expected = [row for row in rollout_rows(Path(full_trainer.log_dir)) if row["step"] == "2"]
    assert len(expected) == 4 and rollout_rows(Path(resumed_trainer.log_dir)) == expected


def _fit_in_this_child(folder: Path, args: list[str], log: Path) -> None:
    """A forked child's whole life: ``ucai fit ARGS`` in ``folder`` through the stage
    runner's entry point, output to ``log``. The pipeline runs each stage like this, in
    a process forked with the libraries already imported (`ucai.pipeline.runner`), which
    spares the test an interpreter start."""
    code = 1
    try:
        output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.chdir(folder)
        from ucai.stage_cli import main

        code = main(args)
    finally:
        os._exit(code)  # never back into pytest


def _kill_after_first_checkpoint(process, checkpoint: Path, outcome: dict) -> None:
    """Watch for the first checkpoint and SIGKILL the process at once; records whether
    it was still running then."""
    deadline = time.monotonic() + 120  # a child that never checkpoints fails the test, not hangs it
    while not checkpoint.exists() and process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    outcome["running"] = process.is_alive()
    if outcome["running"]:
        os.kill(process.pid, signal.SIGKILL)
    process.join()


def test_rloo_fit_killed_with_sigkill_then_resumed_is_bit_identical(tmp_path, run_cli, monkeypatch):
    # tests/conf/rloo_tiny.yaml: 3 rollout batches of 2 prompts x 2 samples, one optimiser
    # step each, a checkpoint after every step, linear learning-rate decay. The killed
    # `ucai fit` runs in a process of its own; the uninterrupted run and the rerun with
    # `--ckpt_path last` run here, the rerun from the killed run's files alone.
    args = ["fit", "--config", str(RLOO_TINY), "--model.init_args.export=false"]
    killed, full = tmp_path / "killed", tmp_path / "full"
    killed.mkdir()
    full.mkdir()
    log_root = Path("lightning_logs") / "rloo_tiny"
    process = multiprocessing.get_context("fork").Process(
        target=_fit_in_this_child, args=(killed, args, tmp_path / "killed.log")
    )
    process.start()
    outcome: dict = {}
    watcher = threading.Thread(
        target=_kill_after_first_checkpoint, args=(process, killed / log_root / "checkpoints" / "last.ckpt", outcome)
    )
    watcher.start()  # after the fork: a forked child inherits no thread
    try:
        monkeypatch.chdir(full)
        assert run_cli(*args) == 0  # the uninterrupted run, meanwhile
    finally:
        watcher.join()
    assert outcome["running"] and process.exitcode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    stopped_at = torch.load(killed / log_root / "checkpoints" / "last.ckpt", weights_only=False)["ucai_ppo"]
    assert 1 <= stopped_at["rollout_step"] < 3  # killed mid-run, after a checkpoint

    monkeypatch.chdir(killed)
    assert run_cli(*args, "--ckpt_path", "last") == 0

    want = torch.load(full / log_root / "checkpoints" / "last.ckpt", weights_only=False)
    got = torch.load(killed / log_root / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == want["global_step"] == 3
    assert got["ucai_ppo"] == want["ucai_ppo"]
    assert want["state_dict"].keys() == got["state_dict"].keys()
    assert not any("value" in k for k in want["state_dict"])
    assert any(v.abs().sum() > 0 for k, v in want["state_dict"].items() if "lora_B" in k)  # it did train
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    # Adam's moments too: a later resume of either would continue alike.
    want_moments, got_moments = want["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert want_moments.keys() == got_moments.keys()
    for index, moments in want_moments.items():
        for name, tensor in moments.items():
            assert torch.equal(got_moments[index][name], tensor), (index, name)
    # The rerun's episodes (its own log folder) are those of the uninterrupted run's steps.
    rerun = sorted((killed / log_root).glob("version_*"))[-1]
    expected = [r for r in rollout_rows(full / log_root / "version_0") if int(r["step"]) >= stopped_at["rollout_step"]]
    assert expected and rollout_rows(rerun) == expected


# --------------------------------------------------------------------------- learning


class RecordScores(L.Callback):
    def __init__(self):
        self.scores: list[float] = []
        self.kls: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.scores.append(module.last_stats["objective/raw_scores"])
        self.kls.append(module.last_stats["objective/kl"])


def test_rloo_raises_the_score_with_bounded_kl(tmp_path, tiny_ppo, tiny_lora, tiny_trainer):
    # The settings of tests/test_ppo_learning.py (LoRA on lm_head, temperature 0.1, the
    # newline reward, 8 episodes per rollout batch, 2 epochs of one minibatch), as 2
    # prompts x k = 4 samples. Starting share of newlines ~0.1; with the advantage's sign
    # flipped the score falls to 0 instead.
    torch.manual_seed(0)
    module = tiny_ppo(
        advantage="rloo",
        rloo_k=4,
        lora=dataclasses.replace(tiny_lora, r=8, alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]),
        ppo_epochs=2,
        minibatch_size=8,
        learning_rate=3e-3,
        lr_schedule="constant",
        kl_coef=0.05,
        missing_eos_penalty=0.0,  # the tiny model never says eos; the penalty would be a constant
        generation=GenerationSettings(max_new_tokens=4, temperature=0.1, top_p=1.0),
    )
    record = RecordScores()
    iterations = 6
    trainer = tiny_trainer(tmp_path, iterations * 2, logger=False, callbacks=[record])
    trainer.fit(module, datamodule=prompts(limit=48, batch_size=2))
    assert len(record.scores) == iterations
    start, end = statistics.mean(record.scores[:2]), statistics.mean(record.scores[-2:])
    assert start < 0.5, record.scores
    assert end > 0.8 and end - start > 0.3, record.scores
    assert max(record.kls) < 10.0, record.kls


# --------------------------------------------------------------------------- rollout precision


@pytest.mark.parametrize("rollout_precision", ["fp32", "trainer"])
def test_rollout_precision_under_a_bf16_mixed_trainer(rollout_precision, tmp_path, tiny_ppo, tiny_trainer, monkeypatch):
    # fp32: sampling, the rollout forward and scoring run without autocast, and the
    # rollout's log-probs are those of an fp32 forward; the training forward keeps the
    # trainer's bf16 autocast. trainer: everything under autocast, as before.
    module = tiny_ppo(advantage="rloo", rloo_k=2, rollout_precision=rollout_precision, frozen_linear_bf16=False)
    autocast: dict[str, list[bool]] = {"generate": [], "score": [], "rollout_forward": [], "minibatch_loss": []}
    checked = {}

    def recorded(name, function):
        def call(*args, **kwargs):
            autocast[name].append(torch.is_autocast_enabled("cpu"))
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(ucai.stages.ppo_rollout, "generate", recorded("generate", ucai.stages.ppo_rollout.generate))
    for name in ("score", "rollout_forward", "minibatch_loss"):
        monkeypatch.setattr(module, name, recorded(name, getattr(module, name)))
    rollout = module.rollout

    def rollout_then_compare(rows, **kwargs):
        result = rollout(rows, **kwargs)
        ids, attention, width = result.sequences, result.attention_mask, result.prompt_length
        mask = result.mask
        with torch.autocast("cpu", enabled=False):
            fp32, _, _ = module.rollout_forward(ids, attention, width)
        mixed, _, _ = module.rollout_forward(ids, attention, width)  # under the trainer's autocast
        checked["fp32"] = ((result.logprobs - fp32) * mask).abs().max()
        checked["mixed"] = ((result.logprobs - mixed) * mask).abs().max()
        return result

    monkeypatch.setattr(module, "rollout", rollout_then_compare)
    trainer = tiny_trainer(tmp_path, 1, logger=False, precision="bf16-mixed")
    trainer.fit(module, datamodule=prompts(limit=2, batch_size=2))

    in_rollout = rollout_precision == "trainer"
    assert autocast["generate"] == [in_rollout] and autocast["score"] == [in_rollout]
    assert autocast["rollout_forward"][0] is in_rollout  # the rollout's own pass
    assert autocast["minibatch_loss"] == [True]  # the training forward: always the trainer's
    same, other = ("fp32", "mixed") if rollout_precision == "fp32" else ("mixed", "fp32")
    assert checked[same] < 1e-6, checked
    assert checked[other] > 1e-3, checked  # bf16 matmuls do change the log-probs


# --------------------------------------------------------------------------- fused first update


def _fit_counting_policy_passes(module, root, tiny_trainer, monkeypatch, precision="32-true", steps=2):
    """Fit ``steps`` optimiser steps on 2 prompts; returns (forwards under the policy
    adapter, the trainer). Reference passes (adapter off) and a critic's (its own
    adapter) are not counted."""
    passes = []
    forward = module.response_hidden
    first_gradients = {}
    before_step = module.on_before_optimizer_step

    def record_first_gradients(optimizer):
        if not first_gradients:
            first_gradients.update({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
        return before_step(optimizer)

    monkeypatch.setattr(module, "on_before_optimizer_step", record_first_gradients)
    module.first_gradients = first_gradients

    def counted(*args, **kwargs):
        passes.append(module.policy.active_adapter if not _adapter_disabled(module) else None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "response_hidden", counted)
    trainer = tiny_trainer(root, steps, precision=precision)
    trainer.fit(module, datamodule=prompts(limit=2, batch_size=2, shuffle=False))
    return sum(p == "policy" for p in passes), trainer


def _adapter_disabled(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.policy.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(m.disable_adapters for m in layers)


def test_the_first_update_stands_in_for_the_rollout_policy_pass_with_the_same_result(
    tmp_path, tiny_ppo, tiny_trainer, monkeypatch
):
    # RLOO, 2 prompts x k=2 = 4 episodes in one minibatch of 4, fp32, 2 epochs: the
    # first update's forward is the rollout's policy pass. Against the same run with
    # the separate no-grad pass, everything agrees up to the attention kernel's rounding.
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        module = tiny_ppo(advantage="rloo", rloo_k=2, minibatch_size=4, ppo_epochs=2)
        _start_away_from_the_reference(module, monkeypatch)
        if not fused:
            monkeypatch.setattr(module, "fuses_first_update", lambda episodes: False)
        policy_passes, trainer = _fit_counting_policy_passes(module, tmp_path / str(fused), tiny_trainer, monkeypatch)
        runs[fused] = (policy_passes, module, rollout_rows(Path(trainer.log_dir)))
    (fused_passes, fused, fused_rows), (plain_passes, plain, plain_rows) = runs[True], runs[False]
    assert (fused_passes, plain_passes) == (2, 3)  # 2 updates, plus the rollout's own pass when not fused
    assert fused.last_stats["first_ratio_max_dev"] == 0.0  # by construction: old log-probs ARE these
    assert plain.last_stats["first_ratio_max_dev"] < 1e-5
    assert [r["response"] for r in fused_rows] == [r["response"] for r in plain_rows]
    for column in ("score", "kl", "reward"):
        got = torch.tensor([float(r[column]) for r in fused_rows])
        expected = torch.tensor([float(r[column]) for r in plain_rows])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The first update's gradients (Adam's first steps are about sign(g), which rounding
    # flips where g is ~0, so the weights after it are not the thing to compare).
    got, expected = fused.first_gradients, plain.first_gradients
    assert set(got) == set(expected) and any(float(g.abs().max()) > 1e-4 for g in expected.values())
    for name, gradient in got.items():
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(gradient, expected[name], rtol=1e-3, atol=1e-5 * scale + 1e-12, msg=name)


def test_a_rollout_without_the_policy_pass_is_refused_with_a_critic(tiny_ppo):
    module = tiny_ppo(advantage="gae")
    with pytest.raises(RuntimeError, match="needs RLOO"):
        module.rollout([{"id": "x", "prompt": "hello"}], policy_pass=False)


@pytest.mark.parametrize("matched_kernel", [True, False])
def test_a_fused_first_update_at_the_reference_has_a_kl_and_advantages_of_exactly_zero(
    matched_kernel, tmp_path, tiny_ppo, tiny_trainer, monkeypatch
):
    # The policy starts as the reference (LoRA B = 0) and a reward that no sample earns
    # ties every score. The reference pass takes the kernel of the gradient pass that is
    # the policy's pass, so the first KL is exactly 0 and so are the advantages. Without
    # it (the control), the two attention kernels' rounding is a KL that gives tied
    # episodes advantages of their own, which the rescaling (eps 1e-4) enlarges.
    module = tiny_ppo(
        advantage="rloo", rloo_k=2, minibatch_size=4, ppo_epochs=1, rloo_normalize_advantages=True,
        reward_model="token:0",
    )
    completed = []
    complete = module.complete_rollout

    def recorded(rollout, logprobs):
        complete(rollout, logprobs)
        completed.append(rollout)

    monkeypatch.setattr(module, "complete_rollout", recorded)
    if not matched_kernel:
        sequence_logprobs = module.sequence_logprobs
        monkeypatch.setattr(
            module, "sequence_logprobs", lambda *args, gradient_pass=None, **kwargs: sequence_logprobs(*args, **kwargs)
        )
    policy_passes, _ = _fit_counting_policy_passes(module, tmp_path, tiny_trainer, monkeypatch, steps=1)
    assert policy_passes == 1 and len(completed) == 1
    rollout = completed[0]
    assert torch.count_nonzero(rollout.scores - rollout.scores[0]) == 0  # tied scores
    if matched_kernel:
        assert torch.count_nonzero(rollout.kl) == 0 and torch.count_nonzero(rollout.advantages) == 0
    else:
        assert torch.count_nonzero(rollout.kl) > 0 and torch.count_nonzero(rollout.advantages) > 0


def _start_away_from_the_reference(module, monkeypatch) -> None:
    """After the model is built, set its LoRA B weights to seeded random values: the
    policy then differs from the reference, and the KL gives every episode its own
    advantage even where the scores tie."""
    configure = module.configure_model

    def configure_then_move():
        configure()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in sorted(module.policy.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    monkeypatch.setattr(module, "configure_model", configure_then_move)


@pytest.mark.parametrize(
    "settings, precision",
    [
        (dict(advantage="rloo", rloo_k=2, minibatch_size=2), "32-true"),  # two minibatches a rollout
        (dict(advantage="gae", minibatch_size=4), "32-true"),  # a critic: the rollout's values are needed
        (dict(advantage="rloo", rloo_k=2, minibatch_size=4, rollout_precision="trainer"), "bf16-mixed"),
    ],
    ids=["minibatches", "critic", "autocast"],
)
def test_the_rollout_keeps_its_own_policy_pass_where_the_first_update_cannot_stand_in(
    settings, precision, tmp_path, tiny_ppo, tiny_trainer, monkeypatch
):
    module = tiny_ppo(ppo_epochs=1, frozen_linear_bf16=False, **settings)
    episodes = 2 * module.episodes_per_prompt  # 2 prompts
    updates = -(-episodes // module.minibatch_size)
    policy_passes, _ = _fit_counting_policy_passes(module, tmp_path, tiny_trainer, monkeypatch, precision, updates)
    assert policy_passes - updates == updates  # the rollout's own no-grad pass, one per chunk


# --------------------------------------------------------------------------- refused settings


@pytest.fixture
def no_model_loads(monkeypatch):
    import ucai.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the settings were checked")

    monkeypatch.setattr(ucai.models, "load_causal_lm", refuse)


def _one_error_line(run_cli, capsys, *overrides: str) -> str:
    assert run_cli("fit", "--config", RLOO_TINY, *overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucai: error: "), lines
    return lines[0]


def test_rloo_k_below_two_is_refused_while_parsing(run_cli, capsys, no_model_loads, tiny_ppo):
    line = _one_error_line(run_cli, capsys, "--model.init_args.rloo_k=1")
    assert "--model.init_args.rloo_k" in line and "1 does not conform" in line and ">=2" in line, line
    # A module built in Python (no parser) is refused by its constructor.
    with pytest.raises(UcaiError, match=r"rloo_k is 1, .*set rloo_k: 2 or more"):
        tiny_ppo(advantage="rloo", rloo_k=1)


def test_fp32_rollouts_with_frozen_weights_in_bf16_are_refused(run_cli, capsys, no_model_loads, tiny_ppo):
    # frozen_linear_bf16 is on by default.
    line = _one_error_line(run_cli, capsys, "--model.init_args.rollout_precision=fp32")
    assert "rollout_precision: fp32" in line and "set frozen_linear_bf16: false" in line, line
    with pytest.raises(UcaiError, match="frozen_linear_bf16: false"):
        tiny_ppo(rollout_precision="fp32", frozen_linear_bf16=True)
    tiny_ppo(rollout_precision="fp32", frozen_linear_bf16=False)  # accepted
