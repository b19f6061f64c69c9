"""The fast engine's pieces, by hand: its kernels, per-prompt seeded sampling, shared
prefix prefill, and the KL(engine ‖ model) that PPO logs."""

from __future__ import annotations

import math

import pytest
import torch

from ucai.decode_kernels import rms_norm, rotate, signed_sin
from ucai.generation_engine import DecodeLoop, FastDecode, HFGenerate, engine_version
from ucai.models import load_causal_lm
from ucai.next_token import StepRecorder, draw_with_uniforms, row_seed, row_uniforms
from ucai.prefill import plain_prefill, prefix_groups, shared_prefix_prefill
from ucai.stages.generation import GenerationSettings, eos_ids
from ucai.stages.rollouts import engine_model_kl

SYSTEM = (
    "<|im_start|>system\nYou are a careful assistant. Respect every person's privacy: never reveal "
    "where someone lives or works.<|im_end|>\n"
)
QUESTIONS = ["Hello there", "Tell me a much longer story about a cat and a dog please", "Why?", "Where is Sam?"]


def chat(question: str, system: str = SYSTEM) -> str:
    return f"{system}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def encode(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


# --------------------------------------------------------------------------- kernels


def test_rms_norm_by_hand_and_against_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.tensor([[3.0, 4.0]])
    # rms = sqrt((9 + 16) / 2) = sqrt(12.5); x / rms = [0.848528, 1.131371]; times [1, 2].
    out = rms_norm(x, torch.tensor([1.0, 2.0]), eps=0.0)
    assert torch.allclose(out, torch.tensor([[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]]), atol=1e-6)
    norm = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    y = torch.randn(3, 1, 16, dtype=torch.bfloat16)
    expected = norm.to(torch.bfloat16)(y)
    assert torch.allclose(rms_norm(y, norm.weight, 1e-5).float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_rotate_equals_transformers_rotary_embedding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 1, 8)  # (B, heads, 1, D)
    angles = torch.randn(2, 1, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (B, 1, D)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    both = rotate(torch.cat([q[:, :, 0], k[:, :, 0]], dim=1), cos, signed_sin(sin))  # (B, 8, D)
    assert torch.equal(both[:, :6], q_ref[:, :, 0]) and torch.equal(both[:, 6:], k_ref[:, :, 0])
    # By hand, D = 2 (one pair): (x1, x2) at angle a -> (x1 cos a - x2 sin a, x2 cos a + x1 sin a).
    a = torch.tensor(0.5)
    x = torch.tensor([[[1.0, 2.0]]])
    out = rotate(x, torch.stack([a.cos(), a.cos()])[None, None], signed_sin(torch.stack([a.sin(), a.sin()])[None, None]))
    assert torch.allclose(out, torch.tensor([[[a.cos() - 2 * a.sin(), 2 * a.cos() + a.sin()]]]))


# --------------------------------------------------------------------------- seeded sampling


def test_inverse_cdf_draw_by_hand():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).repeat(5, 1)
    uniforms = torch.tensor([0.1, 0.2001, 0.69, 0.71, 0.999])
    # cumulative [0.2, 0.2, 0.7, 1.0]: the first entry above u; token 1 (p = 0) is never
    # drawn, though u = 0.2001 lies just past its (empty) interval's start.
    assert draw_with_uniforms(probs, uniforms).tolist() == [0, 2, 2, 3, 3]
    # An unnormalised row (after top-p the kept mass need not be 1) scales the uniform.
    assert draw_with_uniforms(torch.tensor([[2.0, 0.0, 2.0]]), torch.tensor([0.5])).tolist() == [2]


