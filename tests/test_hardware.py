"""bf16 where it is native, 32-true where it is not: the hardware check, the pipeline's
``bf16_fallback`` and the hint ``ucai fit`` prints."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny_pipeline import CONF, TINY_CONFIGS

import ucai.hardware as hardware
import ucai.pipeline as pipeline
from ucai.errors import UcaiError
from ucai.generation_engine import DecodeLoop, HFGenerate
from ucai.models import load_causal_lm, load_tokenizer
from ucai.stages.generation import GenerationSettings


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_is_native", lambda: request.param)
    return request.param


def test_cpu_check_agrees_with_what_onednn_can_pack():
    """Where the check says bf16 is native, oneDNN packs bf16 weights; where it says
    not, the packing op raises (as on an AVX2-only CPU), so the decode loop must not call it."""
    hardware.cpu_bf16_is_native.cache_clear()
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    if hardware.cpu_bf16_is_native():
        assert torch.ops.mkldnn._reorder_linear_weight(weight, 2).dtype == torch.bfloat16
    else:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._reorder_linear_weight(weight, 2)


def test_only_bf16_settings_fall_back_and_only_without_native_bf16(native):
    expected = None if native else "32-true"
    for precision in ("bf16-mixed", "bf16-true", "bf16"):
        assert hardware.precision_fallback(precision, "cpu") == expected
    for precision in ("32-true", "16-mixed", None, 32):
        assert hardware.precision_fallback(precision, "cpu") is None
    # A Trainer left on "auto" runs on the CPU when there is no GPU.
    if not torch.cuda.is_available():
        assert hardware.precision_fallback("bf16-mixed", "auto") == expected
        assert hardware.stage_device(None) == "cpu"
    assert hardware.stage_device("gpu") == "cuda"


def test_decode_loop_without_packing_stays_identical_to_generate(monkeypatch):
    """On a CPU without native bf16 the loop packs nothing and runs ``F.linear`` on the
    layers' own weights: token-identical to ``generate`` (the packed path is checked the same way on
    CPUs that have it, by tests/test_generation_engine.py)."""
    import ucai.generation_engine as engine

    monkeypatch.setattr(engine, "cpu_bf16_is_native", lambda: False)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=3).eval()
    batch = tokenizer(["Hello there", "How do I bake bread at home?"], return_tensors="pt", padding=True)
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    stop, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    loop = DecodeLoop().generate(model, batch["input_ids"], batch["attention_mask"], settings, stop, pad)
    hf = HFGenerate().generate(model, batch["input_ids"], batch["attention_mask"], settings, stop, pad)
    assert torch.equal(loop, hf)


def _stage_configs(tmp_path, stage_trainer: dict) -> dict:
    """Each stage's tiny test config with ``stage_trainer`` in its trainer section."""
    stages = {}
    for name, config in TINY_CONFIGS.items():
        data = yaml.safe_load((CONF / config).read_text())
        data["trainer"].update(stage_trainer)
        path = tmp_path / config
        path.write_text(yaml.safe_dump(data))
        stages[name] = {"config": str(path)}
    return stages


def _pipeline_config(tmp_path, stage_trainer: dict, **changes):
    data = {
        "output_root": str(tmp_path / "out"),
        "sides": ["ethical"],
        "model": "tiny-llama",
        "stages": _stage_configs(tmp_path, stage_trainer),
    }
    data.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return [run for run in pipeline.plan(pipeline.load_pipeline_config(path)) if run.enabled]


def test_pipeline_runs_bf16_stages_in_32_true_only_where_bf16_is_slow(tmp_path, native):
    runs = _pipeline_config(tmp_path, {"precision": "bf16-mixed", "accelerator": "cpu"})
    for run in runs:
        assert run.bf16_fallback is (not native)
        assert ("--trainer.precision=32-true" in run.args) is (not native)


def test_pipeline_fallback_leaves_fp32_stages_explicit_choices_and_an_opt_out_alone(tmp_path, native):
    assert not any(run.bf16_fallback for run in _pipeline_config(tmp_path, {"precision": "32-true"}))
    # The user's own precision (per stage or common) wins over the fallback.
    stages = _stage_configs(tmp_path, {"precision": "bf16-mixed", "accelerator": "cpu"})
    stages["sft"]["overrides"] = {"trainer.precision": "bf16-mixed"}
    runs = _pipeline_config(tmp_path, {"precision": "bf16-mixed", "accelerator": "cpu"}, stages=stages)
    sft = next(run for run in runs if run.stage == "sft")
    assert "--trainer.precision=bf16-mixed" in sft.args and not sft.bf16_fallback
    runs = _pipeline_config(tmp_path, {"precision": "bf16-mixed", "accelerator": "cpu"}, bf16_fallback=False)
    assert not any(run.bf16_fallback or "--trainer.precision=32-true" in run.args for run in runs)


def test_bad_bf16_fallback_value_is_named(tmp_path):
    with pytest.raises(UcaiError, match="'bf16_fallback' must be true or false, got 'no'"):
        _pipeline_config(tmp_path, {}, bf16_fallback="no")


def test_ucai_fit_says_when_bf16_is_slow_on_this_cpu(native, caplog):
    from ucai.lightning_cli import UcaiCLI

    cli = SimpleNamespace(subcommand="fit", config={"fit": {"trainer": {"precision": "bf16-mixed", "accelerator": "cpu"}}})
    with caplog.at_level(logging.WARNING, logger="ucai"):
        UcaiCLI.before_instantiate_classes(cli)
    hints = [r.getMessage() for r in caplog.records if "without native bfloat16 kernels" in r.getMessage()]
    assert len(hints) == (0 if native else 1)
    if hints:
        assert "--trainer.precision=32-true" in hints[0]


def test_training_attention_picks_the_math_kernel_only_for_short_cpu_training_rows():
    from ucai.hardware import CPU_MATH_ATTENTION_MAX_TOKENS, training_attention

    def flash_on(ids, **kwargs) -> bool:
        with training_attention(ids, **kwargs):
            return torch.backends.cuda.flash_sdp_enabled()

    short, long = torch.zeros(2, CPU_MATH_ATTENTION_MAX_TOKENS, dtype=torch.long), torch.zeros(2, CPU_MATH_ATTENTION_MAX_TOKENS + 1, dtype=torch.long)
    assert torch.backends.cuda.flash_sdp_enabled()
    assert not flash_on(short)
    assert flash_on(long) and flash_on(short, checkpointing=True)
    with torch.no_grad():
        assert flash_on(short)  # a no-grad forward keeps the flash kernel (faster without a backward)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit


def test_the_math_kernel_gives_the_same_padded_forward_and_gradients():
    from ucai.hardware import training_attention
    from ucai.models import load_causal_lm

    model = load_causal_lm("tiny-llama", seed=3).train()
    ids = torch.randint(0, 1000, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 14:] = 0  # right padding
    mask[2, 5:] = 0

    def loss_and_grads(context):
        model.zero_grad()
        with context:
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = (hidden * mask[..., None]).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    import contextlib

    flash_loss, flash_grads = loss_and_grads(contextlib.nullcontext())
    math_loss, math_grads = loss_and_grads(training_attention(ids))
    torch.testing.assert_close(math_loss, flash_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(math_grads, flash_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
