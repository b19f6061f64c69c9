"""Exported adapters are byte-for-byte reproducible, and an adapter of a peft state dict
folds into its base weights as worked out by hand."""

from __future__ import annotations

import json

import torch

from ucai.stages.lora_io import merge_lora_state, sort_target_modules, with_full_precision_base


def test_target_modules_are_written_sorted(tmp_path):
    # peft writes the list from a set, whose order follows the process's hash seed.
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "o_proj"], "r": 4}))
    sort_target_modules(path)
    assert json.loads(path.read_text()) == {"target_modules": ["o_proj", "q_proj", "v_proj"], "r": 4}
    once = path.read_bytes()
    sort_target_modules(path)
    assert path.read_bytes() == once


def test_merge_lora_state_by_hand():
    # W = [[1, 0], [0, 1]], A = [[1, 2]] (r=1, in=2), B = [[1], [0]] (out=2), scaling 0.5:
    # W + 0.5 · B @ A = [[1 + 0.5, 0 + 1], [0, 1]] = [[1.5, 1], [0, 1]].
    state = {
        "base_model.model.layer.q.base_layer.weight": torch.eye(2),
        "base_model.model.layer.q.lora_A.policy.weight": torch.tensor([[1.0, 2.0]]),
        "base_model.model.layer.q.lora_B.policy.weight": torch.tensor([[1.0], [0.0]]),
        "base_model.model.layer.q.lora_A.value.weight": torch.ones(1, 2),
        "base_model.model.layer.q.lora_B.value.weight": torch.ones(2, 1),
        "base_model.model.norm.weight": torch.ones(2),
    }
    merged = merge_lora_state(state, "policy", {"base_model.model.layer.q": 0.5})
    assert set(merged) == {"layer.q.weight", "norm.weight"}
    assert torch.equal(merged["layer.q.weight"], torch.tensor([[1.5, 1.0], [0.0, 1.0]]))


def test_a_base_weight_held_in_bf16_is_merged_from_its_full_precision_original():
    # 1 + 2^-10 rounds to 1 in bf16 (8 mantissa bits); the merge must start from the original.
    original = torch.tensor([[1.0 + 2**-10]])
    state = {
        "base_model.model.layer.q.base_layer.weight": original.bfloat16(),
        "base_model.model.layer.q.lora_A.policy.weight": torch.ones(1, 1),
        "base_model.model.norm.weight": torch.ones(1),  # same dtype as the original: kept
    }
    restored = with_full_precision_base(state, {"layer.q.weight": original, "norm.weight": torch.zeros(1)})
    assert torch.equal(restored["base_model.model.layer.q.base_layer.weight"], original)
    assert restored["base_model.model.layer.q.lora_A.policy.weight"] is state["base_model.model.layer.q.lora_A.policy.weight"]
    assert torch.equal(restored["base_model.model.norm.weight"], torch.ones(1))
