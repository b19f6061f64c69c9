"""DPO: the loss by hand, the reference as the SL model, packed log-probs equal to
unpacked ones, the reply boundaries, learning a synthetic preference, resume, a kill -9
mid-fit, and bad input through ``ucai fit`` (tiny model, CPU, fp32)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ucai.data.dpo_data import DPODataModule
from ucai.losses import dpo_loss
from ucai.stages.dpo import (
    IGNORE,
    METRICS,
    DPOModule,
    packed_reply_logps,
    packed_reply_targets,
    sequence_reply_logps,
    sequence_reply_targets,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "dpo_tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "preferences_small.jsonl"
TINY = "tiny-llama"


# --------------------------------------------------------------------------- the loss by hand


def test_dpo_loss_hard_labels_by_hand():
    # β = 0.1. Pair 1: the policy raised chosen by 1 nat and lowered rejected by 1 nat:
    #   r_c = 0.1 · (−10 − (−11)) = 0.1, r_r = 0.1 · (−12 − (−11)) = −0.1, h = 0.2
    #   −log σ(0.2) = log(1 + e^−0.2) = log(1.818731) = 0.598139
    # Pair 2: policy = reference: h = 0 → log 2 = 0.693147.   Mean: 0.645643.
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -7.0]), torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -7.0]), 0.1
    )
    assert loss.item() == pytest.approx(0.645643, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert rejected.tolist() == pytest.approx([-0.1, 0.0], abs=1e-6)
    assert not chosen.requires_grad


def test_dpo_loss_soft_label_by_hand():
    # h = 0.2 as above, p = 0.8:
    #   −log σ(0.2) = 0.598139,  −log σ(−0.2) = log(1 + e^0.2) = log(2.221403) = 0.798139
    #   loss = 0.8 · 0.598139 + 0.2 · 0.798139 = 0.478511 + 0.159628 = 0.638139
    args = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), 0.1
    assert dpo_loss(*args, p_chosen=torch.tensor([0.8]))[0].item() == pytest.approx(0.638139, abs=1e-6)
    # p = 1 is the hard-label loss; p = 1/2 is symmetric in h: 0.5 · (0.598139 + 0.798139) = 0.698139.
    assert dpo_loss(*args, p_chosen=torch.tensor([1.0]))[0].item() == pytest.approx(0.598139, abs=1e-6)
    assert dpo_loss(*args, p_chosen=torch.tensor([0.5]))[0].item() == pytest.approx(0.698139, abs=1e-6)


def trl_conservative_sigmoid(policy_c, policy_r, ref_c, ref_r, beta, label_smoothing):
    """TRL's sigmoid DPO loss with ``label_smoothing`` as it stood before 1.0
    (``dpo_trainer.py``: ``-F.logsigmoid(beta * logits) * (1 - label_smoothing) -
    F.logsigmoid(-beta * logits) * label_smoothing``; 1.12 keeps the term in ``aot``)."""
    logits = (policy_c - policy_r) - (ref_c - ref_r)
    losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses.mean()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_trls(label_smoothing):
    generator = torch.Generator().manual_seed(0)
    logps = [-20 * torch.rand(6, generator=generator) for _ in range(4)]
    module = DPOModule(policy=TINY, label_smoothing=label_smoothing, export=False)
    file_labels = torch.tensor([1.0, 0.9, 0.8, 1.0, 0.5, 0.7])  # ignored when label_smoothing is set
    loss, _, _ = dpo_loss(*logps, 0.25, module.preference_targets(file_labels))
    expected = trl_conservative_sigmoid(*logps, 0.25, label_smoothing)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    # null: each pair's own label.
    soft = DPOModule(policy=TINY, export=False).preference_targets(file_labels)
    assert torch.equal(soft, file_labels)


# --------------------------------------------------------------------------- fixtures


def tiny_dpo(tiny_lora, **overrides) -> DPOModule:
    settings = dict(policy=TINY, lora=tiny_lora, learning_rate=1e-2, lr_schedule="constant", export=False)
    return DPOModule(**{**settings, **overrides})


def preference_data(path: Path = FIXTURE, **overrides) -> DPODataModule:
    settings = dict(path=str(path), tokenizer=TINY, max_length=64, batch_size=8, val_size=16, limit=48)
    return DPODataModule(**{**settings, **overrides})


def perturbed(module: DPOModule) -> DPOModule:
    """The module built, with random adapter weights: LoRA's B starts at zero, where the
    policy IS the reference and a wrong reference would go unnoticed."""
    module.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.policy.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return module


@pytest.fixture
def edge_pairs(tmp_path) -> Path:
    """Pairs whose replies share their first words (the fork lies inside the replies),
    a multi-turn conversation, and a long pair that truncation cuts."""
    rows = [
        {"id": "same-start", "prompt": "Name a pet.", "chosen": "The cat is kind.", "rejected": "The dog barks loudly.", "p_chosen": 0.8},
        {"id": "one-token", "prompt": "Yes or no?", "chosen": "Yes", "rejected": "No", "p_chosen": 1.0},
        {
            "id": "turns",
            "prompt": [
                {"role": "user", "content": "Hi there."},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a fact."},
            ],
            "chosen": "Water boils at 100 degrees at sea level.",
            "rejected": "I will not.",
            "p_chosen": 0.9,
        },
        {"id": "long", "prompt": "Describe the sea " * 12, "chosen": "Blue and wide.", "rejected": "Grey and cold today.", "p_chosen": 1.0},
    ]
    path = tmp_path / "edge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_batch(path: Path, max_length: int = 64) -> tuple[DPODataModule, dict]:
    data = preference_data(path, max_length=max_length, val_size=0, limit=None, batch_size=16)
    data.setup("fit")
    rows = data._encoded["train"]
    return data, data.collate(rows)


# --------------------------------------------------------------------------- reply boundaries


def test_reply_targets_are_the_reply_tokens_and_its_end_of_turn(edge_pairs):
    data, batch = one_batch(edge_pairs, max_length=512)
    tokenizer = data.tokenizer
    targets = sequence_reply_targets(
        batch["input_ids"], batch["attention_mask"], torch.cat([batch["response_start"][:, 0], batch["response_start"][:, 1]])
    )
    replies = [p.chosen for p in data.train_pairs] + [p.rejected for p in data.train_pairs]
    for row, reply in zip(targets, replies, strict=True):
        assert tokenizer.decode(row[row != IGNORE]) == reply + tokenizer.eos_token
    # "The cat ..." / "The dog ...": the pair shares a reply token, so the packed
    # rows fork after the reply has started.
    same_start = data.train_pairs.index(next(p for p in data.train_pairs if p.id == "same-start"))
    shared, starts = batch["pair_segments"][same_start, 0], batch["response_start"][same_start]
    assert shared > starts[0] == starts[1]


def test_packed_targets_give_the_same_tokens_as_the_two_sequences(edge_pairs):
    _, batch = one_batch(edge_pairs)
    chosen, rejected = packed_reply_targets(batch["pair_ids"], batch["pair_segments"], batch["response_start"])
    starts = batch["response_start"]
    sequences = sequence_reply_targets(batch["input_ids"], batch["attention_mask"], torch.cat([starts[:, 0], starts[:, 1]]))
    for packed, unpacked in zip([*chosen, *rejected], sequences, strict=True):
        assert packed[packed != IGNORE].tolist() == unpacked[unpacked != IGNORE].tolist()


def test_truncation_keeps_the_reply_and_moves_its_start(edge_pairs):
    _, full = one_batch(edge_pairs, max_length=512)
    data, cut = one_batch(edge_pairs, max_length=40)
    long = [p.id for p in data.train_pairs].index("long")
    lengths = full["attention_mask"].sum(1), cut["attention_mask"].sum(1)
    pairs = len(data.train_pairs)
    removed = int(lengths[0][long] - lengths[1][long])
    assert removed > 0 and int(lengths[1][long]) <= 40 and int(lengths[1][long + pairs]) <= 40
    assert cut["response_start"][long].tolist() == [s - removed for s in full["response_start"][long].tolist()]


# --------------------------------------------------------------------------- log-probs


def test_packed_log_probs_equal_two_separate_sequences(tiny_lora, edge_pairs):
    module = perturbed(tiny_dpo(tiny_lora))
    _, batch = one_batch(edge_pairs)
    causal_lm = module._causal_lm()
    with torch.no_grad():
        packed = packed_reply_logps(causal_lm, batch["pair_ids"], batch["pair_segments"], batch["response_start"])
        starts = batch["response_start"]
        unpacked = sequence_reply_logps(
            causal_lm, batch["input_ids"], batch["attention_mask"], torch.cat([starts[:, 0], starts[:, 1]])
        ).chunk(2)
    for got, want in zip(packed, unpacked, strict=True):
        assert (want < -1).all()  # real sums over several tokens, not zeros
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # Each reply alone, unpadded, gives the same sums too (padding changes nothing).
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row : row + 1, :length]
        alone = sequence_reply_logps(causal_lm, ids, torch.ones_like(ids), starts.T.reshape(-1)[row : row + 1])
        pair, side = row % starts.shape[0], row // starts.shape[0]
        torch.testing.assert_close(alone[0], packed[side][pair], rtol=1e-5, atol=1e-4)


def test_reference_log_probs_are_the_sl_models(tiny_lora, edge_pairs):
    from ucai.models import load_causal_lm

    module = perturbed(tiny_dpo(tiny_lora))
    _, batch = one_batch(edge_pairs)
    starts = batch["response_start"]
    sl_model = load_causal_lm(TINY, seed=0).eval()  # loaded on its own: no adapter anywhere
    with torch.no_grad():
        expected = sequence_reply_logps(
            sl_model, batch["input_ids"], batch["attention_mask"], torch.cat([starts[:, 0], starts[:, 1]])
        ).chunk(2)
        policy = module.reply_logps(batch)
    reference = module.reference_logps(batch)
    for got, want, adapted in zip(reference, expected, policy, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert (adapted - want).abs().max() > 0.1  # the adapter does change the policy
    assert module.policy.training  # the reference pass leaves the mode as it found it


# --------------------------------------------------------------------------- training


def fit(module, data, root: Path, max_steps: int, *callbacks, ckpt_path=None, tiny_trainer=None) -> L.Trainer:
    L.seed_everything(0)
    every_step = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = tiny_trainer(root, max_steps, callbacks=[every_step, *callbacks], enable_checkpointing=True)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


@torch.no_grad()
def implicit_margins(module: DPOModule, batch: dict) -> torch.Tensor:
    """(B,) r_chosen − r_rejected of each pair under the module's policy."""
    chosen, rejected = module.reply_logps(batch)
    reference_chosen, reference_rejected = module.reference_logps(batch)
    return module.beta * ((chosen - reference_chosen) - (rejected - reference_rejected))


