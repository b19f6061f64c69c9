"""PPO and precision: gradient clipping sees unscaled gradients under a loss-scaling
(``16-mixed``-style) precision, and half-precision weights are refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from ucai.data.prompt_datamodule import PromptDataModule
from ucai.errors import UcaiError
from ucai.models import LoraSettings
from ucai.stages.generation import GenerationSettings
from ucai.stages.ppo import PPOModule


def tiny_module(**overrides) -> PPOModule:
    args = dict(
        policy="tiny-llama",
        reward_model="token:198",
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        ppo_epochs=1,
        minibatch_size=4,
        generation=GenerationSettings(max_new_tokens=4, temperature=1.0, top_p=1.0),
        export=False,
    )
    return PPOModule(**{**args, **overrides})


def trainer_with(root, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs,
    )


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
def test_gradients_are_clipped_after_unscaling(scaled, tmp_path):
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
    trainer = trainer_with(tmp_path, plugins=[plugin], callbacks=[record])
    trainer.fit(tiny_module(max_grad_norm=1e-3), datamodule=PromptDataModule(limit=4, batch_size=4, split="train"))
    assert len(record.norms) == 1  # the step was taken (no inf/NaN skipped it)
    assert record.norms[0] == pytest.approx(1e-3, rel=1e-3)


def test_bf16_true_is_refused_naming_bf16_mixed(tmp_path):
    trainer = trainer_with(tmp_path, precision="bf16-true")
    with pytest.raises(UcaiError, match="bf16-mixed"):
        trainer.fit(tiny_module(), datamodule=PromptDataModule(limit=4, batch_size=4, split="train"))
