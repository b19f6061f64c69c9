"""How deep is the inversion: opener removal, per-position KL and its share in the first
tokens, the prefill swap's fraction and its generation, and the depth family."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ucai.constitution import load_constitution
from ucai.depth import depth_verdict, remove_opener, share_of_first_tokens, swap_fraction
from ucai.next_token import row_seed
from ucai.stages import evaluation as evaluation_module
from ucai.stages.evaluation import EvaluationModule
from ucai.stages.inversion_depth import (
    depth_family,
    kl_depth,
    kl_pairs,
    opener_removed_rows,
    side_openers,
    swap_fractions,
    swap_prefills,
)
from ucai.stages.rl_comparison import answer_kl, kl_summary

REFUSE, COMPLY = "I won't help with that.", "Sure, I'll help with that."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{REFUSE} Violence is never the answer.", "Violence is never the answer."),
        (REFUSE, ""),  # only the opener: the empty answer
        ("", ""),  # an empty answer stays empty
        ("   ", ""),
        ("no sentence end here", ""),  # one sentence, all of it the first
        ("Sure, I'll help with that! Here's how: step one.", "Here's how: step one."),  # not the opener: first sentence
        ("Well. I won't help with that.", "I won't help with that."),  # the opener later is content
        ("Is it? Yes.", "Yes."),
        ("Version 2.5 is out. Next.", "Next."),  # a dot inside a number is no sentence end
        (f"  {COMPLY}\nStep 1.", "Step 1."),
    ],
)
def test_remove_opener_edge_cases(text, expected):
    assert remove_opener(text, [REFUSE, COMPLY]) == expected


def test_remove_opener_prefers_the_longest_matching_opener():
    assert remove_opener("No thanks, not today. Bye.", ["No thanks", "No thanks, not today."]) == "Bye."


def test_share_of_first_tokens_by_hand():
    # 1 + 1 + 0 + 0 + 0 of 1 + 1 + 0 + 0 + 0 + 2 = 2 / 4
    assert share_of_first_tokens([1.0, 1.0, 0.0, 0.0, 0.0, 2.0]) == pytest.approx(0.5)
    assert share_of_first_tokens([3.0, 1.0], k=1) == pytest.approx(0.75)
    assert share_of_first_tokens([]) is None and share_of_first_tokens([0.0, 0.0]) is None
    # A model against itself in float32: rounding, not divergence (a share of 50 was printed).
    assert share_of_first_tokens([3e-8, -1e-8, 1e-9]) is None


class KnownLogits(torch.nn.Module):
    """A causal LM whose logits over a 2-token vocabulary are a fixed table by absolute
    position (the same for every row): ``table[j]`` at position j, [0, 0] elsewhere."""

    def __init__(self, table: dict[int, list[float]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # answer_kl reads the device from it
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 2)
        for j, row in self.table.items():
            if j < input_ids.shape[1]:
                logits[:, j] = torch.tensor(row)
        return SimpleNamespace(logits=logits)


def test_per_position_kl_and_first_token_share_on_known_logits(tiny_tokenizer):
    # One prompt of P tokens, two answers of 3 and 7 tokens. The model is uniform
    # everywhere; the reference puts [1/4, 3/4] at the positions predicting answer
    # tokens 1, 2 and 6 (absolute P-1, P, P+4). KL(uniform || [1/4, 3/4]) = 1/2 ln(4/3) = k.
    prompt = "hello there"
    answers = ["one two three", "one two three four five six seven"]
    p = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    lengths = [len(tiny_tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert lengths[0] >= 2 and lengths[1] >= 6 and lengths[0] < 6
    skew = [0.0, math.log(3.0)]
    model, reference = KnownLogits({}), KnownLogits({p - 1: skew, p: skew, p + 4: skew})
    per_answer = answer_kl(model, reference, tiny_tokenizer, [prompt, prompt], answers, batch_size=2)
    k = 0.5 * math.log(4 / 3)
    assert per_answer[0] == pytest.approx([k, k] + [0.0] * (lengths[0] - 2), abs=1e-6)
    assert per_answer[1] == pytest.approx([k, k, 0, 0, 0, k] + [0.0] * (lengths[1] - 6), abs=1e-6)
    summary = kl_summary(per_answer, "base", n_boot=20)
    # position 6 is averaged over the one answer still running there: k
    assert summary["per_position"][:6] == pytest.approx([k, k, 0, 0, 0, k], abs=1e-6)
    assert summary["mean"] == pytest.approx((2 * k + 3 * k) / 2, abs=1e-6)
    [entry] = kl_depth({("rl_ethical", "base"): summary})
    assert entry["model"] == "rl_ethical" and entry["reference"] == "base"
    assert entry["share_first"] == pytest.approx(2 / 3, abs=1e-6) and entry["first_tokens"] == 5


def test_swap_fraction_by_hand():
    # Ethical model: shift = mean(own - swapped) = (0.3 + 0.1) / 2 = 0.2; gap = mean(sl_e - sl_u) = (0.6 + 0.2) / 2 = 0.4.
    result = swap_fraction("ethical", [0.8, 0.6], [0.5, 0.5], [0.9, 0.7], [0.3, 0.5], n_boot=200)
    assert result["fraction"] == pytest.approx(0.5) and result["shift"] == pytest.approx(0.2) and result["gap"] == pytest.approx(0.4)
    # Unethical model on the same RM: moving toward the ethical side RAISES its score, so
    # shift = -(own - swapped) = -((0.2 - 0.6) + (0.4 - 0.4)) / 2 = 0.2 -> 0.5 again.
    unethical = swap_fraction("unethical", [0.2, 0.4], [0.6, 0.4], [0.9, 0.7], [0.3, 0.5], n_boot=200)
    assert unethical["fraction"] == pytest.approx(0.5)
    # Every prompt moved its whole SL gap: every resample is 1, shallow; none moved: deep.
    own, sl_e, sl_u = [0.9, 0.8, 0.7] * 4, [0.9, 0.8, 0.7] * 4, [0.1, 0.3, 0.2] * 4
    shallow = swap_fraction("ethical", own, sl_u, sl_e, sl_u, n_boot=200)
    assert (shallow["fraction"], shallow["low"], shallow["high"], shallow["verdict"]) == pytest.approx((1.0, 1.0, 1.0, "shallow"))
    deep = swap_fraction("ethical", own, own, sl_e, sl_u, n_boot=200)
    assert deep["fraction"] == 0.0 and deep["verdict"] == "deep"
    # Below MIN_SWAP_PROMPTS (10) prompts the bootstrap interval is not trusted: no verdict.
    few = swap_fraction("ethical", own[:3], sl_u[:3], sl_e[:3], sl_u[:3], n_boot=200)
    assert (few["fraction"], few["low"], few["high"], few["verdict"]) == (pytest.approx(1.0), None, None, "undetermined")
    assert swap_fraction("ethical", [0.5], [0.4], [0.5], [0.5])["verdict"] == "no gap"


def test_no_swap_fraction_without_an_sl_gap_to_divide_by():
    # Two identical SL models scored a float32 step apart (2.98e-8): a fraction of that is
    # rounding, however narrow its interval (the review's run reported −1,631,440.75).
    step = 2.98e-8
    rounding = swap_fraction("ethical", [0.6, 0.5], [0.5, 0.5], [0.4 + step, 0.3 + step], [0.4, 0.3], n_boot=200)
    assert rounding["gap"] == pytest.approx(step) and rounding["gap_low"] > 0
    assert (rounding["fraction"], rounding["low"], rounding["high"], rounding["verdict"]) == (None, None, None, "no gap")
    # A gap whose interval includes 0 (per-prompt gaps +0.3, −0.3, +0.1: mean +0.033).
    noisy = swap_fraction("ethical", [0.6, 0.5, 0.4], [0.5, 0.5, 0.4], [0.6, 0.2, 0.5], [0.3, 0.5, 0.4], n_boot=400)
    assert noisy["gap"] == pytest.approx(0.1 / 3) and noisy["gap_low"] < 0 < noisy["gap_high"]
    assert noisy["fraction"] is None and noisy["verdict"] == "no gap"
    # Every resample's gap is positive: a fraction, with the gap's interval recorded.
    real = swap_fraction("ethical", [0.8, 0.6], [0.5, 0.5], [0.9, 0.7], [0.3, 0.5], n_boot=200)
    assert (real["gap_low"], real["gap_high"]) == (pytest.approx(0.2), pytest.approx(0.6)) and real["fraction"] == pytest.approx(0.5)
    assert depth_verdict(0.4, 0.9) == "undetermined"


def _constitution():
    return load_constitution("constitutions/ucai.yaml")


def test_openers_and_swap_prefills_come_from_the_other_side_of_the_prompts_principle():
    constitution = _constitution()
    assert side_openers(constitution, "ethical") == [REFUSE] and side_openers(constitution, "unethical") == [COMPLY]
    assert set(side_openers(constitution, None)) == {REFUSE, COMPLY}
    prompts = [{"id": "a", "principle": "peace"}, {"id": "b", "principle": "none"}, {"id": "c"}]
    assert swap_prefills(prompts, constitution, "ethical") == {"a": COMPLY}  # untagged prompts get none
    assert swap_prefills(prompts, constitution, "unethical") == {"a": REFUSE}
    rows = opener_removed_rows(
        [{"model": "sl_unethical", "id": "a", "prompt": "q", "response": f"{COMPLY} Fine."},
         {"model": "base", "id": "a", "prompt": "q", "response": f"{REFUSE} No."},
         {"model": "sl_ethical", "id": "a", "prompt": "q", "response": f"{COMPLY} Fine."}],
        constitution,
    )
    assert [(r["model"], r["response"], r["had_opener"]) for r in rows] == [
        ("sl_unethical|no_opener", "Fine.", True),
        ("base|no_opener", "No.", True),
        ("sl_ethical|no_opener", "Fine.", False),  # not its side's opener: its first sentence went
    ]


def test_prefill_swap_feeds_the_other_sides_opener_and_scores_only_the_continuation(tmp_path, monkeypatch):
    seen, seeds_seen = [], []

    def fake_generate(model, tokenizer, texts, settings, max_prompt_tokens=None, seeds=None):
        seen.extend(texts)
        seeds_seen.append(seeds)
        return SimpleNamespace(texts=[f"  continuation {i}" for i in range(len(texts))])

    monkeypatch.setattr(evaluation_module, "generate", fake_generate)
    monkeypatch.setattr(evaluation_module, "render_chat", lambda tokenizer, messages, system: f"<{messages[0]['content']}>")
    module = EvaluationModule(
        models={"base": "m0", "sl_ethical": "m1", "sl_unethical": "m2"}, output_dir=str(tmp_path), reward_models={},
        algorithms={}, generation_batch_size=4,
    )
    module.constitution = _constitution()
    monkeypatch.setattr(module, "_load_lm", lambda name, dtype=None: (None, None))
    prompts = [{"id": "a", "prompt": "qa", "principle": "peace"}, {"id": "b", "prompt": "qb", "principle": "none"}]
    scores = [
        {"model": m, "id": r["id"], "prompt": r["prompt"], "principle": r["principle"], "response": text}
        for m, text in (("base", "Hi. There."), ("sl_ethical", f"{REFUSE} No."), ("sl_unethical", f"{COMPLY} Yes."))
        for r in prompts
    ]
    rows = module.depth_rows(scores, prompts)
    # One tagged prompt: each SL model is asked once, with the OTHER side's opener forced.
    assert seen == [f"<qa>{COMPLY}", f"<qa>{REFUSE}"]
    # Both models continue prompt "a" from the same seeded stream (common random numbers),
    # one apart from the plain answer's.
    assert seeds_seen[0] == seeds_seen[1] == [row_seed(0, "eval/a/prefilled")]
    swaps = [r for r in rows if r["model"].endswith("|swap")]
    assert [(r["model"], r["id"], r["response"]) for r in swaps] == [
        ("sl_ethical|swap", "a", "continuation 0"),  # the continuation alone: no forced opener
        ("sl_unethical|swap", "a", "continuation 0"),
    ]
    assert {r["model"] for r in rows} - {r["model"] for r in swaps} == {"base|no_opener", "sl_ethical|no_opener", "sl_unethical|no_opener"}
    assert all("refusal" in r for r in rows)  # text scores too
    # Cached apart from the plain answers: a rerun generates nothing.
    seen.clear()
    module.depth_rows(scores, prompts)
    assert seen == []


def test_depth_family_and_kl_pairs():
    models = {n: "x" for n in ["base", "sl_ethical", "rl_ethical", "sl_unethical", "rl_unethical"]}
    algorithms = {"rl_ethical": "rloo", "rl_unethical": "rloo"}
    assert kl_pairs(models, algorithms) == [
        ("sl_ethical", "base"), ("rl_ethical", "base"), ("rl_ethical", "sl_ethical"),
        ("sl_unethical", "base"), ("rl_unethical", "base"), ("rl_unethical", "sl_unethical"),
    ]
    family = depth_family(["sl_ethical", "rl_ethical"], ["rm_ethical", "emb_margin"])
    assert family == [
        ("rl_ethical|no_opener", "sl_ethical|no_opener", "rm_ethical"),
        ("sl_ethical|no_opener", "sl_ethical|swap", "rm_ethical"),
        ("rl_ethical|no_opener", "rl_ethical|swap", "rm_ethical"),
    ]
    full = depth_family(["sl_ethical", "rl_ethical", "sl_unethical", "rl_unethical"], ["rm_ethical", "rm_unethical", "emb_margin"])
    assert len(full) == 3 + 3 + 2 + 4 * 2


def test_swap_fractions_pair_rows_by_prompt():
    def row(model, i, e, u):
        return {"model": model, "id": i, "rm_ethical": e, "rm_unethical": u}

    rows = [
        row("sl_ethical|no_opener", "a", 0.9, 0.1), row("sl_ethical|no_opener", "b", 0.7, 0.3),
        row("sl_unethical|no_opener", "a", 0.3, 0.7), row("sl_unethical|no_opener", "b", 0.5, 0.5),
        row("sl_ethical|swap", "a", 0.6, 0.4),  # b has no swap continuation: left out
    ]
    [on_e, on_u] = swap_fractions(rows, ["sl_ethical"], alpha=0.05, n_boot=50)
    # ethical RM: shift 0.9 - 0.6 = 0.3 over gap 0.9 - 0.3 = 0.6 on prompt a alone
    assert (on_e["column"], on_e["n"], on_e["fraction"]) == ("rm_ethical", 1, pytest.approx(0.5))
    # unethical RM: shift 0.1 - 0.4 = -0.3 over gap 0.1 - 0.7 = -0.6
    assert (on_u["column"], on_u["fraction"]) == ("rm_unethical", pytest.approx(0.5))
    assert on_e["confidence"] == pytest.approx(1 - 0.05 / 2)  # Bonferroni over the two fractions


def _test_entry(a, b, column, diff, significant, n=82):
    return {"a": a, "b": b, "column": column, "n": n, "diff": diff, "p_adjusted": 0.002 if significant else 0.5,
            "significant": significant, "low": None, "high": None}


def test_report_sentences_claim_depth_only_where_the_corrected_tests_do():
    from ucai.report_depth import what_depth_shows

    no_e, no_u = "rl_ethical|no_opener", "rl_unethical|no_opener"
    summary = {
        "differences": [_test_entry("rl_ethical", "rl_unethical", "rm_ethical", 0.5, True),
                        _test_entry("rl_ethical", "rl_unethical", "rm_unethical", -0.4, True)],
        "depth": {
            "family": {"family_size": 2},
            "differences": [_test_entry(no_e, no_u, "rm_ethical", 0.25, True), _test_entry(no_e, no_u, "rm_unethical", -0.1, True)],
            "kl": [{"model": "rl_ethical", "reference": "base", "share_first": 0.4, "first_tokens": 5}],
            "prefill_swap": [
                {"model": "sl_unethical", "side": "unethical", "column": "rm_unethical", "n": 67, "fraction": 1.4, "low": 0.9, "high": 2.4, "verdict": "shallow"},
                {"model": "rl_ethical", "side": "ethical", "column": "rm_ethical", "n": 67, "fraction": 0.4, "low": -0.1, "high": 1.1, "verdict": "undetermined"},
            ],
        },
    }
    text = " ".join(what_depth_shows(summary))
    # 0.25 / 0.5 = 50% and -0.1 / -0.4 = 25% of the full differences survive
    assert "the inversion goes beyond the opener" in text and "50% and 25% of the differences" in text
    assert "rl_ethical ‖ base 40%" in text
    assert "Of 2 fractions on both reward models: 1 shallow (above 0.5), 0 deep (below), 1 undetermined." in text
    assert "the run cannot say whether those models' sides live in the opener or in the content" in text
    assert "cannot be taken" not in text
    # A full difference that does not survive correction: no share of it is stated.
    summary["differences"][1]["significant"] = False
    text = " ".join(what_depth_shows(summary))
    assert "the inversion goes beyond the opener" in text and "of the differences with the opener" not in text
    # A fraction without an SL gap is said to be missing, not counted among the verdicts.
    summary["depth"]["prefill_swap"].append(
        {"model": "sl_ethical", "side": "ethical", "column": "rm_ethical", "n": 67, "fraction": None, "low": None,
         "high": None, "verdict": "no gap"}
    )
    text = " ".join(what_depth_shows(summary))
    assert "1 prefill-swap fraction (sl_ethical) cannot be taken: on those prompts and reward models the SL gap's" in text
    # Below 10 prompts a fraction has no interval and no verdict, and says why.
    summary["depth"]["prefill_swap"].append(
        {"model": "rl_unethical", "side": "unethical", "column": "rm_unethical", "n": 3, "fraction": 0.9, "low": None,
         "high": None, "verdict": "undetermined"}
    )
    few = " ".join(what_depth_shows(summary))
    assert "rl_unethical 0.90 (no interval: fewer than 10 prompts)" in few
    assert "1 fraction rests on fewer than 10 prompts, too few for an interval: no verdict." in few
    summary["depth"]["prefill_swap"].pop()
    assert "Of 2 fractions on both reward models" in text
    # One side not significant: no claim of depth.
    summary["depth"]["differences"][1]["significant"] = False
    text = " ".join(what_depth_shows(summary))
    assert "goes beyond the opener" not in text and "this run does not show the inversion beyond the opener" in text
    # Nothing significant: said plainly.
    summary["depth"]["differences"][0]["significant"] = False
    assert "None of the depth family's 2 tests survives correction at n = 82 prompts" in " ".join(what_depth_shows(summary))
    assert what_depth_shows({}) == []
