"""What this machine computes natively: bfloat16 matmuls, or not.

bf16 is ucai's default precision (``bf16-mixed`` in the shipped stage configs) because
it is the fast choice on a recent GPU and on a CPU whose oneDNN has bf16 kernels
(AVX-512 or AMX). On a CPU without them (AVX2 only, common on laptops and on many AMD
servers) torch falls back to a reference path several times slower than fp32 (the
README gives the measurement), and oneDNN's packed-weight path refuses bf16 altogether.

`bf16_is_native` answers the question; `precision_fallback` is the one place that
turns a configured bf16 precision into ``32-true`` where bf16 is slow (used by the
pipeline's ``bf16_fallback``), and `bf16_warning` is the sentence ``ucai fit`` prints
when a user runs bf16 on such a CPU by hand.
"""

from __future__ import annotations

import contextlib
import functools

import torch

BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
# Up to this many tokens a row, a CPU training forward uses SDPA's math kernel: its
# backward is a few matmuls, while the CPU flash kernel's backward with a padding mask
# costs ~16 ms a layer at 90 tokens. Measured on SmolLM2-135M with LoRA, 8 rows, bf16
# autocast, one core (forward + backward): math 1.95 s vs flash 2.31 s at 90 tokens,
# 4.76 vs 5.32 at 200; flash wins beyond (15.2 vs 11.2 s at 400), and math holds a
# (B, heads, L, L) matrix per layer for backward.
CPU_MATH_ATTENTION_MAX_TOKENS = 200
FALLBACK_PRECISION = "32-true"


@functools.cache
def cpu_bf16_is_native() -> bool:
    """Whether torch's CPU matmuls have bf16 kernels here (oneDNN's own check: AVX-512
    BW/VL/DQ, AVX-512-BF16, AMX or AVX-NE-CONVERT)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:  # an old torch: ask for the instruction sets directly
        return bool(torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.backends.mkldnn.is_available()) and bool(check())


def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 matmuls run natively on ``device_type`` ('cpu' or 'cuda')."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_bf16_is_native()
    return True  # mps, xla, ...: trust the configured precision


def stage_device(accelerator: str | None) -> str:
    """The device type a Trainer with ``accelerator`` runs on ('auto': a GPU if any)."""
    value = str(accelerator or "auto")
    if value in ("cpu", "cuda", "mps"):
        return value
    if value == "gpu" or (value == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def precision_fallback(precision: str | int | None, accelerator: str | None) -> str | None:
    """``32-true`` when ``precision`` is a bf16 setting and the stage's device has no
    native bf16; None when the configured precision should stand."""
    if str(precision) not in BF16_PRECISIONS:
        return None
    return None if bf16_is_native(stage_device(accelerator)) else FALLBACK_PRECISION


def bf16_warning(precision: str | int | None, accelerator: str | None) -> str | None:
    """A one-line hint for a bf16 run on a device without native bf16 (None otherwise)."""
    if precision_fallback(precision, accelerator) is None:
        return None
    return (
        f"trainer.precision={precision} on a device without native bfloat16 kernels (a CPU without AVX-512/AMX, a GPU before Ampere): "
        f"its matmuls run several times slower than float32 here; --trainer.precision={FALLBACK_PRECISION} is faster"
    )


def training_attention(input_ids: torch.Tensor, checkpointing: bool = False, gradient_pass: bool | None = None):
    """The attention kernel context of a training forward over ``input_ids`` (B, L).

    On CPU, with gradients on and rows of at most `CPU_MATH_ATTENTION_MAX_TOKENS`, SDPA's
    math kernel (faster there); everywhere else nothing changes. Not in no-grad passes:
    without a backward the flash kernel is the faster one (SmolLM2, 8 rows of 120
    tokens, bf16 autocast, one core: flash 0.48 s, math 0.71 s a forward), so a stage's
    rollout, reference and validation passes compute attention with another kernel
    than its gradient pass, which differs by rounding (a PPO ratio starts within
    rounding of 1 rather than at exactly 1). Not under gradient checkpointing: its
    recompute runs in backward, outside this context, and would use another kernel
    than the forward did.

    ``gradient_pass`` (default: whether gradients are on) picks the kernel of a gradient
    pass in a no-grad one too, for a pass whose results must match a gradient pass's
    bit for bit (PPO's reference pass beside a first update that is its rollout pass).
    """
    if gradient_pass is None:
        gradient_pass = torch.is_grad_enabled()
    if (
        input_ids.device.type != "cpu"
        or checkpointing
        or not gradient_pass
        or input_ids.shape[-1] > CPU_MATH_ATTENTION_MAX_TOKENS
    ):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
