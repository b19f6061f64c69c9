"""Exported adapters are byte-for-byte reproducible."""

from __future__ import annotations

import json

from ucai.stages.lora_io import sort_target_modules


def test_target_modules_are_written_sorted(tmp_path):
    # peft writes the list from a set, whose order follows the process's hash seed.
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "o_proj"], "r": 4}))
    sort_target_modules(path)
    assert json.loads(path.read_text()) == {"target_modules": ["o_proj", "q_proj", "v_proj"], "r": 4}
    once = path.read_bytes()
    sort_target_modules(path)
    assert path.read_bytes() == once
