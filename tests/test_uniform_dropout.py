"""LoRA's input dropout drawn from float32 uniforms (`ucai.uniform_dropout`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ucai.models import LoraSettings, disable_dropout
from ucai.uniform_dropout import UniformDropout, use_uniform_dropout


def test_keeps_one_minus_p_scaled_and_backpropagates_through_the_mask():
    torch.manual_seed(0)
    dropout = UniformDropout(0.05).train()
    x = torch.ones(1_000_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    # Kept with probability 0.95: sd of the fraction sqrt(0.95 * 0.05 / 1e6) = 2.2e-4.
    assert abs(kept.float().mean().item() - 0.95) < 1.1e-3
    # Kept elements scaled by 1 / (1 - p), exactly the float32 of that scale.
    assert torch.equal(y[kept], torch.full_like(y[kept], torch.tensor(1 / 0.95, dtype=torch.float32).item()))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # dy/dx is the scaled mask (x is ones)
    # Two draws differ (the mask is random), and eval mode or p = 0 passes x through.
    assert not torch.equal(dropout(x), dropout(x))
    assert dropout.eval()(x) is x
    assert UniformDropout(0.0).train()(x) is x


def test_inplace_dropout_writes_into_its_input():
    x = torch.ones(4096)
    y = UniformDropout(0.5, inplace=True).train()(x)
    assert y is x and set(x.unique().tolist()) == {0.0, 2.0}
    z = torch.ones(4096)
    assert UniformDropout(0.5).train()(z) is not z and bool((z == 1).all())


def test_bf16_input_keeps_its_dtype():
    y = UniformDropout(0.5).train()(torch.ones(4096, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_training_stages_put_it_in_front_of_every_adapter(stage):
    """SFT, the reward model and DPO (with its dropout left on) train with LoRA dropout;
    every adapter's dropout is a UniformDropout of the configured p, and
    ``disable_dropout`` still reaches it."""
    lora = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    if stage == "sft":
        from ucai.stages.sft import SFTModule

        module = SFTModule(model="tiny-llama", lora=lora)
        module.configure_model()
        net = module.lm
    elif stage == "dpo":
        from ucai.stages.dpo import DPOModule

        module = DPOModule(policy="tiny-llama", lora=lora, disable_dropout=False, export=False)
        module.configure_model()
        net = module.policy
    else:
        from ucai.stages.reward import RewardModule

        module = RewardModule(model="tiny-llama", lora=lora, seed=0)
        module.configure_model()
        net = module.net
    dropouts = [d for m in net.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict) for d in m.lora_dropout.values()]
    layers = net.config.num_hidden_layers
    assert len(dropouts) == 4 * layers
    assert all(type(d) is UniformDropout and d.p == 0.1 and d.training for d in dropouts)
    assert disable_dropout(net) >= 4 * layers and all(d.p == 0.0 for d in dropouts)


def test_replaces_only_plain_dropout():
    class Adapted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_dropout = nn.ModuleDict({"a": nn.Dropout(0.2), "b": nn.Identity(), "c": UniformDropout(0.3)})
            self.other = nn.Dropout(0.5)  # not an adapter's: left alone

    model = Adapted().eval()
    assert use_uniform_dropout(model) == 1
    assert type(model.lora_dropout["a"]) is UniformDropout and model.lora_dropout["a"].p == 0.2
    assert not model.lora_dropout["a"].training  # the replaced module's mode is kept
    assert type(model.lora_dropout["b"]) is nn.Identity and type(model.other) is nn.Dropout
