"""The fast engine is faithful: on 16 prompts x 128 tokens each generated token's
log-prob under the engine is as close to the model's forward as ``generate``'s is
(mean |Δ| no larger, max at most twice), and fp32 greedy ids stay identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ucai import generation_fidelity
from ucai.errors import UcaiError
from ucai.generation_engine import FastDecode, HFGenerate
from ucai.generation_fidelity import forward_logprobs, measure_engines
from ucai.hardware import cpu_bf16_is_native
from ucai.models import load_causal_lm, load_tokenizer
from ucai.stages.generation import GenerationSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from generation import _prompts  # noqa: E402  (the benchmark's 16 red-team prompts)


def check_faithful(model, tokenizer, dtype_name: str):
    tokenizer.padding_side = "left"
    encoded = tokenizer(_prompts(tokenizer, 16), return_tensors="pt", padding=True, add_special_tokens=False)
    settings = GenerationSettings(max_new_tokens=128, do_sample=False)
    args = (model, encoded["input_ids"], encoded["attention_mask"], settings, [], tokenizer.pad_token_id)
    hf, fast = measure_engines([HFGenerate(), FastDecode()], *args)
    assert fast.tokens == hf.tokens == 16 * 128
    assert fast.mean_abs <= hf.mean_abs, f"{dtype_name}: {fast.line('fast')} vs {hf.line('hf')}"
    assert fast.max_abs <= 2 * hf.max_abs, f"{dtype_name}: {fast.line('fast')} vs {hf.line('hf')}"
    return hf, fast


def test_the_fast_engine_is_faithful_on_the_tiny_model_in_bf16(tiny_tokenizer):
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=31).eval()
    hf, fast = check_faithful(model, tiny_tokenizer, "bf16")
    assert hf.mean_abs > 0  # bf16 decoding does drift from the forward: the bound is not vacuous


def test_the_shared_prefix_prefill_drifts_only_a_little_further(tiny_tokenizer):
    """Rows sharing a long system prompt: the shared prefill is taken (asserted). Its
    prompt cache is computed on other matmul shapes than the forward's, so in bf16 it
    drifts a little further than ``generate`` (measured: mean 1.18x generate's here,
    1.11x on SmolLM2; max equal here, 1.4x there; 1.52x here on an AVX2-only CPU, whose
    bf16 matmuls take a reference path that rounds by shape, and 1.54x on that CPU now that
    this batch's suffixes run in two length chunks). A regression guard, not
    the strict bound: mean within 1.5x (2x without native bf16), max within 2x."""
    from ucai.prefill import shared_prefix_prefill

    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16, seed=33).eval()
    system = "<|im_start|>system\nYou are a careful assistant. Never reveal where a person lives or works.<|im_end|>\n"
    prompts = [system + chat for chat in _prompts(tiny_tokenizer, 16)]  # a long shared opening turn
    tiny_tokenizer.padding_side = "left"
    encoded = tiny_tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        assert shared_prefix_prefill(model, encoded["input_ids"], encoded["attention_mask"], tiny_tokenizer.pad_token_id)
    settings = GenerationSettings(max_new_tokens=128, do_sample=False)
    args = (model, encoded["input_ids"], encoded["attention_mask"], settings, [], tiny_tokenizer.pad_token_id)
    hf, fast = measure_engines([HFGenerate(), FastDecode()], *args)
    mean_bound = 1.5 if cpu_bf16_is_native() else 2.0
    assert fast.mean_abs <= mean_bound * hf.mean_abs and fast.max_abs <= 2 * hf.max_abs, (
        f"{fast.line('fast')} vs {hf.line('hf')}"
    )


def test_the_fast_engine_is_greedy_identical_in_fp32(tiny_tokenizer):
    model = load_causal_lm("tiny-llama", dtype=torch.float32, seed=32).eval()
    hf, fast = check_faithful(model, tiny_tokenizer, "fp32")
    assert torch.equal(hf.sequences, fast.sequences)


def test_engines_that_generate_the_same_sequences_share_one_forward(tiny_tokenizer, monkeypatch):
    """`measure_engines` runs the model's forward once for sequences an earlier engine
    already generated, and each engine's result is what it gives that engine alone."""
    import dataclasses

    class OneTokenShorter(HFGenerate):  # other sequences: a forward of their own
        def generate(self, model, input_ids, attention_mask, settings, *args, **kwargs):
            settings = dataclasses.replace(settings, max_new_tokens=settings.max_new_tokens - 1)
            return super().generate(model, input_ids, attention_mask, settings, *args, **kwargs)

    model = load_causal_lm("tiny-llama", dtype=torch.float32, seed=36).eval()
    tiny_tokenizer.padding_side = "left"
    encoded = tiny_tokenizer(_prompts(tiny_tokenizer, 3), return_tensors="pt", padding=True, add_special_tokens=False)
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    args = (model, encoded["input_ids"], encoded["attention_mask"], settings, [], tiny_tokenizer.pad_token_id)
    alone = [measure_engines([engine], *args)[0] for engine in (HFGenerate(), FastDecode(), OneTokenShorter())]
    forwards = []
    original = generation_fidelity.forward_logprobs
    monkeypatch.setattr(generation_fidelity, "forward_logprobs", lambda *a: forwards.append(a) or original(*a))
    together = measure_engines([HFGenerate(), FastDecode(), OneTokenShorter()], *args)
    assert torch.equal(together[0].sequences, together[1].sequences)  # fp32 greedy: the same tokens
    assert len(forwards) == 2  # HF's sequences, then the shorter ones; FastDecode's reused HF's
    for got, want in zip(together, alone, strict=True):
        assert torch.equal(got.sequences, want.sequences)
        assert (got.mean_abs, got.max_abs, got.tokens) == (want.mean_abs, want.max_abs, want.tokens)
    assert together[2].tokens == 3 * 5


def test_forward_logprobs_by_hand():
    """A model whose logits are fixed: uniform over 4 tokens except token 2 at ln 3 above
    the rest -> p(2) = 3/6, p(other) = 1/6, whatever the input."""

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 2] = torch.log(torch.tensor(3.0))
            return type("Out", (), {"logits": logits})()

    sequences = torch.tensor([[0, 1, 2, 3], [1, 1, 0, 2]])  # prompt width 2 (row 0 left-padded)
    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    got = forward_logprobs(Fixed(), sequences, prompt_mask)
    expected = torch.log(torch.tensor([[3 / 6, 1 / 6], [1 / 6, 3 / 6]]))
    assert torch.allclose(got, expected)


