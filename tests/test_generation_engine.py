"""The decode-loop engine against transformers ``generate``: identical greedy tokens,
the same sampling under the same seed, LoRA adapters applied, fallback and selection."""

from __future__ import annotations

import logging

import pytest
import torch

from ucai import generation_engine
from ucai.errors import UcaiError
from ucai.fused_projection import FusedProjection
from ucai.generation_engine import DecodeLoop, HFGenerate, register_engine, select_engine
from ucai.models import load_causal_lm, load_tokenizer
from ucai.stages.generation import GenerationSettings, eos_ids, generate

PROMPTS = [
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nTell me a much longer story about a cat and a dog please<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
]


def encode(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def both(model, tokenizer, settings, prompts=PROMPTS, seed=None):
    """(HF generate's ids, the decode loop's ids) for the same batch."""
    encoded = encode(tokenizer, prompts)
    stop = eos_ids(tokenizer, model)
    outputs = []
    for engine in (HFGenerate(), DecodeLoop()):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(
            engine.generate(model, encoded["input_ids"], encoded["attention_mask"], settings, stop, tokenizer.pad_token_id)
        )
    return outputs


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_token_identical_to_generate(tokenizer, dtype):
    model = load_causal_lm("tiny-llama", dtype=dtype, seed=3).eval()
    settings = GenerationSettings(max_new_tokens=24, do_sample=False)
    hf, loop = both(model, tokenizer, settings)
    assert hf.shape == loop.shape
    assert torch.equal(hf, loop)


def test_greedy_identical_with_repetition_penalty_and_no_padding(tokenizer):
    model = load_causal_lm("tiny-llama", seed=4).eval()
    settings = GenerationSettings(max_new_tokens=16, do_sample=False, repetition_penalty=1.3)
    hf, loop = both(model, tokenizer, settings, prompts=[PROMPTS[0], PROMPTS[0]])  # nothing padded
    assert torch.equal(hf, loop)


def test_greedy_identical_under_bf16_autocast_with_fp32_weights(tokenizer):
    """PPO's case: fp32 master weights, bf16 autocast (the fused weights are cached in bf16)."""
    model = load_causal_lm("tiny-llama", seed=5).eval()
    settings = GenerationSettings(max_new_tokens=20, do_sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf, loop = both(model, tokenizer, settings)
    assert torch.equal(hf, loop)


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_sampling_draws_the_same_tokens_under_the_same_seed(tokenizer, repetition_penalty):
    """With padded rows: `generate`'s repetition penalty skips each row's left padding
    (the pad id is also the eos id here), and so must the loop's."""
    model = load_causal_lm("tiny-llama", seed=6).eval()
    settings = GenerationSettings(
        max_new_tokens=20, do_sample=True, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=repetition_penalty
    )
    hf, loop = both(model, tokenizer, settings, seed=11)
    assert torch.equal(hf, loop)
    other = both(model, tokenizer, settings, seed=12)[1]
    assert not torch.equal(loop, other)  # the seed matters: the test can fail


def test_repetition_penalty_skips_left_padding():
    from ucai.next_token import logits_processors

    settings = GenerationSettings(do_sample=False, repetition_penalty=2.0)
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])  # row 0: two pads (id 0), then token 3
    tokens = torch.tensor([[0, 0, 3], [0, 1, 3]])
    scores = torch.full((2, 5), 4.0)
    out = logits_processors(settings, mask)(tokens, scores.clone())
    # Row 0: only token 3 is penalised (4 / 2); its pads (id 0) are not. Row 1: ids 0, 1, 3.
    assert out.tolist() == [[4.0, 4.0, 4.0, 2.0, 4.0], [2.0, 2.0, 4.0, 2.0, 4.0]]


