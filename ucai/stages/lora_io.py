"""Exporting a LoRA-trained model: the adapter and the merged Hugging Face model.

    export_lora_model(peft_model, tokenizer, "lightning_logs/models/ethical/sl_model",
                      base_loader=lambda: load_causal_lm("smollm2-135m"))

writes, in one atomic rename (`ucai.models.save_pretrained_atomic`):

    output_dir/                config.json, model.safetensors, tokenizer + chat template
    output_dir/adapter/        adapter_config.json, adapter_model.safetensors (peft)

The merged weights are built on a *fresh* base model (``base_loader``) with the adapter
loaded onto it, never by merging the model that trained: that model may be sharded
(FSDP), quantised to 4 bits (QLoRA, whose merge would be lossy) or still in use after
fit. Passing ``state_dict`` (the trainable weights gathered to this rank, keyed as in
``peft_model.state_dict()``) covers the sharded case.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ucai.models import save_pretrained_atomic

ADAPTER_DIR = "adapter"


def merge_in_float32(peft_model):
    """Fold a peft model's LoRA weights into its base weights, in place, in float32.

    Every floating-point weight is upcast BEFORE merging: adding a small LoRA update
    ``B·A·scale`` to a weight still held in bf16 rounds the sum to bf16's 8 mantissa
    bits, which loses most of an update smaller than the weight's last bit (measured on
    SmolLM2-135M: a reward changed by 0.0023 against a whole LoRA effect of 0.0011;
    upcasting first: 6e-7). Returns the plain model (``merge_and_unload``), float32.
    """
    return peft_model.float().merge_and_unload()


def sort_target_modules(config_path: Path) -> None:
    """peft writes ``target_modules`` from a set, in an order that changes with each
    process's string hash seed; sorted, the same run exports the same bytes."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class _MergedWithAdapter:
    """Looks like a model to `save_pretrained_atomic`: writes merged weights + adapter/."""

    def __init__(self, merged, adapter_dir: Path):
        self.merged = merged
        self.adapter_dir = adapter_dir

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        self.merged.save_pretrained(folder, safe_serialization=True)
        shutil.copytree(self.adapter_dir, Path(folder) / ADAPTER_DIR)


def export_lora_model(
    peft_model,
    tokenizer,
    output_dir: str | Path,
    extra_files: dict | None = None,
    base_loader: Callable[[], torch.nn.Module] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``output_dir/adapter`` and the merged model + tokenizer in ``output_dir``.

    Args:
        peft_model: the `peft.PeftModel` that was trained (may be sharded/quantised
            when ``state_dict`` and ``base_loader`` are given).
        tokenizer: saved beside the merged model (with its chat template).
        output_dir: the folder to (re)write.
        extra_files: small JSON/text files to add (name -> str or JSON-able value).
        base_loader: returns a fresh, unquantised base model to merge into; null merges
            into a CPU copy of ``peft_model`` instead (fine for small unsharded models).
            Either way the merge is done in float32 (`merge_in_float32`).
        state_dict: trainable weights to export instead of ``peft_model``'s own.
    Returns:
        The output folder.
    """
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix=".ucai-adapter-") as tmp:
        adapter_dir = Path(tmp) / ADAPTER_DIR
        peft_model.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
        sort_target_modules(adapter_dir / "adapter_config.json")
        if base_loader is not None:
            base = base_loader()
            merged = merge_in_float32(PeftModel.from_pretrained(base, adapter_dir))
        else:
            import copy

            merged = copy.deepcopy(peft_model).cpu()
            if state_dict is not None:
                merged.load_state_dict({k: v.cpu() for k, v in state_dict.items()}, strict=False)
            merged = merge_in_float32(merged)
        # The merged model is inference-ready: the KV cache back on, no adapter config.
        merged.config.use_cache = True
        return save_pretrained_atomic(output_dir, _MergedWithAdapter(merged, adapter_dir), tokenizer, extra_files)


def export_full_model(model, tokenizer, output_dir: str | Path, extra_files: dict | None = None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a fully fine-tuned (no adapter) model + tokenizer atomically.

    ``state_dict`` (gathered weights) is written instead of ``model``'s own when given.
    """

    class _WithState:
        def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)

    model.config.use_cache = True
    return save_pretrained_atomic(output_dir, _WithState(), tokenizer, extra_files)
