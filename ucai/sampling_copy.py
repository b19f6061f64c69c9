"""A copy of a LoRA policy, its adapter merged, held in another dtype for sampling.

Online RL samples from the policy at every iteration, and on a CPU sampling is bound
by reading the weights: a decode step of SmolLM2 streams ~540 MB in fp32. Sampling
from a bf16 copy with the adapter merged reads half of that, runs no LoRA matmuls, and
lets the fast engine use its native bf16 kernels (8 episodes of 48 tokens, one core of
a CPU with native bf16: 134 tokens/s against 54 from the fp32 LoRA policy; see
docs/performance.md, "Sampling from a bf16 copy of the policy"). The copy is refreshed
from the policy before each rollout; everything that trains (the rollout's log-probs,
the update) stays with the policy.

The copy costs one model in ``dtype`` beside the policy and nothing else: each weight
is cast as it is copied, and no other attribute is duplicated.
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


def _cloned_tree(root: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``root``'s module tree whose floating parameters are ``dtype`` copies
    (tied ones stay tied) and whose adapters' own weights are left out.

    Each module is copied shallowly: its other attributes (config, buffers, the
    gradient-checkpointing function, which may hold the LightningModule itself) are
    shared, not deep-copied, so nothing but the weights is duplicated; the hook
    registries are copied so that a hook added to one model later is not added to the
    other.
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
            if key.endswith("hooks") and isinstance(value, dict):
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

    Raises:
        UcaiError: when an adapted layer's base is not a plain ``nn.Linear`` (a
            quantised base has no weight to merge into).
    """

    def __init__(self, policy: nn.Module, adapter: str, dtype: torch.dtype):
        get_base = getattr(policy, "get_base_model", None)
        source = get_base() if callable(get_base) else policy
        self.adapter = adapter
        self.dtype = dtype
        self._sources = _lora_layers(source)
        for name, layer in self._sources.items():
            if type(layer.get_base_layer()) is not nn.Linear:
                raise UcaiError(
                    f"sampling_precision: {name} is a {type(layer.get_base_layer()).__name__}, not a plain "
                    "linear layer, so no adapter can be merged into a copy of it; set sampling_precision: rollout"
                )
        self.model = _cloned_tree(source, dtype)
        self._targets: dict[str, nn.Linear] = {}
        for name in self._sources:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            plain = getattr(parent, child).get_base_layer()
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