def test_partial_sort_top_p_by_hand_and_against_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    from ucai.next_token import PartialSortTopP

    # probabilities 0.5, 0.3, 0.15, 0.05: the mass above each is 0, 0.5, 0.8, 0.95, so
    # top_p 0.8 keeps the first two (0.8 is not below 0.8), 0.81 the first three.
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    ids = torch.zeros(1, 1, dtype=torch.long)
    kept = lambda top_p, k: (PartialSortTopP(top_p, candidates=k)(ids, scores) > -float("inf")).tolist()  # noqa: E731
    assert kept(0.8, 2) == [[True, True, False, False]]  # decided by the two candidates
    assert kept(0.81, 2) == [[True, True, True, False]]  # 0.8 < 0.81: the full sort decides
    assert kept(0.81, 3) == [[True, True, True, False]]
    torch.manual_seed(0)
    # Peaked rows (decided by the candidates) and flat ones (the fallback), mixed in a batch.
    scores = torch.randn(8, 5000) * torch.tensor([8.0, 8.0, 0.1, 4.0, 0.5, 8.0, 0.1, 2.0])[:, None]
    ids = torch.zeros(8, 1, dtype=torch.long)
    for top_p in (0.5, 0.9, 0.95):
        expected = TopPLogitsWarper(top_p)(ids, scores.clone())
        got = PartialSortTopP(top_p, candidates=64)(ids, scores.clone())
        assert torch.equal(got, expected)


def test_top_p_sample_by_hand():
    from ucai.next_token import PartialSortTopP

    # Probabilities by token id 0.15, 0.3, 0.05, 0.5: top_p 0.8 keeps ids 3 and 1 (0.5 and
    # 0.3). Renormalised 0.625 and 0.375; in vocabulary order the cumulative sums are
    # id 1: 0.375, id 3: 1.0, so u = 0.3 draws id 1 and u = 0.4 id 3.
    scores = torch.tensor([[0.15, 0.3, 0.05, 0.5]]).log().repeat(2, 1)
    ids = torch.zeros(2, 1, dtype=torch.long)
    uniforms = torch.tensor([0.3, 0.4], dtype=torch.float64)
    for candidates in (2, 4):  # decided by two candidates, and by all four
        chosen, logprobs = PartialSortTopP(0.8, candidates=candidates).sample(ids, scores, uniforms, logprobs=True)
        assert chosen.tolist() == [1, 3]
        assert torch.allclose(logprobs, torch.tensor([0.375, 0.625]).log())
    # 0.8 < 0.81: two candidates do not decide the row; the full sort keeps ids 3, 1, 0
    # (0.5 + 0.3 + 0.15 = 0.95; cumulative by id 0.158, 0.474, 1.0): u = 0.1 -> id 0,
    # u = 0.4 -> id 1, u = 0.5 -> id 3.
    uniforms = torch.tensor([0.1, 0.4, 0.5], dtype=torch.float64)
    chosen, logprobs = PartialSortTopP(0.81, candidates=2).sample(ids[:1].repeat(3, 1), scores[:1].repeat(3, 1), uniforms, logprobs=True)
    assert chosen.tolist() == [0, 1, 3]
    assert torch.allclose(logprobs, torch.tensor([0.15 / 0.95, 0.3 / 0.95, 0.5 / 0.95]).log())


def test_top_p_sample_draws_what_the_filtered_vocabulary_draws():
    """`sample` (the kept candidates alone) against the full path it replaces: filter
    the (B, V) scores, softmax, inverse-CDF draw over the whole vocabulary; peaked rows
    (decided by the candidates) and flat ones (the full sort) mixed in a batch."""
    from ucai.next_token import PartialSortTopP, chosen_logprob

    torch.manual_seed(3)
    spread = torch.tensor([8.0, 8.0, 0.1, 4.0, 0.5, 8.0, 0.1, 2.0] * 4)[:, None]
    scores = torch.randn(32, 5000) * spread
    ids = torch.zeros(32, 1, dtype=torch.long)
    for top_p in (0.5, 0.9, 0.95):
        for trial in range(5):
            uniforms = torch.rand(32, dtype=torch.float64, generator=torch.Generator().manual_seed(trial))
            top_p_filter = PartialSortTopP(top_p, candidates=64)
            filtered = top_p_filter(ids, scores)
            expected = draw_with_uniforms(torch.softmax(filtered, dim=-1), uniforms)
            chosen, logprobs = top_p_filter.sample(ids, scores, uniforms, logprobs=True)
            assert torch.equal(chosen, expected)
            assert torch.allclose(logprobs, chosen_logprob(filtered, expected), atol=1e-5)
            assert top_p_filter.sample(ids, scores, uniforms)[1] is None


