"""The evaluation's RL-algorithm comparison: exact KL to the reference per answer position,
the algorithm family of tests, the reward–KL frontier points and train vs held-out gains."""

from __future__ import annotations

import math

import pytest
import torch

from ucai.stages.rl_comparison import (
    algorithm_family,
    answer_kl,
    exact_kl_per_token,
    frontier_points,
    gain_on_prompts,
    kl_summary,
    reference_of,
    side_of_model,
)

ALGORITHMS = {"rl_ethical": "ppo", "rl_unethical": "ppo", "dpo_ethical": "dpo", "dpo_unethical": "dpo", "rloo_ethical": "rloo"}
MODELS = {name: "x" for name in ["base", "sl_ethical", "sl_unethical", *ALGORITHMS]}


def test_exact_kl_by_hand():
    # p = softmax([0, 0]) = [1/2, 1/2]; q = softmax([0, ln 3]) = [1/4, 3/4]:
    # KL(p || q) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410...
    # and KL(q || q) = 0 at the second position.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    reference = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    kl = exact_kl_per_token(logits, reference)
    assert kl.shape == (1, 2)
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-7)


def test_answer_kl_per_position_matches_one_unpadded_forward(tiny_tokenizer):
    from ucai.models import load_causal_lm

    model, reference = load_causal_lm("tiny-llama", seed=0), load_causal_lm("tiny-llama", seed=1)
    # the longest row first and batches of 2: the batches are length-sorted, and the
    # answers must come back in their own order
    prompts = ["a much longer question than the first one", "hello there", "hi"]
    answers = ["no, and that is a long answer too", "ok then", "yes"]
    got = answer_kl(model, reference, tiny_tokenizer, prompts, answers, batch_size=2)
    assert [len(values) for values in got] == [len(tiny_tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    # The same numbers from each row alone (no padding in the batch): the padded batch
    # reads every answer token at the position that predicts it.
    for prompt, answer, values in zip(prompts, answers, got, strict=True):
        p_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            kl = exact_kl_per_token(model(input_ids=ids).logits, reference(input_ids=ids).logits)[0]
        assert values == pytest.approx(kl[len(p_ids) - 1 : -1].tolist(), abs=1e-5)
    assert all(v > 0 for values in got for v in values)  # two different random models
    same = answer_kl(model, model, tiny_tokenizer, prompts, answers)
    assert all(v == pytest.approx(0.0, abs=1e-6) for values in same for v in values)


def test_kl_summary_averages_each_position_over_the_answers_still_running():
    summary = kl_summary([[1.0, 2.0, 3.0], [0.5], []], reference="sl_ethical", n_boot=50)
    # totals 6, 0.5, 0 -> mean 6.5 / 3; position 1: (1 + 0.5) / 2, 2: 2 / 1, 3: 3 / 1
    assert summary["mean"] == pytest.approx(6.5 / 3) and summary["n"] == 3
    assert summary["per_position"] == pytest.approx([0.75, 2.0, 3.0])
    assert summary["reference"] == "sl_ethical" and summary["low"] <= summary["mean"] <= summary["high"]


def test_references_and_sides():
    assert side_of_model("rloo_unethical") == "unethical" and side_of_model("rloo_ethical") == "ethical"
    assert side_of_model("base") is None
    assert reference_of("dpo_unethical", ALGORITHMS, MODELS) == "sl_unethical"
    assert reference_of("sl_ethical", ALGORITHMS, MODELS) == "base"
    assert reference_of("base", ALGORITHMS, MODELS) is None
    assert reference_of("rl_ethical", ALGORITHMS, {"rl_ethical": "x"}) is None  # its SL model is not evaluated


def test_algorithm_family_lists_gains_then_side_differences():
    family = algorithm_family(MODELS, ALGORITHMS, ["rm_ethical", "rm_unethical"])
    assert family == [
        ("rl_ethical", "sl_ethical", "rm_ethical"),
        ("rl_unethical", "sl_unethical", "rm_unethical"),
        ("dpo_ethical", "sl_ethical", "rm_ethical"),
        ("dpo_unethical", "sl_unethical", "rm_unethical"),
        ("rloo_ethical", "sl_ethical", "rm_ethical"),
        # rloo has no unethical model here: no side difference for it
        ("rl_ethical", "rl_unethical", "rm_ethical"),
        ("rl_ethical", "rl_unethical", "rm_unethical"),
        ("dpo_ethical", "dpo_unethical", "rm_ethical"),
        ("dpo_ethical", "dpo_unethical", "rm_unethical"),
        # the algorithms of one side against each other, on that side's reward model
        ("rl_ethical", "dpo_ethical", "rm_ethical"),
        ("rl_ethical", "rloo_ethical", "rm_ethical"),
        ("dpo_ethical", "rloo_ethical", "rm_ethical"),
        ("rl_unethical", "dpo_unethical", "rm_unethical"),
    ]
    # Without the unethical reward model, only the tests on the ethical one remain.
    assert algorithm_family(MODELS, ALGORITHMS, ["rm_ethical"])[-1] == ("dpo_ethical", "rloo_ethical", "rm_ethical")


def test_frontier_points_put_sl_at_zero_and_each_algorithm_at_its_kl():
    stats = {name: {"rm_ethical": {"mean": 0.5 + i / 10, "low": 0.4, "high": 0.9}} for i, name in enumerate(MODELS)}
    kls = {"rl_ethical": {"mean": 2.0, "low": 1.5, "high": 2.5}, "dpo_ethical": {"mean": 4.0, "low": 3.0, "high": 5.0}}
    points = frontier_points(stats, kls, ALGORITHMS)
    assert list(points) == ["ethical"]  # no rm_unethical column: no unethical frontier
    rows = {row["model"]: row for row in points["ethical"]}
    assert list(rows) == ["sl_ethical", "rl_ethical", "dpo_ethical"]  # rloo has no KL measured
    assert (rows["sl_ethical"]["kl"], rows["sl_ethical"]["score"]) == (0.0, pytest.approx(0.6))
    assert (rows["dpo_ethical"]["kl"], rows["dpo_ethical"]["algorithm"]) == (4.0, "dpo")
    assert rows["rl_ethical"]["score"] == pytest.approx(stats["rl_ethical"]["rm_ethical"]["mean"])


def test_gain_on_prompts_pairs_by_prompt():
    scores = [
        {"model": "sl_ethical", "id": "a", "rm_ethical": 0.2},
        {"model": "sl_ethical", "id": "b", "rm_ethical": 0.4},
        {"model": "rl_ethical", "id": "a", "rm_ethical": 0.5},
        {"model": "rl_ethical", "id": "b", "rm_ethical": 0.5},
        {"model": "rl_ethical", "id": "c", "rm_ethical": 0.9},  # no SL answer: not paired
    ]
    gain = gain_on_prompts(scores, "rl_ethical", "sl_ethical", "rm_ethical", n_boot=50)
    assert gain["n"] == 2 and gain["gain"] == pytest.approx((0.3 + 0.1) / 2)
    assert gain_on_prompts([], "rl_ethical", "sl_ethical", "rm_ethical", n_boot=50) is None


def _test(a, b, column, diff, significant, p_adjusted):
    return {"a": a, "b": b, "column": column, "n": 82, "diff": diff, "low": diff - 0.05, "high": diff + 0.05,
            "p": p_adjusted / 4, "p_adjusted": p_adjusted, "significant": significant}


def test_report_section_and_sentences_claim_only_corrected_gains(tmp_path):
    from ucai.report_rl import algorithm_section, plot_frontier, what_algorithms_show

    algorithms = {"rl_ethical": "ppo", "rl_unethical": "ppo", "dpo_ethical": "dpo", "dpo_unethical": "dpo"}
    summary = {
        "prompts": 82,
        "algorithms": algorithms,
        "models": {name: {f"rm_{side_of_model(name)}": {"mean": 0.6}} for name in algorithms},
        "reference_kl": {name: {"mean": 3.0, "low": 2.5, "high": 3.5} for name in algorithms},
        "algorithm_differences": [
            _test("rl_ethical", "sl_ethical", "rm_ethical", 0.10, True, 0.001),
            _test("rl_unethical", "sl_unethical", "rm_unethical", 0.02, False, 0.4),
            _test("dpo_ethical", "sl_ethical", "rm_ethical", 0.08, True, 0.002),
            _test("dpo_unethical", "sl_unethical", "rm_unethical", 0.06, True, 0.01),
            _test("rl_ethical", "dpo_ethical", "rm_ethical", 0.02, False, 0.5),
        ],
        "algorithm_family": {"family_size": 5, "family": "the algorithm family", "method": "holm", "alpha": 0.05},
        "train_vs_heldout": {"rl_ethical": {"train": {"n": 82, "gain": 0.3, "low": 0.2, "high": 0.4}}},
        "frontier": {
            "ethical": [
                {"model": "sl_ethical", "algorithm": "sl", "kl": 0.0, "kl_low": 0.0, "kl_high": 0.0, "score": 0.5, "score_low": 0.45, "score_high": 0.55},
                {"model": "rl_ethical", "algorithm": "ppo", "kl": 3.0, "kl_low": None, "kl_high": 3.5, "score": 0.6, "score_low": 0.55, "score_high": 0.65},
            ]
        },
    }
    sentences = what_algorithms_show(summary)
    # PPO's unethical gain does not survive correction; DPO's gains both do; the
    # head-to-head test did not reject, so no algorithm is ranked above the other.
    assert sentences[0].startswith("PPO adds to SL on the ethical side; this run does not show a gain on the other")
    assert sentences[0].endswith("n = 82 prompts).")
    assert sentences[1].startswith("DPO adds to SL on both sides")
    assert sentences[2] == "This run does not show two algorithms differing on a side's own reward model after correction (1 test)."
    assert len(sentences) == 3 and not any("largest" in sentence for sentence in sentences)
    # A significant loss is said, not hidden among "no gain".
    summary["algorithm_differences"][1] = _test("rl_unethical", "sl_unethical", "rm_unethical", -0.05, True, 0.01)
    assert what_algorithms_show(summary)[0].startswith(
        "PPO adds to SL on the ethical side; this run does not show a gain on the other, and falls below SL on the unethical side"
    )
    # A test the primary family holds is read from there, where it was corrected alone.
    summary["differences"] = [_test("rl_unethical", "sl_unethical", "rm_unethical", 0.02, True, 0.03)]
    assert "unethical +0.020 (adjusted p 0.030)" in what_algorithms_show(summary)[0]
    lines = "\n".join(algorithm_section(summary, None))
    assert "| rl_unethical | PPO | 0.600 | 3.00 [2.50, 3.50] | +0.020 [" in lines and "] † | 0.030 |" in lines
    assert "| rl_ethical | PPO |" in lines and "| rl_ethical | PPO | 0.600 | – |" not in lines
    lines = "\n".join(algorithm_section(summary, plot_frontier(summary, tmp_path / "frontier.png")))
    assert "| rl_ethical | PPO | 0.600 | 3.00 [2.50, 3.50] | +0.100 [0.050, 0.150] | 0.001 | +0.300 [0.200, 0.400] (n = 82) |" in lines
    assert "| dpo_unethical | DPO |" in lines and "5 tests: the algorithm family" in lines
    assert "![Reward–KL frontier (held-out)](frontier.png)" in lines
    assert (tmp_path / "frontier.png").stat().st_size > 1000
    assert algorithm_section({"algorithms": {}}, None) == []
