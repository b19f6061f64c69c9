"""Gradient checkpointing changes memory, never gradients: the PPO minibatch gradients
(policy LoRA, value LoRA, value head) with ``gradient_checkpointing: true`` equal those
without, for both value-head modes, on the tiny model in float32; so do adapter mode's
policy and value terms backpropagated one after the other."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ucai.stages.generation import GenerationSettings
from ucai.stages.ppo import PPOModule, Rollout


@pytest.fixture
def configured(tiny_ppo, tiny_lora):
    """``configured(value_head, checkpointing)``: a built tiny PPO module whose LoRA also
    adapts an MLP projection, with no clipping (every token carries gradient)."""

    def build(value_head: str, checkpointing: bool) -> PPOModule:
        module = tiny_ppo(
            lora=dataclasses.replace(tiny_lora, target_modules=["q_proj", "v_proj", "up_proj"]),
            value_head=value_head,
            minibatch_size=3,
            cliprange=10.0,
            cliprange_value=10.0,
            entropy_coef=0.01,
            generation=GenerationSettings(max_new_tokens=4, temperature=0.7, top_p=1.0),
            gradient_checkpointing=checkpointing,
        )
        module.configure_model()
        return module

    return build


def perturb(module: PPOModule) -> None:
    """LoRA B and the value head start at zero, where no gradient reaches LoRA A or the
    value backbone; give every trainable tensor weights so all gradients are non-zero."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module._trainable:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def rollout_for(module: PPOModule) -> Rollout:
    """Three episodes of 7 prompt and 5 response tokens (the last row ends early), with
    the module's own log-probs and values and random advantages and returns."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (3, 12), generator=generator)
    attention = torch.ones_like(ids)
    attention[2, -2:] = 0
    mask = attention[:, 7:].float()
    logprobs, ref_logprobs, values = module.rollout_forward(ids, attention, 7)
    advantages = torch.randn(3, 5, generator=generator) * mask
    returns = (values + torch.randn(3, 5, generator=generator)) * mask
    zeros = torch.zeros(3)
    return Rollout(
        sequences=ids, attention_mask=attention, prompt_length=7, mask=mask, logprobs=logprobs,
        ref_logprobs=ref_logprobs, values=values * mask, kl=torch.zeros_like(mask), scores=zeros,
        final_scores=zeros, rewards=torch.zeros_like(mask), advantages=advantages, returns=returns,
        finished=torch.ones(3, dtype=torch.bool), prompts=["p"] * 3, responses=["r"] * 3, seconds=0.0,
    )


def minibatch_gradients(module: PPOModule, rollout: Rollout) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss, _ = module.minibatch_loss(rollout, torch.arange(rollout.size))
    loss.backward()
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("value_head", ["head", "adapter"])
def test_checkpointing_leaves_gradients_unchanged(value_head, configured):
    plain = configured(value_head, checkpointing=False)
    perturb(plain)
    checkpointed = configured(value_head, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.policy.training and checkpointed._causal_lm().is_activation_checkpointing
    rollout = rollout_for(plain)

    expected = minibatch_gradients(plain, rollout)
    got = minibatch_gradients(checkpointed, rollout)

    assert set(got) == set(expected)
    groups = {"policy LoRA": ".policy.", "value head": "value_head."}
    if value_head == "adapter":
        groups["value LoRA"] = ".value."
    for group, marker in groups.items():
        names = [n for n in expected if marker in n]
        assert names, group
        # Not vacuous: the group has gradient.
        assert any(expected[n].abs().max() > 0 for n in names), group
        for name in names:
            assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), (
                group, name, (got[name] - expected[name]).abs().max(), expected[name].abs().max()
            )


@pytest.mark.parametrize("value_head, backward_calls", [("head", 1), ("adapter", 2)])
def test_split_backward_gives_the_gradients_of_the_summed_loss(value_head, backward_calls, configured):
    # In adapter mode the policy term is backpropagated before the value pass runs (one
    # pass's activations alive at a time); the two terms share no trainable parameter,
    # so every gradient must equal that of the summed loss bit for bit.
    module = configured(value_head, checkpointing=False)
    perturb(module)
    rollout = rollout_for(module)
    expected = minibatch_gradients(module, rollout)
    module.zero_grad(set_to_none=True)
    losses = []

    def backward(loss):
        losses.append(float(loss.detach()))
        loss.backward()

    stats = module.minibatch_backward(rollout, torch.arange(rollout.size), backward=backward)
    got = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    assert len(losses) == backward_calls
    assert got.keys() == expected.keys() and any(".value." in n for n in got) == (value_head == "adapter")
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name
    _, summed = module.minibatch_loss(rollout, torch.arange(rollout.size))
    assert {k: float(v) for k, v in stats.items()} == {k: float(v) for k, v in summed.items()}


@pytest.mark.parametrize("value_head", ["head", "adapter"])
def test_under_ddp_one_backward_of_the_summed_loss_weighted_by_the_ranks_token_share(value_head, configured, monkeypatch):
    # Each rank's loss is its own token mean; DDP averages ranks equally, so the loss is
    # scaled by this rank's share of the minibatch's response tokens across ranks
    # (`share_of_global_mean`, which tests/test_ddp.py checks with two real processes).
    # Here the world is faked: the wiring must pass the minibatch's token count (not the
    # rollout's, not the episode count) and backpropagate the summed loss once, scaled,
    # in adapter mode too (DDP's reducer wants every parameter in one backward).
    import types

    import ucai.stages.ppo_update as ppo_update

    module = configured(value_head, checkpointing=False)
    perturb(module)
    rollout = rollout_for(module)
    counts = []

    def share(count, device):
        counts.append(float(count))
        return 0.25

    monkeypatch.setattr(ppo_update, "share_of_global_mean", share)
    module._trainer = types.SimpleNamespace(world_size=2)
    idx = torch.tensor([0, 2])  # row 2 ends early: 5 + 3 response tokens
    losses = []
    module.minibatch_backward(rollout, idx, backward=lambda loss: losses.append(float(loss.detach())))
    module._trainer = None
    summed, _ = module.minibatch_loss(rollout, idx)
    assert counts == [8.0]
    assert losses == [pytest.approx(0.25 * float(summed.detach()), rel=1e-6)]
