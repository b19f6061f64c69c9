"""The fast engine's fused C++ kernels (`ucai.native_decode`): by hand, against the
PyTorch ops they replace, their input checks, and the engine with and without them."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ucai import generation_engine
from ucai.decode_kernels import rms_norm, rotate, signed_sin
from ucai.generation_engine import FastDecode, HFGenerate
from ucai.generation_fidelity import measure_engines
from ucai.models import load_causal_lm
from ucai.native_decode import native_kernels
from ucai.stages.generation import GenerationSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generation import _prompts  # noqa: E402  (the benchmark's 16 red-team prompts)

KERNELS = native_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the native kernels could not be built (no C++ compiler?)")


def test_the_kernels_build_wherever_there_is_a_compiler():
    """A compile error must fail the suite, not skip every kernel test and leave the
    engine on its PyTorch ops unnoticed."""
    compiler = shlex.split(os.environ.get("CXX") or "c++")
    if os.environ.get("UCAI_NATIVE_KERNELS", "1") == "0" or shutil.which(compiler[0]) is None:
        pytest.skip("no C++ compiler here, or the kernels turned off: the PyTorch ops run instead")
    assert KERNELS is not None, "the native kernels did not build; run with --log-level=INFO to see why"


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the bf16 spacing at b."""
    spacing = torch.exp2(torch.floor(torch.log2(b.float().abs().clamp(min=1e-30))) - 7)
    return (a.float() - b.float()).abs() / spacing


def attention_inputs(dtype, batch=3, heads=4, kv_heads=2, dim=64, capacity=12, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    qkv = randn(batch, (heads + 2 * kv_heads) * dim)
    q, k, v = qkv.split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
    angles = torch.rand(batch, dim // 2, generator=generator) * 6
    table = torch.cat((angles, angles), dim=-1)
    cos, sin = table.cos().to(dtype), table.sin().to(dtype)
    return q, k, v, cos, signed_sin(sin), randn(batch, kv_heads, capacity, dim), randn(batch, kv_heads, capacity, dim)


# --------------------------------------------------------------------------- kernels by hand


@needs_kernels
def test_attention_by_hand():
    """One row, one head of size 2, no rotation (cos 1, sin 0), scale 1: the new key
    [ln 3, 0] scores ln 3 against the cached key's 0 for the query [1, 0], so the
    weights are 1/4 and 3/4 and the output is 1/4 [4, 0] + 3/4 [0, 8] = [1, 6]."""
    q = torch.tensor([[1.0, 0.0]])
    k, v = torch.tensor([[math.log(3), 0.0]]), torch.tensor([[0.0, 8.0]])
    cos, sin_signed = torch.ones(1, 2), torch.zeros(1, 2)
    keys, values = torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2)
    values[0, 0, 0] = torch.tensor([4.0, 0.0])
    out = torch.empty(1, 2)
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, None, out, 2, 1.0)
    assert torch.allclose(out, torch.tensor([[1.0, 6.0]]), atol=1e-5)
    assert torch.equal(keys[0, 0, 1], k[0]) and torch.equal(values[0, 0, 1], v[0])  # written at length - 1
    # Masking the cached position leaves only the new one.
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, torch.tensor([[float("-inf"), 0.0]]), out, 2, 1.0)
    assert torch.allclose(out, torch.tensor([[0.0, 8.0]]), atol=1e-6)