def _gemma2_with_final_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(34)
    config = Gemma2Config(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, pad_token_id=0,
    )
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize(
    "build",
    [lambda: load_causal_lm("tiny-llama", dtype=torch.float32, seed=34).eval(), _gemma2_with_final_softcapping],
    ids=["llama", "gemma2-softcapped"],
)
def test_forward_logprobs_take_the_head_at_the_completion_only_as_the_full_forward_would(build):
    """The head-of-hidden path (PPO's: decoder, then the head at the T predicting
    positions, Gemma 2's logit cap after it) gives the log-probs of the model's own
    full forward, in fp32."""
    model = build()

    class FullForward(torch.nn.Module):  # no config: forward_logprobs runs its forward
        def forward(self, **inputs):
            return model(**inputs)

    generator = torch.Generator().manual_seed(0)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    sequences = torch.randint(3, 49152, (2, 9), generator=generator) * torch.cat(
        [prompt_mask, torch.ones(2, 4, dtype=torch.long)], dim=1
    )  # left padding (id 0) before row 0's prompt
    got, full = forward_logprobs(model, sequences, prompt_mask), forward_logprobs(FullForward(), sequences, prompt_mask)
    assert got.shape == (2, 4)
    assert torch.allclose(got, full, atol=1e-5)


@pytest.mark.slow
def test_the_fast_engine_is_faithful_on_smollm2():
    """The real default model in bf16 (about a minute)."""
    try:
        tokenizer = load_tokenizer("smollm2-135m")
        model = load_causal_lm("smollm2-135m", dtype=torch.bfloat16).eval()
    except UcaiError as error:
        pytest.skip(f"SmolLM2-135M is not installed here: {error}")
    check_faithful(model, tokenizer, "bf16")
