"""Trainable models start training in train mode.

``from_pretrained`` returns a model in eval mode and Lightning keeps each module's
mode, so a stage that forgot ``.train()`` would silently run with gradient
checkpointing (which only recomputes in training) and dropout off. The tiny alias is
built from config (train mode already), so the model here is loaded from a folder,
as real models are.
"""

from __future__ import annotations

import dataclasses

import pytest

from ucai.models import load_tokenizer, save_pretrained_atomic
from ucai.stages.ppo import PPOModule
from ucai.stages.reward import RewardModule
from ucai.stages.sft import SFTModule


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model):
    folder = save_pretrained_atomic(tmp_path_factory.mktemp("lm") / "sl_model", tiny_model, load_tokenizer("tiny-llama"))
    return str(folder)


def _eval_modules(net) -> list[str]:
    return [name for name, module in net.named_modules() if not module.training]


@pytest.mark.parametrize(
    "build, net",
    [
        (lambda folder, lora: SFTModule(model=folder, lora=lora, gradient_checkpointing=True), "lm"),
        (lambda folder, lora: RewardModule(model=folder, lora=lora, output_dir=None, gradient_checkpointing=True), "net"),
        (lambda folder, lora: PPOModule(policy=folder, reward_model="token:198", lora=lora, gradient_checkpointing=True), "policy"),
    ],
    ids=["sft", "reward", "ppo"],
)
def test_stage_models_loaded_from_a_folder_train_in_train_mode(model_folder, build, net, tiny_lora):
    # LoRA dropout on: a module left in eval mode would silently skip it too.
    module = build(model_folder, dataclasses.replace(tiny_lora, dropout=0.1))
    module.configure_model()
    model = getattr(module, net)
    assert _eval_modules(model) == []
    inner = model.get_base_model()
    backbone = getattr(inner, inner.base_model_prefix)
    assert backbone.gradient_checkpointing and backbone.training  # so checkpointing really recomputes
