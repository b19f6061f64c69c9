"""A copy of a LoRA policy, its adapter merged, held in another dtype for sampling.

Online RL samples from the policy at every iteration, and on a CPU sampling is bound
by reading the weights: a decode step of SmolLM2 streams ~540 MB in fp32. Sampling
from a bf16 copy with the adapter merged reads half of that, runs no LoRA matmuls, and
lets the fast engine use its native bf16 kernels (the experiment's rollouts, one core
of a CPU with native bf16 and AMX: 183 tokens/s against 62 from the fp32 LoRA
policy, `benchmarks/rl_sampling.py`). The copy is refreshed
from the policy before each rollout; everything that trains (the rollout's log-probs,
the update) stays with the policy.

The copy costs one model in ``dtype`` beside the policy (on a CPU the decode engine
packs its projections for its kernels: a second), nothing more: each weight is cast as
it is copied, and no other attribute is duplicated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ucai.errors import UcaiError


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> peft LoRA layer (a module with ``lora_A`` and a base layer)."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and callable(getattr(module, "get_base_layer", None))
    }


def _unmergeable(source: nn.Module, layers: dict[str, nn.Module], adapter: str) -> str | None:
    """Why merging ``adapter`` into a copy of ``source`` would not give its function
    (None: it would)."""
    for name, layer in layers.items():
        base = layer.get_base_layer()
        if type(base) is not nn.Linear:
            return f"{name} is a {type(base).__name__}, not a plain linear layer"
        if getattr(layer, "use_dora", {}).get(adapter):
            return f"{name} uses DoRA (its magnitude vector is not a weight update)"
        if getattr(layer, "lora_bias", {}).get(adapter):
            return f"{name} has a LoRA bias"
    for name, param in source.named_parameters():
        if param.requires_grad and ".lora_" not in name:
            return f"{name} trains outside the adapter (modules_to_save or a trained bias)"
    return None


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied weights)."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (shared if id(param) in seen else seen).add(id(param))
    return shared


def _cloned_tree(root: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``root``'s module tree whose floating parameters are ``dtype`` copies
    (tied ones stay tied) and whose adapters' own weights are left out.

    Each module is copied shallowly: its other attributes (config, buffers, the
    gradient-checkpointing function, which may hold the LightningModule itself) are
    shared, not deep-copied, so nothing but the weights is duplicated; the hook
    registries are copied (the hooks themselves shared).
    """
    casts: dict[int, nn.Parameter | None] = {}

    def cast(param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None:
            return None
        if id(param) not in casts:
            value = param.detach().to(dtype, copy=True) if param.is_floating_point() else param.detach().clone()
            casts[id(param)] = nn.Parameter(value, requires_grad=False)
        return casts[id(param)]

    def clone(module: nn.Module) -> nn.Module:
        new = copy.copy(module)
        for key, value in vars(module).items():
            # Hook registries (and the flags kept beside them, such as which hooks take
            # kwargs) and the names of non-persistent buffers: copied, so that adding
            # or removing one on either model leaves the other as it was.
            if ("hook" in key or key == "_non_persistent_buffers_set") and isinstance(value, (dict, set)):
                setattr(new, key, type(value)(value))
        new._parameters = {name: cast(param) for name, param in module._parameters.items()}
        new._buffers = dict(module._buffers)
        # peft's lora_A / lora_B / lora_dropout / lora_embedding_* children: the merged
        # layer that replaces their parent does not use them.
        new._modules = {
            name: None if child is None or name.startswith("lora_") else clone(child)
            for name, child in module._modules.items()
        }
        return new

    return clone(root)


class SamplingCopy:
    """A plain (adapter-free) copy of ``policy``'s model in ``dtype``, whose adapted
    linear layers hold ``W + scale * B @ A`` of the adapter ``adapter``.

    Args:
        policy: a peft model (or a plain model: then the copy is only a cast).
        adapter: the adapter merged into the copy (the one the policy samples with).
        dtype: the copy's dtype.

    An adapted weight shared with another module (a LoRA-adapted ``lm_head`` tied to
    the embeddings) gets its own copy: the merge is the head's, and the embeddings
    keep the base weight, as in the policy.

    Raises:
        UcaiError: where merging ``W + scale * B @ A`` would not give the policy: an
            adapted layer whose base is not a plain ``nn.Linear`` (a quantised base has
            no weight to merge into), DoRA or a LoRA bias, or a trainable parameter
            outside the adapters (``modules_to_save``, trained biases), which the copy
            would hold at its first value.
    """

    def __init__(self, policy: nn.Module, adapter: str, dtype: torch.dtype):
        get_base = getattr(policy, "get_base_model", None)
        source = get_base() if callable(get_base) else policy
        self.adapter = adapter
        self.dtype = dtype
        self._sources = _lora_layers(source)
        refusal = _unmergeable(source, self._sources, adapter)
        if refusal is not None:
            raise UcaiError(
                f"sampling_precision: {refusal}, so a copy with the adapter merged would not sample as the "
                "policy does; set sampling_precision: rollout"
            )
        self.model = _cloned_tree(source, dtype)
        shared = _shared_weights(self.model)
        self._targets: dict[str, nn.Linear] = {}
        for name in self._sources:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            plain = getattr(parent, child).get_base_layer()
            if id(plain.weight) in shared:
                plain.weight = nn.Parameter(plain.weight.detach().clone(), requires_grad=False)
            setattr(parent, child, plain)
            self._targets[name] = plain
        self.model.eval().requires_grad_(False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Merge the policy's current adapter weights into the copy (before each
        rollout: the update has moved them). The sum is formed in the wider of the
        base's and the adapter's dtypes (fp32 LoRA weights on a bf16-held base: fp32)
        and rounded to ``dtype`` once, also inside a caller's autocast (which would
        compute ``B @ A`` in half precision)."""
        for name, layer in self._sources.items():
            base = layer.get_base_layer().weight
            with torch.autocast(device_type=base.device.type, enabled=False):
                merged = base + layer.get_delta_weight(self.adapter) if self.adapter in layer.lora_A else base
            self._targets[name].weight.copy_(merged)
