"""The sampling copy of a LoRA policy (`ucai.sampling_copy`) and PPO/RLOO sampling from
it (``sampling_precision: bf16``): the copy is the merged policy in its dtype, follows
the adapter after refresh, shares nothing trainable with the policy and leaves it as
it was; the stage samples from the copy while its log-probs stay the policy's."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import get_peft_model

import ucai.stages.ppo
import ucai.stages.ppo_rollout
from ucai.data.prompt_datamodule import PromptDataModule
from ucai.errors import UcaiError
from ucai.sampling_copy import SamplingCopy
from ucai.stages.ppo_rollout import POLICY_ADAPTER

IDS = torch.tensor([[5, 17, 300, 42, 7, 99, 1000, 3]])


def prompts(limit: int, batch_size: int) -> PromptDataModule:
    return PromptDataModule(limit=limit, batch_size=batch_size, split="train")


def _policy(tiny_model, tiny_lora, adapter=POLICY_ADAPTER):
    lora = dataclasses.replace(tiny_lora, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    policy = get_peft_model(copy.deepcopy(tiny_model), lora.to_peft("CAUSAL_LM"), adapter_name=adapter)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # peft starts B at 0, where merging would change nothing
    return policy


def _merged(policy, dtype) -> torch.nn.Module:
    """peft's own merge in full precision, its parameters then rounded to ``dtype``
    (buffers such as the rotary frequencies stay float32, as in a model loaded in bf16)."""
    merged = copy.deepcopy(policy).merge_and_unload().eval()
    for param in merged.parameters():
        param.data = param.data.to(dtype)
    return merged


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_the_copy_is_the_merged_policy_in_its_dtype(tiny_model, tiny_lora):
    policy = _policy(tiny_model, tiny_lora)
    before = {name: (p.dtype, p.data_ptr(), p.detach().clone()) for name, p in policy.named_parameters()}

    copy32 = SamplingCopy(policy, POLICY_ADAPTER, torch.float32)
    # fp32: the same function up to the order of float sums (W x + B A x against (W + BA) x).
    torch.testing.assert_close(_logits(copy32.model), _logits(policy), rtol=1e-5, atol=1e-5)

    copy16 = SamplingCopy(policy, POLICY_ADAPTER, torch.bfloat16)
    assert {p.dtype for p in copy16.model.parameters()} == {torch.bfloat16}
    # bf16: exactly peft's own merge in fp32 rounded to bf16 once.
    assert torch.equal(_logits(copy16.model), _logits(_merged(policy, torch.bfloat16)))
    assert not torch.equal(_logits(copy16.model), _logits(copy32.model))  # it is bf16, not a view of fp32

    # Plain modules only: no adapter layer, nothing that trains, a head still tied to the embedding.
    assert not any("lora" in name for name, _ in copy16.model.named_parameters())
    assert not any(p.requires_grad for p in copy16.model.parameters())
    assert copy16.model.lm_head.weight is copy16.model.model.embed_tokens.weight
    # Nothing but the weights is duplicated: buffers, the config and whatever else a
    # module holds (a checkpointing function may hold the LightningModule) are shared.
    source = policy.get_base_model()
    assert copy16.model.model.rotary_emb.inv_freq is source.model.rotary_emb.inv_freq
    assert copy16.model.config is source.config
    assert copy16.model.model is not source.model and copy16.model.model.layers[0] is not source.model.layers[0]
    # The policy is untouched: its tensors, dtypes and values, adapters and trainability.
    for name, param in policy.named_parameters():
        dtype, pointer, value = before[name]
        assert (param.dtype, param.data_ptr()) == (dtype, pointer) and torch.equal(param, value), name
    assert any(p.requires_grad for p in policy.parameters())


def test_refresh_follows_the_adapter_and_merges_only_the_policys(tiny_model, tiny_lora):
    policy = _policy(tiny_model, tiny_lora)
    policy.add_adapter("value", dataclasses.replace(tiny_lora, target_modules=["q_proj", "v_proj"]).to_peft("CAUSAL_LM"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B.value" in name:
                param.normal_(0.0, 0.5)  # a critic adapter that would show if it were merged
    policy.set_adapter(POLICY_ADAPTER)
    sampler = SamplingCopy(policy, POLICY_ADAPTER, torch.float32)
    torch.testing.assert_close(_logits(sampler.model), _logits(policy), rtol=1e-5, atol=1e-5)

    with torch.no_grad():  # an optimiser step on the policy's adapter
        for name, param in policy.named_parameters():
            if f"lora_A.{POLICY_ADAPTER}" in name:
                param.add_(0.1)
    stale = _logits(sampler.model)
    assert (stale - _logits(policy)).abs().max() > 1e-3  # the copy does not follow by itself
    sampling = _logits(policy)
    policy.set_adapter("value")  # the critic's turn (PPO's value pass) when the copy refreshes
    sampler.refresh()
    torch.testing.assert_close(_logits(sampler.model), sampling, rtol=1e-5, atol=1e-5)
    policy.set_adapter(POLICY_ADAPTER)

    # Inside a caller's autocast (PPO's rollouts under the trainer's precision) the merge
    # is still formed in full precision: B @ A in bf16 would round it differently.
    bf16_copy = SamplingCopy(policy, POLICY_ADAPTER, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_copy.refresh()
    assert torch.equal(_logits(bf16_copy.model), _logits(_merged(policy, torch.bfloat16)))


def test_an_adapted_head_tied_to_the_embeddings_is_untied_in_the_copy(tiny_model, tiny_lora):
    # The policy's embeddings keep the base weight while its head adds the update;
    # merged into one tied tensor, the update would reach the embeddings too.
    lora = dataclasses.replace(tiny_lora, target_modules=["q_proj", "v_proj", "lm_head"])
    policy = get_peft_model(copy.deepcopy(tiny_model), lora.to_peft("CAUSAL_LM"), adapter_name=POLICY_ADAPTER)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    sampler = SamplingCopy(policy, POLICY_ADAPTER, torch.float32)
    torch.testing.assert_close(_logits(sampler.model), _logits(policy), rtol=1e-5, atol=1e-5)
    source = policy.get_base_model()
    assert torch.equal(sampler.model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert sampler.model.lm_head.weight is not sampler.model.model.embed_tokens.weight


def _refusal(policy) -> str:
    with pytest.raises(UcaiError) as caught:
        SamplingCopy(policy, POLICY_ADAPTER, torch.bfloat16)
    return str(caught.value)


def test_what_a_merged_copy_cannot_sample_as_is_refused(tiny_model, tiny_lora):
    from peft import LoraConfig

    def policy_with(**options):
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **options)
        return get_peft_model(copy.deepcopy(tiny_model), config, adapter_name=POLICY_ADAPTER)

    embedding = dataclasses.replace(tiny_lora, target_modules=["q_proj", "embed_tokens"]).to_peft("CAUSAL_LM")
    message = _refusal(get_peft_model(copy.deepcopy(tiny_model), embedding, adapter_name=POLICY_ADAPTER))
    assert "embed_tokens is a Embedding, not a plain linear layer" in message
    assert message.endswith("set sampling_precision: rollout")
    assert "uses DoRA" in _refusal(policy_with(use_dora=True))
    assert "has a LoRA bias" in _refusal(policy_with(lora_bias=True))
    assert "o_proj.modules_to_save.policy.weight trains outside the adapter" in _refusal(policy_with(modules_to_save=["o_proj"]))


def test_hooks_added_to_either_model_stay_with_it(tiny_model, tiny_lora):
    policy = _policy(tiny_model, tiny_lora)
    source = policy.get_base_model()
    seen = []
    handle = source.model.norm.register_forward_hook(lambda module, args, kwargs, out: seen.append(1), with_kwargs=True)
    sampler = SamplingCopy(policy, POLICY_ADAPTER, torch.bfloat16)
    handle.remove()  # removed from the policy only: the copy keeps the hook it was built with
    _logits(sampler.model)
    assert seen == [1]
    sampler.model.model.norm.register_forward_hook(lambda *args: seen.append(2))
    _logits(policy)
    assert seen == [1]  # the copy's new hook did not reach the policy


def test_rloo_samples_from_the_bf16_copy_and_keeps_the_policys_log_probs(tmp_path, tiny_ppo, tiny_trainer, monkeypatch):
    module = tiny_ppo(advantage="rloo", rloo_k=2, rollout_precision="fp32", frozen_linear_bf16=False, sampling_precision="bf16")
    monkeypatch.setattr(ucai.stages.ppo_rollout, "bf16_is_native", lambda device_type: True)  # on any CPU
    sampled_from, checked = [], {}
    generate = ucai.stages.ppo_rollout.generate

    def recorded(model, *args, **kwargs):
        sampled_from.append((model is module.policy, {p.dtype for p in model.parameters()}))
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(ucai.stages.ppo_rollout, "generate", recorded)
    rollout = module.rollout

    def rollout_then_compare(rows, **kwargs):
        result = rollout(rows, **kwargs)
        with torch.autocast("cpu", enabled=False):
            fp32, _, _ = module.rollout_forward(result.sequences, result.attention_mask, result.prompt_length)
        checked.setdefault("logprobs", []).append(((result.logprobs - fp32) * result.mask).abs().max())
        checked.setdefault("engine", []).append(((result.engine_logprobs - fp32) * result.mask).abs().max())
        # The copy sampled with the adapter as it is now (refreshed after the last update).
        with torch.autocast("cpu", enabled=False):  # (the wrapper runs inside the trainer's autocast)
            merged = _logits(_merged(module.policy, torch.bfloat16))
            current = torch.equal(_logits(module._sampler.model), merged)
        checked.setdefault("merged", []).append(merged)
        checked.setdefault("copy_is_current", []).append(current)
        with torch.no_grad():  # an update the next rollout's copy must hold (the tiny
            # reward gives these episodes no advantage, so the real update moves nothing)
            for name, param in module.policy.named_parameters():
                if "lora_B" in name:
                    param.add_(0.05)
        return result

    monkeypatch.setattr(module, "rollout", rollout_then_compare)
    trainer = tiny_trainer(tmp_path, 2, logger=False, precision="bf16-mixed")
    trainer.fit(module, datamodule=prompts(limit=4, batch_size=2))

    assert sampled_from == [(False, {torch.bfloat16})] * 2  # every rollout, from the copy
    assert all(d < 1e-6 for d in checked["logprobs"]), checked  # old log-probs: the fp32 policy's
    assert all(d > 1e-3 for d in checked["engine"]), checked  # the sampling distribution: bf16's
    # At each rollout the copy held the adapter as it was then: refreshed, not built once.
    assert checked["copy_is_current"] == [True, True]
    assert not torch.equal(*checked["merged"])  # the adapter did move between the rollouts


def test_without_native_bf16_it_samples_from_the_policy_and_says_so(tmp_path, tiny_ppo, tiny_trainer, monkeypatch, collect):
    module = tiny_ppo(advantage="rloo", rloo_k=2, rollout_precision="fp32", frozen_linear_bf16=False, sampling_precision="bf16")
    monkeypatch.setattr(ucai.stages.ppo_rollout, "bf16_is_native", lambda device_type: False)
    sampled_from = []
    generate = ucai.stages.ppo_rollout.generate

    def recorded(model, *args, **kwargs):
        sampled_from.append(model is module.policy)
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(ucai.stages.ppo_rollout, "generate", recorded)
    logged = collect("ucai.stages.ppo_rollout")
    tiny_trainer(tmp_path, 2, logger=False).fit(module, datamodule=prompts(limit=4, batch_size=2))
    assert sampled_from == [True, True] and module._sampler is None
    warnings = [m for m in logged.messages if "sampling_precision: bf16 has no native bf16" in m]
    assert len(warnings) == 1, logged.messages  # once, not at every rollout


def test_sampling_from_a_copy_is_refused_under_fsdp(tiny_ppo, monkeypatch):
    module = tiny_ppo(sampling_precision="bf16", rollout_precision="trainer")
    monkeypatch.setattr(ucai.stages.ppo, "sharded_by_fsdp", lambda trainer: True)
    monkeypatch.setattr(ucai.stages.ppo, "trainer_precision", lambda module: "bf16-mixed")
    with pytest.raises(UcaiError, match="sampling_precision: bf16 needs the whole weights.*FSDP shards"):
        module._refuse_rollout_precisions_fsdp_cannot_run()

