"""Training stages refuse Lightning's ``-true`` half precisions: they would store the
trainable LoRA weights and heads in half precision, where AdamW loses small updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ucai.errors import UcaiError
from ucai.models import refuse_half_precision_training

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"


class _Attached:
    """The one attribute `trainer_precision` reads: the attached trainer's precision."""

    def __init__(self, precision: str):
        self._trainer = type("Trainer", (), {"precision": precision})()


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_true_precisions_are_refused_with_the_mixed_alternative(precision):
    with pytest.raises(UcaiError) as error:
        refuse_half_precision_training(_Attached(precision), "sft")
    message = str(error.value)
    assert "\n" not in message
    assert precision in message and precision.replace("-true", "-mixed") in message


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_float32_master_weight_precisions_are_accepted(precision):
    refuse_half_precision_training(_Attached(precision), "sft")


def test_why_bf16_weights_cannot_train_with_small_updates():
    """The reason for the refusal, measured: an AdamW step of lr 1e-4 on a weight of 1.0
    moves a float32 weight and leaves a bfloat16 one exactly where it was."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.nn.Parameter(torch.ones(4, dtype=dtype))
        optimizer = torch.optim.AdamW([weight], lr=1e-4, weight_decay=0.0)
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        moved[dtype] = not torch.equal(weight.detach(), torch.ones(4, dtype=dtype))
    assert moved == {torch.float32: True, torch.bfloat16: False}


@pytest.mark.parametrize(
    "config, data, stage",
    [
        ("sft_tiny.yaml", "tests/fixtures/sl_small.jsonl", "sft"),
        ("reward_tiny.yaml", "tests/fixtures/preferences_small.jsonl", "reward"),
    ],
)
def test_training_stages_refuse_bf16_true_before_writing_anything(tmp_path, monkeypatch, run_cli, capsys, config, data, stage):
    monkeypatch.chdir(tmp_path)
    code = run_cli("fit", "--config", CONF / config, f"--data.init_args.path={ROOT / data}",
                   "--trainer.precision=bf16-true", "--trainer.logger=false")
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ucai: error:")]
    assert len(errors) == 1 and f"{stage}: trainer.precision 'bf16-true'" in errors[0] and "bf16-mixed" in errors[0]
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


@pytest.mark.parametrize(
    ("precision", "generation", "scoring"),
    [
        ("bf16-mixed", torch.bfloat16, torch.float32),
        ("16-mixed", torch.float32, torch.float32),
        ("32-true", torch.float32, torch.float32),
        ("bf16-true", torch.bfloat16, torch.bfloat16),
    ],
)
def test_generation_only_models_are_held_in_the_autocast_dtype(precision, generation, scoring):
    """Under bf16-mixed autocast would copy every frozen fp32 weight to bf16 at each
    decoding step; a model that only samples is held in bf16 instead (16-mixed keeps
    fp32: an fp16 residual stream can overflow), while a
    model that scores (judge, categoriser) keeps the precision's own weight dtype."""
    from ucai.models import dtype_from_precision, generation_dtype_from_precision
    from ucai.stages.generation import load_frozen_lm

    assert generation_dtype_from_precision(precision) == generation
    assert dtype_from_precision(precision) == scoring
    attached = _Attached(precision)
    _, sampler = load_frozen_lm(attached, "tiny-llama", generation_only=True)
    _, scorer = load_frozen_lm(attached, "tiny-llama")
    assert {p.dtype for p in sampler.parameters()} == {generation}
    assert {p.dtype for p in scorer.parameters()} == {scoring}


def test_a_self_judging_policy_judges_from_a_full_precision_copy():
    """The judge's A/B probabilities are compared at fine resolution (bf16 logits would
    quantise them), so a bf16-held generator gets an fp32 copy to judge with; an fp32
    generator judges with itself."""
    from ucai.stages.preferences import PreferenceModule

    for precision, shared in (("bf16-mixed", False), ("32-true", True)):
        module = PreferenceModule(model="tiny-llama", labeller="judge", judge_check=False)
        module._trainer = _Attached(precision)._trainer
        module.configure_model()
        assert next(module.judge_lm.parameters()).dtype == torch.float32
        assert (module.judge_lm is module.lm) is shared
