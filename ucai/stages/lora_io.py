"""Exporting a LoRA-trained model: the adapter and the merged Hugging Face model, and
folding one adapter of a peft state dict into its base weights (PPO's policy export).

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
from torch import nn

from ucai.models import save_pretrained_atomic

ADAPTER_DIR = "adapter"


def merge_in_float32(peft_model):
    """Fold a peft model's LoRA weights into its base weights, in place, in float32.

    Every floating-point weight is upcast BEFORE merging: adding a small LoRA update
    ``B·A·scale`` to a weight still held in bf16 rounds the sum to bf16's 8 mantissa
    bits, which loses most of an update smaller than the weight's last bit, as a small
    LoRA update often is (`tests/test_reward_export.py` checks one). Returns the plain
    model (``merge_and_unload``), float32.
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


# --------------------------------------------------------------------------- merging a peft state dict

PEFT_PREFIX = "base_model.model."
# Wrappers that FSDP, activation checkpointing and torch.compile put into module names.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def lora_scaling(peft_model, adapter: str) -> dict[str, float]:
    """Module name (peft layout, without training wrappers) -> ``alpha / r`` of
    ``adapter``, for every layer that adapter adapts."""
    scaling = {}
    for name, module in peft_model.named_modules():
        table = getattr(module, "scaling", None)
        if isinstance(table, dict) and adapter in table:
            for wrapper in _WRAPPER_NAMES:
                name = name.replace(wrapper, "")
            scaling[name] = table[adapter]
    return scaling


def merge_lora_state(state: dict[str, torch.Tensor], adapter: str, scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold one LoRA adapter into the base weights of a peft state dict.

    ``W' = W + scaling · B @ A`` for every adapted linear layer; the keys come back in
    the plain transformers layout (``base_model.model.`` and ``.base_layer`` removed,
    every other adapter's weights dropped), ready for ``load_state_dict`` on a fresh
    base model. Working on a state dict rather than the live model means the same code
    serves sharded (FSDP, gathered to rank 0) and unsharded training.

    Args:
        state: peft ``state_dict()`` (full, not sharded).
        adapter: name of the adapter to merge.
        scaling: module name (peft layout, without ``.base_layer``) -> alpha / r.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if ".base_layer." in key:
            module = key.split(".base_layer.")[0]
            if key.endswith(".base_layer.weight") and f"{module}.lora_A.{adapter}.weight" in state:
                a = state[f"{module}.lora_A.{adapter}.weight"].float()  # (r, in)
                b = state[f"{module}.lora_B.{adapter}.weight"].float()  # (out, r)
                value = (value.float() + scaling[module] * (b @ a)).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        merged[name] = value
    return merged


def with_full_precision_base(state: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (peft layout) with every base weight held in lower precision than the
    freshly loaded ``base_state`` (transformers layout) replaced by that original, so
    that merging the adapter does not bake bf16 rounding into the exported model."""
    restored = {}
    for key, value in state.items():
        original = base_state.get(key.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."))
        if ".lora_" not in key and original is not None and original.shape == value.shape and original.dtype != value.dtype:
            value = original
        restored[key] = value
    return restored


def untie_if_adapted(model, merged_state: dict[str, torch.Tensor]) -> None:
    """Give the output head its own weights when the adapter changed it but the model
    ties it to the input embeddings (LoRA on ``lm_head``); otherwise loading the merged
    state would write both into one shared tensor and lose one of them."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None or output.weight is not inputs.weight:
        return
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is output.weight}
    values = [merged_state[n] for n in names if n in merged_state]
    if len(values) > 1 and not all(torch.equal(values[0], v) for v in values[1:]):
        output.weight = nn.Parameter(output.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text_config = model.config.get_text_config()
        if text_config is not model.config:
            text_config.tie_word_embeddings = False


def load_merged(
    model,
    state: dict[str, torch.Tensor],
    adapter: str,
    scaling: dict[str, float],
    full_precision_base: bool = False,
):
    """``model`` (a freshly loaded base) with ``adapter`` of the peft ``state`` folded in.

    Args:
        model: the base model, loaded in the dtype the export should have.
        state: the trained model's full peft state dict.
        adapter: the adapter to merge (others are dropped).
        scaling: from `lora_scaling`.
        full_precision_base: the trained base weights were held in lower precision
            than ``model``'s (bf16 frozen linears): merge into ``model``'s originals.
    Returns:
        ``model``, loaded with the merged weights.
    """
    if full_precision_base:
        state = with_full_precision_base(state, model.state_dict())
    merged = merge_lora_state(state, adapter, scaling)
    untie_if_adapted(model, merged)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"merged model does not match the base model: missing {missing}, unexpected {unexpected}")
    return model