def test_dpo_learns_the_marker_word_and_logs_trls_metrics(tmp_path, tiny_lora, tiny_trainer):
    # Every chosen reply of the fixture holds "kindly", no rejected one does. Held-out
    # pairs: before training policy = reference (margin exactly 0); after a few steps the
    # policy prefers their chosen replies. A sign error in the loss or the log-ratios
    # would push the margins below zero instead.
    module, data = tiny_dpo(tiny_lora), preference_data()
    data.setup("fit")
    module.configure_model()
    heldout = data.collate(data._encoded["val"])
    assert torch.equal(implicit_margins(module, heldout), torch.zeros(16))

    trainer = fit(module, data, tmp_path, 8, tiny_trainer=tiny_trainer)
    margins = implicit_margins(module, heldout)
    assert margins.mean() > 0.02 and (margins > 0).float().mean() >= 0.6, margins

    metrics = trainer.callback_metrics
    assert {"loss", *METRICS, *(f"val/{m}" for m in ("loss", *METRICS))} <= set(metrics)
    assert metrics["rewards/margins"] > 0 and metrics["loss"] < math.log(2)
    assert metrics["rewards/margins"] == pytest.approx(float(metrics["rewards/chosen"] - metrics["rewards/rejected"]), abs=1e-6)
    logged = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "rewards/accuracies" in logged and "logps/rejected" in logged