def test_row_seeds_and_uniforms_depend_on_the_row_alone():
    assert row_seed(0, "p1") == row_seed(0, "p1")
    assert len({row_seed(0, "p1"), row_seed(0, "p2"), row_seed(1, "p1"), row_seed(0, "p1", 1)}) == 4
    alone = row_uniforms([row_seed(0, "p1")], 6)
    in_batch = row_uniforms([row_seed(0, "p0"), row_seed(0, "p1")], 6)
    assert torch.equal(alone[0], in_batch[1]) and not torch.equal(in_batch[0], in_batch[1])


@pytest.mark.parametrize("engine", [DecodeLoop(), FastDecode()], ids=lambda e: e.name)
def test_a_prompt_samples_the_same_whatever_batch_it_is_in(tiny_tokenizer, engine):
    model = load_causal_lm("tiny-llama", seed=21).eval()
    settings = GenerationSettings(max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.9, top_k=40)
    stop, pad = eos_ids(tiny_tokenizer, model), tiny_tokenizer.pad_token_id

    def sample(questions, ids, seed=0):
        enc = encode(tiny_tokenizer, [chat(q) for q in questions])
        seeds = [row_seed(seed, i) for i in ids]
        out = engine.generate(model, enc["input_ids"], enc["attention_mask"], settings, stop, pad, seeds=seeds)
        return [row[enc["input_ids"].shape[1] :].tolist() for row in out]

    def trimmed(ids):
        return ids[: ids.index(pad) + 1] if pad in ids else ids

    alone = sample([QUESTIONS[2]], ["c"])[0]
    batched = sample(QUESTIONS, ["a", "b", "c", "d"])  # other neighbours, other padding, another row
    assert trimmed(batched[2]) == trimmed(alone)
    assert trimmed(sample([QUESTIONS[2]], ["c"], seed=1)[0]) != trimmed(alone)  # the seed matters


# --------------------------------------------------------------------------- shared prefixes


def test_prefix_groups_by_hand():
    rows = [
        [1, 2, 3, 4, 5, 6],  # 0 \ share 1 2 3 4 (four tokens)
        [9, 9, 9],  # 1   alone
        [1, 2, 3, 4, 7],  # 2 /
        [1, 2, 3, 8, 8, 8],  # 3   shares only 1 2 3 with the others: alone at min_shared 4
        [1, 2, 3, 4, 7, 7],  # 4   joins 0 and 2
    ]
    groups = sorted(prefix_groups(rows, min_shared=4), key=lambda g: min(g[0]))
    assert [(sorted(m), n) for m, n in groups] == [([0, 2, 4], 4), ([1], 2), ([3], 5)]
    # At min_shared 3 all four 1-2-3 rows could share three tokens (3 x 3 = 9 saved), but
    # sharing four among rows 0, 2, 4 (2 x 4 = 8) plus nothing for row 3 saves less: one group.
    groups = sorted(prefix_groups(rows, min_shared=3), key=lambda g: min(g[0]))
    assert [(sorted(m), n) for m, n in groups] == [([0, 2, 3, 4], 3), ([1], 2)]
    # A group's prefix leaves each row its last token: two equal rows share all but one.
    assert prefix_groups([[5, 6, 7], [5, 6, 7]], min_shared=1) == [([0, 1], 2)]