@needs_kernels
def test_norm_and_silu_by_hand():
    """rms of [3, 4] is sqrt(12.5): normed = [3, 4] / 3.5355 * weight [1, 2]; the
    residual add comes first. silu(0) = 0, silu(2) * 3 = 2 / (1 + e^-2) * 3."""
    hidden, delta = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 3.0]])
    normed = torch.empty(1, 2)
    KERNELS.add_rms_norm(hidden, delta, torch.tensor([1.0, 2.0]), 0.0, normed)
    assert torch.equal(hidden, torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(normed, torch.tensor([[3 / 12.5**0.5, 8 / 12.5**0.5]]), atol=1e-6)
    gate_up = torch.tensor([[0.0, 2.0, 5.0, 3.0]])
    out = torch.empty(1, 2)
    KERNELS.silu_mul(gate_up[:, :2], gate_up[:, 2:], out)
    assert torch.allclose(out, torch.tensor([[0.0, 2 / (1 + math.exp(-2)) * 3]]), atol=1e-6)


# --------------------------------------------------------------------------- against PyTorch's ops


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_and_silu_match_the_pytorch_ops(dtype):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(16, 576, generator=generator).to(dtype)
    delta = torch.randn(16, 576, generator=generator).to(dtype)
    weight = (torch.rand(576, generator=generator) + 0.5).to(dtype)
    expected_hidden = hidden + delta
    expected_normed = rms_norm(expected_hidden, weight, 1e-5)
    normed = torch.empty_like(hidden)
    KERNELS.add_rms_norm(hidden, delta, weight, 1e-5, normed)
    assert torch.equal(hidden, expected_hidden)  # an add rounds once, in any order
    gate_up = torch.randn(16, 2 * 1536, generator=generator).to(dtype)
    gate, up = gate_up.split(1536, dim=-1)
    activated = torch.empty(16, 1536, dtype=dtype)
    KERNELS.silu_mul(gate, up, activated)
    expected_activated = F.silu(gate) * up
    if dtype == torch.bfloat16:
        # The same ops rounded the same way; only a sum's order and exp's last bit
        # differ, which flips a rounding now and then by one bf16 step.
        for got, expected in ((normed, expected_normed), (activated, expected_activated)):
            assert bf16_ulps(got, expected).max() <= 1
            assert (got == expected).float().mean() >= 0.999
    else:
        assert torch.allclose(normed, expected_normed, rtol=1e-6, atol=1e-6)
        assert torch.allclose(activated, expected_activated, rtol=1e-6, atol=1e-6)
    # Without a delta the residual stream is left alone.
    before = hidden.clone()
    KERNELS.add_rms_norm(hidden, None, weight, 1e-5, normed)
    assert torch.equal(hidden, before)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [64, 128, 24])  # the AVX-512 paths and the portable one
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (9, 3), (10, 2), (3, 3)])  # groups of 2, 3 (SmolLM2), 5, 1
def test_rope_attention_matches_rotation_cache_write_and_sdpa(dtype, dim, heads, kv_heads):
    q, k, v, cos, sin_signed, keys, values = attention_inputs(dtype, heads=heads, kv_heads=kv_heads, dim=dim)
    batch, _, capacity, _ = keys.shape
    length = 9
    mask = torch.zeros(batch, capacity, dtype=dtype)
    mask[0, :3] = float("-inf")  # a left-padded row
    expected_keys, expected_values = keys.clone(), values.clone()
    rotated = rotate(torch.cat((q, k), dim=-1).view(batch, -1, dim), cos[:, None], sin_signed[:, None])
    expected_keys[:, :, length - 1] = rotated[:, heads:]
    expected_values[:, :, length - 1] = v.view(batch, kv_heads, dim)
    reference = F.scaled_dot_product_attention(
        rotated[:, :heads, None].double(), expected_keys[:, :, :length].double(),
        expected_values[:, :, :length].double(), attn_mask=mask[:, None, None, :length].double(),
        scale=dim**-0.5, enable_gqa=True,
    ).reshape(batch, -1)
    out = torch.empty(batch, heads * dim, dtype=dtype)
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, mask, out, length, dim**-0.5)
    if dtype == torch.bfloat16:
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
        assert (out.double() - reference).abs().max() < 2e-2  # bf16 weights and output
    else:
        assert torch.allclose(keys, expected_keys, atol=1e-6) and torch.equal(values, expected_values)
        assert (out.double() - reference).abs().max() < 1e-5
    # The masked cache positions take no part.
    keys[0, :, :3] = 100.0
    again = torch.empty_like(out)
    keys[:, :, length - 1] = 0  # rewritten by the call
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, mask, again, length, dim**-0.5)
    assert torch.equal(again, out)


@needs_kernels
@pytest.mark.skipif(not generation_engine.bf16_kernels_faithful_here(), reason="bf16 kernels used on native-bf16 CPUs only")
@pytest.mark.parametrize("length", [37, 80, 200])
def test_bf16_attention_over_many_keys_rounds_as_pytorchs_flash_kernel(length):
    """Over more than 16 keys the bf16 softmax runs 16 scores a vector (its exp, the
    weights' rounding to bf16 and the float32 total as PyTorch's CPU flash kernel
    computes them), so the kernel's output is bf16 SDPA's but for a rounding flipped
    now and then: PyTorch takes the exact exp for the last length mod 16 keys and sums
    in another order. (A wrong constant in the vector exp misses by tens of steps.)"""
    heads, kv_heads, dim, batch = 9, 3, 64, 4
    q, k, v, cos, sin_signed, keys, values = attention_inputs(
        torch.bfloat16, batch=batch, heads=heads, kv_heads=kv_heads, dim=dim, capacity=256
    )
    mask = torch.zeros(batch, 256, dtype=torch.bfloat16)
    mask[0, :21] = float("-inf")  # a left-padded row, its padding across a 16-key block
    expected_keys, expected_values = keys.clone(), values.clone()
    rotated = rotate(torch.cat((q, k), dim=-1).view(batch, -1, dim), cos[:, None], sin_signed[:, None])
    expected_keys[:, :, length - 1] = rotated[:, heads:]
    expected_values[:, :, length - 1] = v.view(batch, kv_heads, dim)
    flash = F.scaled_dot_product_attention(
        rotated[:, :heads, None], expected_keys[:, :, :length], expected_values[:, :, :length],
        attn_mask=mask[:, None, None, :length], scale=dim**-0.5, enable_gqa=True,
    ).reshape(batch, -1)
    out = torch.empty(batch, heads * dim, dtype=torch.bfloat16)
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, mask, out, length, dim**-0.5)
    assert bf16_ulps(out, flash).max() <= 4
    assert (out == flash).float().mean() >= 0.99


