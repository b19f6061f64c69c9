"""PPO and precision: gradient clipping sees unscaled gradients under a loss-scaling
(``16-mixed``-style) precision and is off at ``max_grad_norm: 0``, and half-precision
weights are refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from ucai.data.prompt_datamodule import PromptDataModule
from ucai.errors import UcaiError


class GradNormAtStep(L.Callback):
    """Records the total gradient norm the optimiser stepped with (a step post-hook: under
    plain precision the closure, and with it clipping, runs inside ``step`` itself)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_start(self, trainer, module):
        def record(optimizer, args, kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        trainer.optimizers[0].register_step_post_hook(record)


@pytest.mark.parametrize("scaled", [False, True], ids=["32-true", "loss-scaled"])
def test_gradients_are_clipped_after_unscaling(scaled, tmp_path, tiny_ppo, tiny_trainer):
    # The real MixedPrecision plugin with a GradScaler (16-mixed without CUDA): the loss
    # is multiplied by 1024 before backward and the gradients divided by 1024 inside
    # optimizer.step(). Clipping to 1e-3 before that division would leave a norm of
    # 1e-3 / 1024 at the step; clipping after it leaves exactly 1e-3. The first
    # rollout's gradient norm is far above 1e-3, so clipping is always active.
    plugin = (
        MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
        if scaled
        else Precision()
    )
    record = GradNormAtStep()
    trainer = tiny_trainer(tmp_path, 1, logger=False, plugins=[plugin], callbacks=[record])
    trainer.fit(tiny_ppo(max_grad_norm=1e-3), datamodule=PromptDataModule(limit=4, batch_size=4, split="train"))
    assert len(record.norms) == 1  # the step was taken (no inf/NaN skipped it)
    assert record.norms[0] == pytest.approx(1e-3, rel=1e-3)


def test_max_grad_norm_zero_switches_clipping_off(tmp_path, tiny_ppo, tiny_trainer, monkeypatch):
    # max_grad_norm: 0 is "off": no clipping call at all, and the step is taken with the
    # first rollout's raw gradient, whose norm is far above the 1e-3 clipped to above.
    module = tiny_ppo(max_grad_norm=0.0)
    clip_calls = []
    monkeypatch.setattr(module, "clip_gradients", lambda *args, **kwargs: clip_calls.append(kwargs))
    record = GradNormAtStep()
    trainer = tiny_trainer(tmp_path, 1, logger=False, callbacks=[record])
    trainer.fit(module, datamodule=PromptDataModule(limit=4, batch_size=4, split="train"))
    assert clip_calls == [] and len(record.norms) == 1
    assert record.norms[0] > 1e-2, record.norms


def test_bf16_true_is_refused_naming_bf16_mixed(tmp_path, tiny_ppo, tiny_trainer):
    trainer = tiny_trainer(tmp_path, 1, logger=False, precision="bf16-true")
    with pytest.raises(UcaiError, match="bf16-mixed"):
        trainer.fit(tiny_ppo(), datamodule=PromptDataModule(limit=4, batch_size=4, split="train"))


class RecordStats(L.Callback):
    def __init__(self):
        self.stats: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.stats.append({k: v for k, v in module.last_stats.items() if not k.startswith("perf/")})  # not timings


def reward_folder(tmp_path) -> str:
    import json

    from ucai.models import load_sequence_classifier, load_tokenizer

    folder = tmp_path / "rm_model"
    rm = load_sequence_classifier("tiny-llama", seed=3)
    tokenizer = load_tokenizer("tiny-llama", padding_side="right")
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return str(folder)


def test_frozen_weights_in_bf16_change_nothing_under_bf16_mixed(tmp_path, tiny_ppo, tiny_trainer):
    # Autocast rounds the weights of every matmul to bf16 anyway, so holding the frozen
    # linears (policy base, reward model) in bf16 must leave two PPO updates, with
    # generation, both adapters and the reward model, bit for bit as they were, and the
    # export must merge into the base at full precision, not its bf16 rounding.
    from safetensors.torch import load_file

    rm = reward_folder(tmp_path)
    runs = {}
    for cast in (False, True):
        L.seed_everything(0)
        module = tiny_ppo(reward_model=rm, value_head="adapter", frozen_linear_bf16=cast, export=True,
                             output_dir=str(tmp_path / f"rl_{cast}"))
        record = RecordStats()
        trainer = tiny_trainer(tmp_path, 2, logger=False, precision="bf16-mixed", callbacks=[record])
        trainer.fit(module, datamodule=PromptDataModule(limit=8, batch_size=4, split="train"))
        runs[cast] = (module, record.stats)
    module, stats = runs[True]
    base = module.policy.get_base_model()
    attention = base.model.layers[0].self_attn
    assert attention.q_proj.base_layer.weight.dtype == torch.bfloat16  # adapted: its frozen base
    assert attention.k_proj.weight.dtype == torch.bfloat16  # not adapted
    assert attention.q_proj.lora_A["policy"].weight.dtype == torch.float32  # trained: untouched
    assert base.get_input_embeddings().weight.dtype == torch.float32  # tied to lm_head: untouched
    assert module.value_head.weight.dtype == torch.float32
    assert module._reward[0].model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert runs[False][0].policy.get_base_model().model.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    assert len(stats) == 2 and stats == runs[False][1]
    exported = {cast: load_file(tmp_path / f"rl_{cast}" / "model.safetensors") for cast in (False, True)}
    assert exported[True].keys() == exported[False].keys()
    for name, tensor in exported[False].items():
        assert tensor.dtype == torch.float32 and torch.equal(exported[True][name], tensor), name