def test_shared_prefix_prefill_matches_the_plain_prefill(tiny_tokenizer):
    model = load_causal_lm("tiny-llama", seed=22).eval()
    prompts = [chat(q) for q in QUESTIONS] + [chat("Why?", system="<|im_start|>system\nBe brief.<|im_end|>\n")]
    enc = encode(tiny_tokenizer, prompts)
    with torch.no_grad():
        plain = plain_prefill(model, enc["input_ids"], enc["attention_mask"])
        shared = shared_prefix_prefill(model, enc["input_ids"], enc["attention_mask"], tiny_tokenizer.pad_token_id)
    assert shared is not None and shared.computed_tokens < 0.8 * plain.computed_tokens
    assert torch.allclose(shared.logits, plain.logits, atol=1e-4)
    assert torch.equal(shared.last_position, plain.last_position)
    # Each row's real cached keys are the plain prefill's, in order (padding aside).
    for row in range(len(prompts)):
        real_shared = shared.keys[0][row][:, shared.mask[row].bool()]
        real_plain = plain.keys[0][row][:, plain.mask[row].bool()]
        assert torch.allclose(real_shared, real_plain, atol=1e-4)


def test_length_chunks_by_hand():
    from ucai.prefill import length_chunks

    # Lengths 10, 30, 11, 29 at 5 tokens a chunk: one chunk 4 x 30 + 5 = 125; the two
    # short and the two long apart 2 x 11 + 5 + 2 x 30 + 5 = 92; three chunks 96.
    assert length_chunks([10, 30, 11, 29], call_cost=5) == [[0, 2], [3, 1]]
    assert length_chunks([10, 30, 11, 29], call_cost=100) == [[0, 2, 3, 1]]  # 220 against 282
    assert length_chunks([7], call_cost=0) == [[0]]


def test_shared_prefix_prefill_in_length_chunks_matches_the_plain_prefill(tiny_tokenizer):
    """Suffixes of other lengths run as separate forwards (every length its own chunk)
    and are put back in the batch's layout: the same logits, positions and keys."""
    from ucai.prefill import length_chunks

    model = load_causal_lm("tiny-llama", seed=22).eval()
    questions = ["Hi?", "What is the tallest mountain on Earth and how was it measured?", "Why is the sky blue?", "Ok"]
    enc = encode(tiny_tokenizer, [chat(q) for q in questions])
    with torch.no_grad():
        plain = plain_prefill(model, enc["input_ids"], enc["attention_mask"])
        one = shared_prefix_prefill(model, enc["input_ids"], enc["attention_mask"], tiny_tokenizer.pad_token_id, chunk_cost=10**6)
        chunked = shared_prefix_prefill(model, enc["input_ids"], enc["attention_mask"], tiny_tokenizer.pad_token_id, chunk_cost=0)
    suffix_lengths = [int(m.sum()) for m in enc["attention_mask"]]
    assert len(length_chunks(suffix_lengths, 0)) >= 3
    assert chunked.computed_tokens < one.computed_tokens
    assert torch.equal(chunked.mask, one.mask) and torch.equal(chunked.last_position, plain.last_position)
    assert torch.allclose(chunked.logits, plain.logits, atol=1e-4)
    for layer in (0, -1):
        for row in range(len(questions)):
            real = chunked.mask[row].bool()
            assert torch.allclose(chunked.keys[layer][row][:, real], plain.keys[layer][row][:, plain.mask[row].bool()], atol=1e-4)
            assert torch.allclose(chunked.values[layer][row][:, real], one.values[layer][row][:, real], atol=1e-5)
            assert torch.isfinite(chunked.keys[layer][row]).all()  # the padding columns too


def test_shared_prefix_prefill_declines_when_nothing_is_shared(tiny_tokenizer):
    model = load_causal_lm("tiny-llama", seed=22).eval()
    enc = encode(tiny_tokenizer, ["<|im_start|>user\nHi<|im_end|>\n", "Completely different text here"])
    with torch.no_grad():
        assert shared_prefix_prefill(model, enc["input_ids"], enc["attention_mask"], tiny_tokenizer.pad_token_id) is None


