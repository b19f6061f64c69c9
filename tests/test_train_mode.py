"""Trainable models start training in train mode.

``from_pretrained`` returns a model in eval mode and Lightning keeps each module's
mode, so a stage that forgot ``.train()`` would silently run with gradient
checkpointing (which only recomputes in training) and dropout off. The tiny alias is
built from config (train mode already), so the model here is loaded from a folder,
as real models are.
"""

from __future__ import annotations

import pytest

from ucai.models import LoraSettings, load_tokenizer, save_pretrained_atomic
from ucai.stages.ppo import PPOModule
from ucai.stages.reward import RewardModule
from ucai.stages.sft import SFTModule

LORA = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_model):
    folder = save_pretrained_atomic(tmp_path_factory.mktemp("lm") / "sl_model", tiny_model, load_tokenizer("tiny-llama"))
    return str(folder)


def _eval_modules(net) -> list[str]:
    return [name for name, module in net.named_modules() if not module.training]


@pytest.mark.parametrize(
    "build, net",
    [
        (lambda folder: SFTModule(model=folder, lora=LORA, gradient_checkpointing=True), "lm"),
        (lambda folder: RewardModule(model=folder, lora=LORA, output_dir=None, gradient_checkpointing=True), "net"),
        (lambda folder: PPOModule(policy=folder, reward_model="token:198", lora=LORA, gradient_checkpointing=True), "policy"),
    ],
    ids=["sft", "reward", "ppo"],
)
def test_stage_models_loaded_from_a_folder_train_in_train_mode(model_folder, build, net):
    module = build(model_folder)
    module.configure_model()
    model = getattr(module, net)
    assert _eval_modules(model) == []
    inner = model.get_base_model()
    backbone = getattr(inner, inner.base_model_prefix)
    assert backbone.gradient_checkpointing and backbone.training  # so checkpointing really recomputes
