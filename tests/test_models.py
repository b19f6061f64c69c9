"""Model alias resolution, the conversion cache, tokenizer set-up and precision."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ucai import models
from ucai.embeddings import SentenceEncoder
from ucai.errors import UcaiError


def test_tiny_llama_is_deterministic_per_seed():
    a = models.load_causal_lm("tiny-llama", seed=3)
    b = models.load_causal_lm("tiny-llama", seed=3)
    c = models.load_causal_lm("tiny-llama", seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pa[name], pb[name])
    assert not torch.equal(pa[name], pc[name])
    n_params = sum(p.numel() for p in a.parameters())
    assert 1e6 < n_params < 10e6, n_params


def test_tiny_llama_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load_causal_lm("tiny-llama", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_alias_names_the_request_and_accepted_forms():
    with pytest.raises(UcaiError) as info:
        models.resolve_model("smollm3")
    message = str(info.value)
    assert "'smollm3'" in message and "smollm2-135m" in message and "owner/name" in message


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UcaiError, match="does not exist"):
        models.resolve_model(str(tmp_path / "no" / "such" / "model"))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(UcaiError, match="config.json"):
        models.resolve_model(str(tmp_path))


def test_hub_id_resolves_to_hub_without_touching_the_network():
    source = models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source.kind == "hub" and source.location == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "load",
    [models.load_tokenizer, models.load_causal_lm, models.load_sequence_classifier, SentenceEncoder],
    ids=["tokenizer", "causal-lm", "sequence-classifier", "sentence-encoder"],
)
def test_a_hub_id_that_cannot_be_loaded_is_one_line_naming_it(load):
    """Offline (as every test is), a hub id not in the local cache: transformers raises
    an OSError chained through several tracebacks; the user gets one line."""
    with pytest.raises(UcaiError) as error:
        load("ucai-tests/no-such-model")
    message = str(error.value)
    assert message.startswith("could not load model 'ucai-tests/no-such-model': ") and "\n" not in message
    assert len(message) > len("could not load model 'ucai-tests/no-such-model': ")  # transformers' reason follows


def test_a_folder_without_weights_is_one_line_naming_it(tmp_path, tiny_model):
    tiny_model.config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(UcaiError, match=rf"^could not load model '{tmp_path}': .*(no file named|does not appear to have)"):
        models.load_causal_lm(str(tmp_path))


def test_local_folder_round_trip(tmp_path, tiny_model, tiny_tokenizer):
    folder = models.save_pretrained_atomic(tmp_path / "m", tiny_model, tiny_tokenizer)
    assert models.resolve_model(str(folder)).kind == "folder"
    loaded = models.load_causal_lm(str(folder))
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(loaded(ids).logits, tiny_model(ids).logits)
    tokenizer = models.load_tokenizer(str(folder))
    assert tokenizer.pad_token_id == tiny_tokenizer.pad_token_id
    assert not list(tmp_path.glob(".m.*")), "temporary folders must not be left behind"


def test_tokenizer_pads_left_with_a_token_other_than_eos(tiny_tokenizer):
    assert tiny_tokenizer.padding_side == "left"
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.model_max_length == models.TinyLlamaSpec().max_position_embeddings
    batch = tiny_tokenizer(["hi", "a much longer prompt here"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == tiny_tokenizer.pad_token_id


def test_training_tokenizer_pads_right():
    tokenizer = models.load_tokenizer("tiny-llama", padding_side="right")
    batch = tokenizer(["hi", "a much longer prompt"], padding=True)
    assert batch["attention_mask"][0][-1] == 0


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [
        ("32-true", torch.float32),
        ("bf16-mixed", torch.float32),  # mixed keeps fp32 master weights
        ("16-mixed", torch.float32),
        ("bf16-true", torch.bfloat16),
        ("16-true", torch.float16),
        (None, torch.float32),
    ],
)
def test_dtype_follows_trainer_precision(precision, dtype):
    assert models.dtype_from_precision(precision) == dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nf4_without_cuda_fails_early_and_clearly():
    with pytest.raises(UcaiError, match="needs a CUDA GPU"):
        models.load_causal_lm("tiny-llama", quantization="nf4")


def test_lora_settings_build_a_peft_config(tiny_lora):
    from peft import get_peft_model

    peft_model = get_peft_model(models.load_causal_lm("tiny-llama"), tiny_lora.to_peft())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)


def test_atomic_folder_survives_an_interrupted_build(tmp_path):
    target = tmp_path / "cache" / "model"

    def broken(folder: Path):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        models._atomic_folder(target, broken)
    assert not target.exists()
    assert os.listdir(target.parent) == []

    calls = []
    models._atomic_folder(target, lambda folder: calls.append((folder / "w").write_text("x")))
    models._atomic_folder(target, lambda folder: calls.append("again"))
    assert (target / "w").read_text() == "x" and len(calls) == 1, "a complete cache is reused"


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UCAI_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UCAI_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "ucai"


def test_tiny_tokenizer_is_built_in_a_fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UCAI_CACHE", str(tmp_path))
    tokenizer = models.load_tokenizer("tiny-llama")
    assert tokenizer.eos_token == "<|im_end|>"
    assert (tmp_path / "smollm2-135m-tokenizer" / ".ucai-complete").is_file()


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_reloads_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("UCAI_CACHE", str(tmp_path))
    folder = models.smollm2_folder()
    assert (folder / "model.safetensors").is_file()

    def no_conversion():
        raise AssertionError("the GGUF file was read again: the converted cache was not used")

    monkeypatch.setattr(models, "_gguf_path", no_conversion)
    model = models.load_causal_lm("smollm2-135m")
    assert model.config.num_hidden_layers == 30


def test_cast_frozen_linear_changes_no_autocast_result_and_unties_the_head_only_when_asked():
    from ucai.models import cast_frozen_linear, load_causal_lm

    reference = load_causal_lm("tiny-llama", seed=0).eval().requires_grad_(False)
    kept, untied = (load_causal_lm("tiny-llama", seed=0).eval().requires_grad_(False) for _ in range(2))
    layers = len(reference.model.layers) * 7  # q k v o gate up down
    assert cast_frozen_linear(kept, torch.bfloat16) == layers  # the tied head is left alone
    assert kept.lm_head.weight.dtype == torch.float32 and kept.lm_head.weight is kept.model.embed_tokens.weight
    assert cast_frozen_linear(untied, torch.bfloat16, untie=True) == layers + 1
    assert untied.lm_head.weight.dtype == torch.bfloat16
    assert untied.model.embed_tokens.weight.dtype == torch.float32  # the residual stream stays fp32
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(input_ids=ids).logits
        assert torch.equal(kept(input_ids=ids).logits, expected)
        assert torch.equal(untied(input_ids=ids).logits, expected)
    with torch.no_grad():
        assert not torch.equal(reference(input_ids=ids).logits, expected)  # autocast really rounds: the check can fail


def test_disable_dropout_also_zeroes_the_attention_dropout_rate_llama_reads_in_train_mode():
    from transformers import LlamaForCausalLM

    config = models.tiny_llama_config()
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # the rate is in force
        assert models.disable_dropout(model) == config.num_hidden_layers
        assert torch.equal(model(ids).logits, model.eval()(ids).logits)


def test_activation_checkpointing_recomputes_layers_without_a_deprecation_warning():
    """Checkpointed layers (the flag each decoder layer reads in train mode) give the
    gradients of the plain model, and transformers 5's deprecated name is not called."""
    import warnings

    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))

    def gradients(checkpointed: bool) -> dict[str, torch.Tensor]:
        model = models.load_causal_lm("tiny-llama", seed=5).train()
        if checkpointed:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                models.enable_activation_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(ids).logits.square().mean().backward()
        return {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name