def test_fast_engine_greedy_fp32_is_token_identical_to_generate(tiny_tokenizer):
    """Shared prefixes and the fast kernels on: fp32 greedy ids equal ``generate``'s."""
    model = load_causal_lm("tiny-llama", seed=23).eval()
    enc = encode(tiny_tokenizer, [chat(q) for q in QUESTIONS])
    settings = GenerationSettings(max_new_tokens=32, do_sample=False, repetition_penalty=1.2)
    stop, pad = eos_ids(tiny_tokenizer, model), tiny_tokenizer.pad_token_id
    with torch.no_grad():  # the shared-prefix prefill is the one this batch takes
        assert shared_prefix_prefill(model, enc["input_ids"], enc["attention_mask"], pad) is not None
    hf = HFGenerate().generate(model, enc["input_ids"], enc["attention_mask"], settings, stop, pad)
    fast_engine, exact_engine = FastDecode(), DecodeLoop()
    fast = fast_engine.generate(model, enc["input_ids"], enc["attention_mask"], settings, stop, pad)
    assert torch.equal(hf, fast)
    # It did so on fp32 weights pre-packed for oneDNN (other rounding than F.linear's
    # MKL sgemm); the token-identical decode loop keeps the model's own weights.
    assert torch.equal(exact_engine.generate(model, enc["input_ids"], enc["attention_mask"], settings, stop, pad), hf)
    (fast_layers, _), (exact_layers, _) = (next(iter(e._layers.values()))[1:] for e in (fast_engine, exact_engine))
    if torch.backends.mkldnn.is_available():
        assert all(layer.qkv._packed is not None and layer.qkv._packed.dtype == torch.float32 for layer in fast_layers)
    assert not any(layer.qkv.holds_copy for layer in exact_layers)


# --------------------------------------------------------------------------- observer, KL, versions


def test_step_recorder_sees_the_same_logprobs_from_every_engine(tiny_tokenizer):
    model = load_causal_lm("tiny-llama", seed=24).eval()
    enc = encode(tiny_tokenizer, [chat(q) for q in QUESTIONS[:2]])
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    recorders = []
    for engine in (HFGenerate(), FastDecode()):
        recorder = StepRecorder()
        engine.generate(model, enc["input_ids"], enc["attention_mask"], settings, [], tiny_tokenizer.pad_token_id, observer=recorder)
        recorders.append(recorder)
    hf, fast = recorders
    assert hf.raw_logprobs().shape == fast.raw_logprobs().shape == (2, 12)
    assert torch.allclose(hf.raw_logprobs(), fast.raw_logprobs(), atol=1e-4)
    assert torch.all(hf.raw_logprobs() <= 0)
    # Greedy: no temperature, so the processed distribution is the raw one.
    assert torch.allclose(fast.processed_logprobs(), fast.raw_logprobs())
    # A recorder that saw no step (transformers generate under FSDP records nothing)
    # says so instead of failing.
    assert StepRecorder().processed_logprobs() is None and StepRecorder().raw_logprobs() is None


def test_engine_model_kl_by_hand():
    engine = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -0.5]])
    model = torch.tensor([[-1.5, -2.5, -3.0], [-0.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # Real tokens: 0.5, 0.5, 0.0, 0.5 -> mean 0.375; the padded -inf does not leak in.
    assert engine_model_kl(engine, model, mask).item() == pytest.approx(0.375)


def test_engine_versions_name_what_generated():
    assert engine_version("fast") == f"fast={FastDecode.version}"
    assert engine_version("auto").startswith(f"fast={FastDecode.version},hf=hf-")
    assert engine_version("decode_loop") != engine_version("fast")


def test_transformers_generate_seeds_its_rng_from_the_row_seeds(tiny_tokenizer):
    """The fallback engine cannot seed rows apart, but the same batch with the same
    seeds samples the same whatever the global RNG was before."""
    model = load_causal_lm("tiny-llama", seed=25).eval()
    enc = encode(tiny_tokenizer, [chat(q) for q in QUESTIONS[:2]])
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0)
    args = (model, enc["input_ids"], enc["attention_mask"], settings, [], tiny_tokenizer.pad_token_id)
    seeds = [row_seed(0, "a"), row_seed(0, "b")]
    torch.manual_seed(1)
    first = HFGenerate().generate(*args, seeds=seeds)
    torch.manual_seed(2)
    again = HFGenerate().generate(*args, seeds=seeds)
    other = HFGenerate().generate(*args, seeds=[row_seed(0, "c"), row_seed(0, "d")])
    assert torch.equal(first, again) and not torch.equal(first, other)