@needs_kernels
@pytest.mark.parametrize("length", [5, 37])  # the tail alone; full vectors and a tail
def test_a_nan_in_the_cache_shows_as_nan(length):
    """A diverged activation must not turn into plausible numbers: a NaN key makes its
    row's outputs non-finite (SDPA gives NaN; the kernel's exp, as PyTorch's, clamps a
    NaN score to the largest, whose weight then overflows), the other rows untouched."""
    q, k, v, cos, sin_signed, keys, values = attention_inputs(torch.bfloat16, capacity=48)
    keys[1, :, 2] = float("nan")
    out = torch.empty_like(q)
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, None, out, length, 0.125)
    assert not torch.isfinite(out[1]).any()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


@needs_kernels
def test_a_row_with_every_position_masked_attends_to_nothing():
    """As PyTorch's flash kernel: zeros, not NaN (the engine never asks this: the new
    position is always attended)."""
    q, k, v, cos, sin_signed, keys, values = attention_inputs(torch.bfloat16)
    mask = torch.zeros(q.shape[0], keys.shape[2], dtype=torch.bfloat16)
    mask[1] = float("-inf")
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, mask, out, 5, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isfinite(out).all()
    assert not torch.equal(out[0], torch.zeros_like(out[0]))


@needs_kernels
def test_kernel_inputs_are_checked():
    q, k, v, cos, sin_signed, keys, values = attention_inputs(torch.bfloat16)
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="outside the cache"):
        KERNELS.rope_attention(q, k, v, cos, sin_signed, keys, values, None, out, keys.shape[2] + 1, 0.1)
    with pytest.raises(ValueError, match="q must be"):
        KERNELS.rope_attention(q.float(), k, v, cos, sin_signed, keys, values, None, out, 3, 0.1)
    with pytest.raises(ValueError, match="contiguous caches"):
        KERNELS.rope_attention(q, k, v, cos, sin_signed, keys.transpose(2, 3), values, None, out, 3, 0.1)
    hidden = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="norm weight"):
        KERNELS.add_rms_norm(hidden, None, torch.ones(7, dtype=torch.bfloat16), 1e-5, torch.empty_like(hidden))
    with pytest.raises(ValueError, match="gate has shape"):
        KERNELS.silu_mul(hidden, hidden, torch.empty(4, 9, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- the engine


def _batch(tokenizer, count: int, new_tokens: int):
    tokenizer.padding_side = "left"
    encoded = tokenizer(_prompts(tokenizer, count), return_tensors="pt", padding=True, add_special_tokens=False)
    settings = GenerationSettings(max_new_tokens=new_tokens, do_sample=False)
    return encoded["input_ids"], encoded["attention_mask"], settings, [], tokenizer.pad_token_id


class PyTorchOps(FastDecode):
    """The fast engine with its layers as PyTorch ops, as without a compiler."""

    def _layers_runner(self, base, decoder, layers, dtype):
        return generation_engine.DecodeLoop._layers_runner(self, base, decoder, layers, dtype)


def count_native_steps(monkeypatch) -> list:
    """A list that grows by one for each step the engine runs with the kernels; the
    engine takes them on any CPU here (on one without native bf16 it would not: see
    `test_a_cpu_without_native_bf16_runs_the_pytorch_ops`)."""
    monkeypatch.setattr(generation_engine, "bf16_kernels_faithful_here", lambda: True)
    calls = []
    original = generation_engine.NativeLayers.__call__
    monkeypatch.setattr(
        generation_engine.NativeLayers, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    return calls


@needs_kernels
def test_the_kernels_run_in_the_fast_engine_and_drift_no_further_than_generate(tiny_tokenizer, monkeypatch):
    """In bf16 the default engine takes the kernels (counted), also under the stages'
    bf16 autocast, and its log-probs stay as close to the model's forward as
    ``generate``'s (the strict bound of `tests/test_generation_fidelity.py`)."""
    calls = count_native_steps(monkeypatch)
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=31).eval()
    args = (model, *_batch(tiny_tokenizer, 16, 64))
    hf, fast = measure_engines([HFGenerate(), FastDecode()], *args)
    assert len(calls) == 63  # every decode step after the prefill's token
    assert fast.mean_abs <= hf.mean_abs and fast.max_abs <= 2 * hf.max_abs, f"{fast.line('fast')} vs {hf.line('hf')}"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = FastDecode().generate(*args)
    assert len(calls) == 126 and torch.equal(under_autocast, fast.sequences)


def wide_head_model(seed: int):
    """A tiny Llama whose heads are 64 wide, as SmolLM2's: the kernels' AVX-512 path
    (tiny-llama's 16-wide heads take the portable one)."""
    from transformers import LlamaForCausalLM

    from ucai.models import TinyLlamaSpec, tiny_llama_config

    torch.manual_seed(seed)
    spec = TinyLlamaSpec(hidden_size=192, intermediate_size=256, num_attention_heads=3, num_key_value_heads=1)
    return LlamaForCausalLM(tiny_llama_config(spec=spec)).to(torch.bfloat16).eval()


@needs_kernels
def test_wide_heads_and_lora_adapters_drift_no_further_than_generate(tiny_tokenizer, monkeypatch):
    """64-wide heads (the AVX-512 attention), then the same model under a LoRA adapter
    whose B matrices are not zero (the adapters' outputs reach the kernels as separate
    q/k/v tensors): the kernels run and stay within ``generate``'s drift."""
    from peft import LoraConfig, get_peft_model

    calls = count_native_steps(monkeypatch)
    args = _batch(tiny_tokenizer, 8, 24)

    def check(candidate):
        before = len(calls)
        hf, fast = measure_engines([HFGenerate(), FastDecode()], candidate, *args)
        assert len(calls) - before == 23  # every decode step ran the kernels
        assert fast.mean_abs <= 1.5 * hf.mean_abs and fast.max_abs <= 2 * hf.max_abs, f"{fast.line('fast')} vs {hf.line('hf')}"

    model = wide_head_model(35)
    check(model)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    check(adapted)


def test_without_the_kernels_the_fast_engine_runs_its_pytorch_ops(tiny_tokenizer, monkeypatch):
    """Float32 weights (with or without autocast) and a machine without the kernels
    (no compiler) run the fast engine's PyTorch ops, token for token."""
    calls = count_native_steps(monkeypatch)
    model = load_causal_lm("tiny-llama", dtype=torch.float32, seed=33).eval()
    args = (model, *_batch(tiny_tokenizer, 4, 16))
    assert torch.equal(FastDecode().generate(*args), PyTorchOps().generate(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(FastDecode().generate(*args), PyTorchOps().generate(*args))
    assert calls == []
    bf16 = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=33).eval()
    monkeypatch.setattr(generation_engine, "native_kernels", lambda: None)
    args = (bf16, *args[1:])
    assert torch.equal(FastDecode().generate(*args), PyTorchOps().generate(*args))
    assert calls == []


def test_a_cpu_without_native_bf16_runs_the_pytorch_ops(tiny_tokenizer, monkeypatch):
    calls = count_native_steps(monkeypatch)
    monkeypatch.setattr(generation_engine, "bf16_kernels_faithful_here", lambda: False)
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=34).eval()
    args = (model, *_batch(tiny_tokenizer, 4, 16))
    assert torch.equal(FastDecode().generate(*args), PyTorchOps().generate(*args))
    assert calls == []


def test_native_kernels_can_be_turned_off(monkeypatch):
    from ucai import native_decode

    monkeypatch.setenv("UCAI_NATIVE_KERNELS", "0")
    native_decode.native_kernels.cache_clear()
    try:
        assert native_decode.native_kernels() is None
    finally:
        native_decode.native_kernels.cache_clear()


def test_generation_leaves_the_garbage_collector_as_it_found_it(tiny_tokenizer):
    """The decode loop turns Python's collector off while it runs and restores it."""
    import gc

    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=34).eval()
    args = (model, *_batch(tiny_tokenizer, 2, 4))
    assert gc.isenabled()
    FastDecode().generate(*args)
    assert gc.isenabled()
    gc.disable()
    try:
        FastDecode().generate(*args)
        assert not gc.isenabled()
    finally:
        gc.enable()