def test_lora_adapter_is_applied_and_weights_changes_are_seen(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm("tiny-llama", seed=7)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    settings = GenerationSettings(max_new_tokens=16, do_sample=False)
    model.eval()
    plain_hf, plain_loop = both(model, tokenizer, settings)
    assert torch.equal(plain_hf, plain_loop)
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            if name.endswith("up_proj.weight"):  # a fused base weight changed in place
                param.mul_(3.0)
    hf, loop = both(model, tokenizer, settings)
    assert torch.equal(hf, loop)
    assert not torch.equal(hf, plain_hf)


def test_fused_projection_matches_separate_layers_and_tracks_updates():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, n, bias=True) for n in (8, 4, 4)]
    fused = FusedProjection(layers)
    x = torch.randn(3, 1, 8)
    assert fused.fusible
    for out, layer in zip(fused(x), layers, strict=True):
        assert torch.equal(out, layer(x))
    with torch.no_grad():
        layers[1].weight.add_(1.0)
    assert torch.equal(fused(x)[1], layers[1](x))
    # fp32 without autocast: the layers' own weights, no second copy of them.
    assert fused._direct and not fused.holds_copy
    # Under bf16 autocast the weights are cast once into one fused bf16 copy.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = fused(x)
        for out, layer in zip(outs, layers, strict=True):
            assert out.dtype == torch.bfloat16 and torch.equal(out, layer(x))
    assert not fused._direct and fused.holds_copy
    assert torch.equal(fused(x)[2], layers[2](x))  # and back to the plain weights
    assert fused._direct and not fused.holds_copy


def test_generate_uses_the_loop_and_falls_back_for_other_architectures(tokenizer, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = load_causal_lm("tiny-llama", seed=8)
    assert select_engine("auto", llama).name == "fast"
    assert select_engine("auto", llama, synced_gpus=True).name == "hf"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer)))
    with caplog.at_level(logging.INFO, logger="ucai.generation_engine"):
        assert select_engine("auto", gpt2).name == "hf"
    assert "does not support model type 'gpt2'" in caplog.text
    with pytest.raises(UcaiError, match="cannot run this model: model type 'gpt2'"):
        select_engine("decode_loop", gpt2)
    with pytest.raises(UcaiError, match="unknown generation engine 'vllm'"):
        select_engine("vllm", llama)
    # End to end through the shared `generate`, with the fallback model.
    gpt2.generation_config.pad_token_id = tokenizer.pad_token_id
    out = generate(gpt2, tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=4, do_sample=False))
    assert out.sequences.shape[0] == 2


def test_a_registered_engine_is_used_by_name(tokenizer, monkeypatch):
    # Registered for this test only: other tests in this process list the engines.
    monkeypatch.setattr(generation_engine, "ENGINES", dict(generation_engine.ENGINES))
    monkeypatch.setattr(generation_engine, "_instances", {})
    calls = []

    class Recording(HFGenerate):
        name = "recording"

        def generate(self, model, *args, **kwargs):
            calls.append(model)
            return super().generate(model, *args, **kwargs)

    register_engine("recording", Recording)
    model = load_causal_lm("tiny-llama", seed=9)
    settings = GenerationSettings(max_new_tokens=3, do_sample=False, engine="recording")
    out = generate(model, tokenizer, PROMPTS[:1], settings)
    assert calls == [model] and out.sequences.shape[1] <= out.prompt_length + 3


@pytest.mark.slow
def test_greedy_is_token_identical_to_generate_on_smollm2():
    """The real default model: 16 red-team prompts, bf16, 128 new tokens (about 30 s)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from generation import _prompts

    try:
        tokenizer = load_tokenizer("smollm2-135m")
        model = load_causal_lm("smollm2-135m", dtype=torch.bfloat16).eval()
    except UcaiError as error:
        pytest.skip(f"SmolLM2-135M is not installed here: {error}")
    settings = GenerationSettings(max_new_tokens=128, do_sample=False)
    hf, loop = both(model, tokenizer, settings, prompts=_prompts(tokenizer, 16))
    assert torch.equal(hf, loop)


def test_the_loop_does_not_keep_a_finished_model_alive(tokenizer):
    import gc
    import weakref

    loop = DecodeLoop()
    model = load_causal_lm("tiny-llama", seed=10).eval()
    encoded = encode(tokenizer, PROMPTS[:1])
    settings = GenerationSettings(max_new_tokens=2, do_sample=False)
    loop.generate(model, encoded["input_ids"], encoded["attention_mask"], settings, [], tokenizer.pad_token_id)
    assert len(loop._layers) == 1
    gone = weakref.ref(model.model)  # the decoder, the cache's key
    del model
    gc.collect()
    assert gone() is None and len(loop._layers) == 0