class Crash(Exception):
    """Stands for the process dying."""


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise Crash(f"crash at step {trainer.global_step}")


def adapter_weights(module: DPOModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def test_resumed_fit_ends_with_the_weights_of_the_uninterrupted_one(tmp_path, tiny_lora, tiny_trainer):
    # 32 training pairs in batches of 8: 4 steps an epoch, then validation (8 pairs); 5
    # steps cross the epoch, the crash comes after 3. LoRA dropout on: its masks come from
    # the global RNG, which the checkpoint carries.
    lora = dataclasses.replace(tiny_lora, dropout=0.1)

    def module() -> DPOModule:
        return tiny_dpo(lora, disable_dropout=False, lr_schedule="linear", warmup_steps=2)

    def data() -> DPODataModule:
        return preference_data(val_size=8, limit=40)

    full = module()
    fit(full, data(), tmp_path / "full", 5, tiny_trainer=tiny_trainer)
    with pytest.raises(Crash):
        fit(module(), data(), tmp_path / "crashed", 5, CrashAt(3), tiny_trainer=tiny_trainer)
    checkpoint = torch.load(tmp_path / "crashed" / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["state_dict"] and all(".lora_" in key for key in checkpoint["state_dict"])  # no frozen base
    resumed = module()
    last = tmp_path / "crashed" / "ckpt" / "last.ckpt"
    trainer = fit(resumed, data(), tmp_path / "resumed", 5, ckpt_path=str(last), tiny_trainer=tiny_trainer)
    assert trainer.global_step == 5
    expected, got = adapter_weights(full), adapter_weights(resumed)
    assert expected.keys() == got.keys() and any(w.abs().sum() > 0 for n, w in expected.items() if "lora_B" in n)
    for name, weight in expected.items():
        assert torch.equal(got[name], weight), name


# --------------------------------------------------------------------------- through `ucai fit`


class Throttle(Callback):
    """Sleeps before each training batch, so that a kill lands mid-fit (the maths is
    untouched: no random draw, no state)."""

    def __init__(self, seconds: float = 0.25):
        self.seconds = seconds

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        time.sleep(self.seconds)


def fit_args(*extra: str) -> list[str]:
    return ["fit", "--config", str(CONF), f"--data.init_args.path={FIXTURE}", *extra]


def assert_same_model_files(got: Path, want: Path) -> None:
    from safetensors.torch import load_file

    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    a, b = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_kill_9_mid_fit_then_resume_matches_an_uninterrupted_run(tmp_path, run_cli, monkeypatch):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    killed.mkdir(), reference.mkdir()
    throttle = json.dumps({"class_path": "test_dpo.Throttle", "init_args": {"seconds": 0.25}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    process = subprocess.Popen(
        [sys.executable, "-m", "ucai.cli", *fit_args(f"--trainer.callbacks+={throttle}")],
        cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        # The uninterrupted run, in this process, while the other one starts up.
        monkeypatch.chdir(reference)
        assert run_cli(*fit_args()) == 0
        checkpoint = killed / "lightning_logs" / "dpo_tiny" / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 120
        while not checkpoint.exists():
            assert process.poll() is None, "the fit ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        time.sleep(0.05)  # past the write, into the next batch's throttle
        assert process.poll() is None, "the fit ended before the kill"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    exported = Path("lightning_logs/models/tiny/rl_model")
    assert not (killed / exported).exists()  # nothing half-written

    monkeypatch.chdir(killed)
    assert run_cli(*fit_args("--ckpt_path", "last")) == 0
    assert_same_model_files(killed / exported, reference / exported)
    assert json.loads((killed / exported / "ucai_dpo.json").read_text())["steps"] == 6


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "Hi", "chosen": "A", "rejected": ', "invalid JSON"),
        ('{"prompt": "Hi", "chosen": "A"}', "missing field(s) 'chosen' and/or 'rejected'"),
    ],
)
def test_bad_preference_line_is_one_error_naming_file_and_line(tmp_path, run_cli, capsys, monkeypatch, line, message):
    good = FIXTURE.read_text().splitlines()[:4]
    bad = tmp_path / "prefs.jsonl"
    bad.write_text("\n".join([*good[:2], line, *good[2:]]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert run_cli("fit", "--config", CONF, f"--data.init_args.path={bad}") == 2
    error = _one_error_line(capsys.readouterr().err)
    assert f"{bad}:3" in error and message in error
    assert not (tmp_path / "lightning_logs" / "models").exists()
    assert not (tmp_path / "lightning_logs" / "dpo_tiny" / "checkpoints").exists()


def test_missing_sl_model_names_the_sft_stage(tmp_path, run_cli, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "models" / "ethical" / "sl_model"
    assert run_cli(*fit_args(f"--model.init_args.policy={missing}")) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert str(missing) in error and "SFT stage" in error and "sft_ethical.yaml" in error


@pytest.mark.parametrize(
    "option, value", [("model.init_args.beta", "0"), ("model.init_args.label_smoothing", "0.5"), ("data.init_args.batch_size", "0")]
)
def test_bad_setting_fails_while_parsing(tmp_path, run_cli, capsys, monkeypatch, option, value):
    monkeypatch.chdir(tmp_path)
    assert run_cli(*fit_args(f"--{option}={value}")) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert option.split(".")[-1] in error and value in error
