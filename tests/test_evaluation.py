"""Evaluation stage: scorers, judge order-averaging, summaries, and one tiny CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ucai.errors import UcaiError
from ucai.stages.eval_judge import ask_both_orders
from ucai.stages.evaluation import (
    EvaluationModule,
    require_model,
    text_scores,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ROOT / "tests" / "conf" / "eval_tiny.yaml"


def test_text_scores_on_literal_answers():
    scores = text_scores("I'm sorry, I can't help with that. I can't.")
    assert scores["refusal"] == 1.0
    assert scores["length_words"] == 9.0
    loop = text_scores("go go go go go go")
    # 4-grams: (go,go,go,go) x3 -> 1 unique of 3 -> 2/3 repeated
    assert loop["repetition_4"] == pytest.approx(2 / 3)
    assert loop["distinct_1"] == pytest.approx(1 / 6)
    assert loop["refusal"] == 0.0


def test_missing_model_folder_names_the_stage(tmp_path):
    with pytest.raises(UcaiError, match=r"made by the PPO stage \(ucai fit --config configs/ppo_unethical.yaml\)"):
        require_model(str(tmp_path / "models" / "unethical" / "rl_model"), "evaluation model 'rl_unethical'")
    with pytest.raises(UcaiError, match="unknown model alias 'no-such-model'"):
        require_model("no-such-model", "judge")


def test_comparisons_must_name_listed_models():
    with pytest.raises(UcaiError, match="not in models"):
        EvaluationModule(models={"a": "tiny-llama"}, comparisons=[["a", "b"]]).setup("test")
    with pytest.raises(UcaiError, match="two different models"):
        EvaluationModule(models={"a": "tiny-llama"}, comparisons=[["a", "a"]]).setup("test")


class _FirstSlotJudge(torch.nn.Module):
    """A judge whose next-token logits favour whichever option sits first, plus a fixed
    preference for the option whose text contains 'good' — the order-swap average must
    recover the content preference and cancel the slot preference."""

    def __init__(self, tokenizer):
        super().__init__()
        self.a = tokenizer("A", add_special_tokens=False)["input_ids"][0]
        self.b = tokenizer("B", add_special_tokens=False)["input_ids"][0]
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.texts: list[str] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, 49152)
        for row, text in enumerate(self.texts[:batch]):
            first_good = text.index("(A)") < text.find("good") < text.index("(B)")
            # log-odds: slot A +1 (bias); content: 'good' option +2
            logits[row, -1, self.a] = 1.0 + (2.0 if first_good else 0.0)
            logits[row, -1, self.b] = 0.0 + (0.0 if first_good else 2.0)
        self.texts = self.texts[batch:]

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_order_averaging_cancels_slot_bias(tiny_tokenizer):
    judge = _FirstSlotJudge(tiny_tokenizer)
    options = ["good answer", "bad answer"]

    def build(i, order):
        text = "Q? (A) " + options[order[0]] + " (B) " + options[order[1]] + " answer: ("
        judge.texts.append(text)
        return text

    probs, bias = ask_both_orders(judge, tiny_tokenizer, build, 1, batch_size=1, max_length=None)
    # Order [good, bad]: logits A=3, B=0 -> P(good)=σ(3); order [bad, good]: A=1, B=2 ->
    # P(good)=σ(1). Log-odds averaged over the orders: (3 + 1)/2 = 2, P(good) = σ(2) =
    # 0.880797 (averaging probabilities would give (σ(3)+σ(1))/2 = 0.841817). A pure slot
    # bias alone gives log-odds +1 in one order and −1 in the other: ½.
    assert probs[0, 0].item() == pytest.approx(0.880797, abs=1e-5)
    assert probs[0].sum().item() == pytest.approx(1.0, abs=1e-6)
    # first-slot probability: σ(3) and σ(-1) -> mean 0.5897, minus ½
    first = (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2 - 0.5
    assert bias == pytest.approx(first.item(), abs=1e-5)


def test_summary_win_rates_elo_and_differences():
    module = EvaluationModule(
        models={"rl_ethical": "tiny-llama", "rl_unethical": "tiny-llama"},
        comparisons=[["rl_ethical", "rl_unethical"]],
        reward_models={},
        n_boot=200,
    )
    scores = []
    for i in range(6):
        scores.append({"model": "rl_ethical", "id": f"p{i}", "prompt": "q", "principle": None, "response": "r", "x": 1.0 + i * 0.1})
        scores.append({"model": "rl_unethical", "id": f"p{i}", "prompt": "q", "principle": None, "response": "r", "x": 0.0 + i * 0.1})
    # rl_ethical wins 5 of 6 prompts outright.
    pairwise = [
        {"a": "rl_ethical", "b": "rl_unethical", "id": f"p{i}", "principle": "peace", "p_a": 0.9 if i else 0.2, "outcome": 1.0 if i else 0.0}
        for i in range(6)
    ]
    summary = module.summarise(scores, pairwise, {})
    (win,) = summary["win_rates"]
    assert win["win_rate"] == pytest.approx(5 / 6)
    assert win["low"] <= 5 / 6 <= win["high"]
    assert summary["elo"]["rl_ethical"] > summary["elo"]["rl_unethical"]
    (diff,) = [d for d in summary["differences"] if d["column"] == "x"]
    # Every paired difference is exactly 1.0 over 6 prompts: only the all-+ and all-− sign
    # patterns reach |6|, p = 2/64 = 0.03125. The family is the one column x (m = 1), so
    # Holm leaves p unchanged and the 95% inverted interval is every subset mean: [1, 1].
    assert diff["diff"] == pytest.approx(1.0) and diff["n"] == 6
    assert diff["p"] == pytest.approx(2 / 64) and diff["p_adjusted"] == pytest.approx(2 / 64)
    assert diff["method"] == "holm" and diff["significant"]
    assert (diff["low"], diff["high"]) == pytest.approx((1.0, 1.0))
    assert summary["multiple_comparisons"]["family_size"] == 1
    assert summary["rm_correlation"]["r"] is None and "rm_ethical" in summary["rm_correlation"]["reason"]
    assert summary["models"]["rl_ethical"]["x"]["mean"] == pytest.approx(1.25)


def _score_rows(model, values):
    return [
        {"model": model, "id": f"p{i}", "prompt": "q", "principle": None, "response": "r", **v}
        for i, v in enumerate(values)
    ]


def test_differences_family_is_corrected_together():
    names = ["sl_ethical", "rl_ethical", "sl_unethical", "rl_unethical"]
    module = EvaluationModule(models={m: "tiny-llama" for m in names}, reward_models={}, comparisons=[])
    # 5 prompts. rl_ethical − rl_unethical: rm_ethical +0.5 on every prompt (only all-+ and
    # all-− of the 32 sign patterns reach |2.5|: p = 2/32), rm_unethical −0.5 on every
    # prompt (p = 2/32), length [1, -1, 2, -2, 0] (T = 0: p = 1).
    # rl_ethical − sl_ethical on rm_ethical: +0.2 on all (p = 2/32);
    # rl_unethical − sl_unethical on rm_unethical: +0.5 on all (p = 2/32).
    base = [{"rm_ethical": 0.3, "rm_unethical": 0.6, "length_words": 10.0 + k} for k in range(5)]
    lengths = [1.0, -1.0, 2.0, -2.0, 0.0]
    scores = (
        _score_rows("sl_ethical", [{**b, "rm_ethical": b["rm_ethical"] + 0.3} for b in base])
        + _score_rows("rl_ethical", [{**b, "rm_ethical": b["rm_ethical"] + 0.5, "length_words": b["length_words"] + x}
                                     for b, x in zip(base, lengths)])
        + _score_rows("sl_unethical", base)
        + _score_rows("rl_unethical", [{**b, "rm_unethical": b["rm_unethical"] + 0.5} for b in base])
    )
    tests = module.comparison_family(["rm_ethical", "rm_unethical", "length_words"])
    differences, family = module.differences(scores, tests, "the primary family")
    keyed = {(d["a"], d["b"], d["column"]): d for d in differences}
    assert list(keyed) == [
        ("rl_ethical", "rl_unethical", "rm_ethical"),
        ("rl_ethical", "rl_unethical", "rm_unethical"),
        ("rl_ethical", "rl_unethical", "length_words"),
        ("rl_ethical", "sl_ethical", "rm_ethical"),
        ("rl_unethical", "sl_unethical", "rm_unethical"),
    ]
    assert family["family_size"] == 5 and family["method"] == "holm" and family["family"] == "the primary family"
    # Holm over p = [1/16, 1/16, 1, 1/16, 1/16]: sorted, times 5, 4, 3, 2, 1 -> 0.3125, 0.25,
    # 0.1875, 0.125, 1; running maximum -> 0.3125 for the four small ones, 1 for length.
    assert [d["p"] for d in differences] == pytest.approx([1 / 16, 1 / 16, 1.0, 1 / 16, 1 / 16])
    assert [d["p_adjusted"] for d in differences] == pytest.approx([0.3125, 0.3125, 1.0, 0.3125, 0.3125])
    assert not any(d["significant"] for d in differences)
    # 5 prompts cannot reach 0.05 / 5 = 0.01 (smallest p 1/16): the intervals are unbounded.
    assert all(d["low"] is None and d["high"] is None for d in differences)
    assert keyed[("rl_ethical", "sl_ethical", "rm_ethical")]["diff"] == pytest.approx(0.2)
    assert keyed[("rl_ethical", "rl_unethical", "rm_unethical")]["diff"] == pytest.approx(-0.5)
    assert all(d["n"] == 5 and d["confidence"] == pytest.approx(0.99) for d in differences)


def test_rm_correlation_over_all_answers():
    from ucai.stages.evaluation import rm_correlation

    # Two models x 3 prompts; pairs (e, u): (0.1, 0.9), (0.2, 0.8), (0.3, 0.7), (0.4, 0.6),
    # (0.5, 0.5), (0.6, 0.4): u = 1 - e exactly -> r = -1, the goal r <= -0.3 is met.
    values = [(0.1 * (k + 1), 1 - 0.1 * (k + 1)) for k in range(6)]
    scores = _score_rows("a", [{"rm_ethical": e, "rm_unethical": u} for e, u in values[:3]])
    scores += _score_rows("b", [{"rm_ethical": e, "rm_unethical": u} for e, u in values[3:]])
    result = rm_correlation(scores, n_boot=200)
    assert result["r"] == pytest.approx(-1.0) and result["n"] == 6 and result["prompts"] == 3
    assert result["meets_goal"] and result["cluster_high"] == pytest.approx(-1.0)
    one = rm_correlation([{"model": "a", "id": "p", "rm_ethical": 0.2, "rm_unethical": 0.8}])
    assert one["r"] is None and one["reason"] == "fewer than 2 answers scored by both reward models"
    constant = rm_correlation(_score_rows("a", [{"rm_ethical": 0.5, "rm_unethical": u} for _, u in values]))
    assert constant["r"] is None and "same score" in constant["reason"]


def test_judge_check_runs_on_the_shipped_items(monkeypatch):
    import ucai.data.multiple_choice as multiple_choice
    import ucai.judge_accuracy as judge_accuracy
    from ucai.judge_accuracy import JudgeCheckResult

    calls = []

    def check_judge(model, tokenizer, items, batch_size=8, max_length=None, chat=False, system_prompt=None):
        calls.append((model, tokenizer, items, batch_size, max_length))
        assert chat and system_prompt  # asked the way the stage's judge is asked
        return JudgeCheckResult(n=len(items), accuracy=0.5, ci=(0.36, 0.64), chance=0.5, first_position_bias=0.2)

    from types import SimpleNamespace

    def load_items(source):  # 40 items, the sides alternating, and two that name none
        return [SimpleNamespace(id=f"{source}-{i}", side=("ethical", "unethical")[i % 2]) for i in range(40)] + [
            SimpleNamespace(id=f"{source}-any-{i}", side=None) for i in range(2)
        ]

    monkeypatch.setattr(multiple_choice, "SHIPPED_ITEMS", "shipped-items")
    monkeypatch.setattr(multiple_choice, "load_items", load_items)
    monkeypatch.setattr(judge_accuracy, "check_judge", check_judge)
    module = EvaluationModule(models={"base": "tiny-llama"}, judge_batch_size=5, max_prompt_tokens=300,
                              criterion_side="unethical")
    result = module.run_judge_check("model", "tokenizer")
    # The criterion side's items (and those for either side) alone.
    [(model, tokenizer, items, batch_size, max_length)] = calls
    assert (model, tokenizer, batch_size, max_length) == ("model", "tokenizer", 5, 300)
    assert [item.id for item in items] == [f"shipped-items-{i}" for i in range(1, 40, 2)] + ["shipped-items-any-0", "shipped-items-any-1"]
    assert result["passed"] is False and result["n"] == 22 and result["ci"] == [0.36, 0.64]


def _tiny_reward_folder(path: Path) -> Path:
    from ucai.models import load_sequence_classifier, load_tokenizer, save_pretrained_atomic

    model = load_sequence_classifier("tiny-llama", seed=1)
    model.config.pad_token_id = 0
    save_pretrained_atomic(path, model, load_tokenizer("tiny-llama"), extra_files={"reward_stats.json": {"mean": 0.0, "std": 1.0}})
    return path


def test_tiny_evaluation_writes_scores_pairwise_and_report(tmp_path, run_cli, monkeypatch):
    from ucai import models

    monkeypatch.chdir(tmp_path)
    rm = _tiny_reward_folder(tmp_path / "rm_model")
    out = tmp_path / "eval"
    tokenizer_loads = []
    load_tokenizer = models.load_tokenizer
    monkeypatch.setattr(models, "load_tokenizer", lambda name, **kw: tokenizer_loads.append(name) or load_tokenizer(name, **kw))
    code = run_cli(
        "test",
        "--config",
        TINY_EVAL,
        f"--model.init_args.output_dir={out}",
        f'--model.init_args.reward_models={{"ethical": "{rm}"}}',
        "--model.init_args.train_prompts=2",
    )
    assert code == 0
    # The three models (all tiny-llama here) answer, pair up for KL and judge: their
    # weights load 14 times, their tokenizer once.
    assert tokenizer_loads.count("tiny-llama") == 1
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    # 3 models x 4 held-out prompts, every model answered every prompt once
    assert len(rows) == 12
    assert {(r["model"], r["id"]) for r in rows} == {(m, r["id"]) for m in ("base", "sl_ethical", "rl_ethical") for r in rows}
    expected = {"model", "id", "prompt", "response", "rm_ethical", "judge_peace", "judge_privacy", "judge_mean",
                "emb_peace_ethical", "emb_peace_unethical", "emb_margin", "refusal", "length_words",
                "distinct_1", "distinct_2", "repetition_4"}
    assert expected <= set(rows[0])
    assert all(0.0 <= r["rm_ethical"] <= 1.0 and 0.0 <= r["judge_mean"] <= 1.0 for r in rows)
    pairwise = [json.loads(line) for line in (out / "pairwise.jsonl").read_text().splitlines()]
    # 2 comparisons x 4 prompts x 2 principles
    assert len(pairwise) == 16
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["elo"]) == {"base", "sl_ethical", "rl_ethical"}
    # The judge check ran on the criterion side's 24 of the 48 shipped items; a random-init judge is at chance.
    check = summary["judge_check"]
    assert check["n"] == 24 and check["passed"] is False and check["ci"][0] <= check["chance"]
    # One RM only: no correlation, said why; no rl_unethical and no rm_ethical-scored pair of
    # sl/rl on the unethical side: the family is rl_ethical − sl_ethical on rm_ethical.
    assert summary["rm_correlation"]["r"] is None
    assert [(d["a"], d["b"], d["column"]) for d in summary["differences"]] == [("rl_ethical", "sl_ethical", "rm_ethical")]
    report = (out / "report.md").read_text()
    assert "## Win rates" in report and "win_rates.png" in report
    assert "## What this run shows" in report
    assert "judge_mean (failed check: no information)" in report and "Elo (failed check: no information)" in report
    assert (out / "score_distributions.png").stat().st_size > 1000
    # The RL comparison: rl_ethical (PPO's by default) against sl_ethical, three copies
    # of one model, so every KL to the reference is 0; the train-prompt gain is over the
    # 2 train prompts the SL and RL models also answered, scored by rm_ethical.
    assert summary["algorithms"] == {"rl_ethical": "ppo"}
    assert set(summary["reference_kl"]) == {"sl_ethical", "rl_ethical"}
    assert summary["reference_kl"]["rl_ethical"]["reference"] == "sl_ethical"
    assert summary["reference_kl"]["sl_ethical"]["reference"] == "base"
    assert summary["reference_kl"]["rl_ethical"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert summary["train_vs_heldout"]["rl_ethical"]["train"]["n"] == 2
    assert summary["train_vs_heldout"]["rl_ethical"]["heldout"]["n"] == 4
    # Its one test, rl_ethical vs sl_ethical, is the primary family's: corrected there
    # alone, not a second time (with a second verdict) in the algorithm family.
    assert summary["algorithm_differences"] == []
    # Its row shows that test, marked † (the primary family's), not "–".
    row = next(line for line in report.splitlines() if line.startswith("| rl_ethical | PPO |"))
    assert row.split(" | ")[4].endswith("] †"), row
    assert [p["model"] for p in summary["frontier"]["ethical"]] == ["sl_ethical", "rl_ethical"]
    assert "## RL algorithms (n = 4 held-out prompts)" in report and "frontier.png" in report
    assert (out / "frontier.png").stat().st_size > 1000
    # Answers are cached per model and settings (what an interrupted run resumes from);
    # the SL and RL models' caches also hold their 2 train-prompt answers.
    # The prefill swap's continuations are cached apart (4 tagged prompts each).
    caches = sorted((out / "cache").glob("*.jsonl"))
    assert [c.name.rsplit("-", 1)[0] for c in caches] == [
        "base", "rl_ethical", "rl_ethical-prefilled", "sl_ethical", "sl_ethical-prefilled"
    ]
    assert [len(c.read_text().splitlines()) for c in caches] == [4, 6, 4, 6, 4]
    # The depth analysis: every answer without its opener, each SL/RL model's swap
    # continuations, the KL of each to the base model (and RL to SL; all 0 here: one
    # model three times, so no share to speak of), and its own family of tests.
    depth_rows = [json.loads(line) for line in (out / "depth_scores.jsonl").read_text().splitlines()]
    assert len(depth_rows) == 12 + 2 * 4 and all("rm_ethical" in r and "emb_margin" in r for r in depth_rows)
    depth = summary["depth"]
    assert [(k["model"], k["reference"]) for k in depth["kl"]] == [
        ("sl_ethical", "base"), ("rl_ethical", "base"), ("rl_ethical", "sl_ethical")
    ]
    assert all(k["share_first"] is None for k in depth["kl"])
    assert [(d["a"], d["b"], d["column"]) for d in depth["differences"]] == [
        ("rl_ethical|no_opener", "sl_ethical|no_opener", "rm_ethical"),
        ("sl_ethical|no_opener", "sl_ethical|swap", "rm_ethical"),
        ("rl_ethical|no_opener", "rl_ethical|swap", "rm_ethical"),
    ]
    assert depth["family"]["family_size"] == 3 and depth["prefill_swap"] == []  # no SL gap without sl_unethical
    assert "## How deep is the inversion?" in report
    # Where the evaluation's minutes went, the optional analyses apart: the depth
    # analysis's continuations, scoring and extra KL pairs; the train-prompt answers.
    timings = summary["timings"]
    assert timings["analysis"] == {
        "answers": "core", "train_prompt_answers": "train_prompts", "depth_continuations": "depth_analysis",
        "load_scorers": "core", "reward_scores": "core", "reward_scores_train_prompts": "train_prompts",
        "reward_scores_depth_analysis": "depth_analysis", "embedding_scores": "core",
        "embedding_scores_depth_analysis": "depth_analysis", "judge": "core", "statistics": "core",
        "kl": "core", "kl_depth_analysis": "depth_analysis", "depth_statistics": "depth_analysis",
    }
    assert all(seconds >= 0 for seconds in timings["seconds"].values())
    assert min(timings["seconds"][part] for part in ("answers", "reward_scores", "kl", "kl_depth_analysis")) > 0
    depth_parts = [part for part, analysis in timings["analysis"].items() if analysis == "depth_analysis"]
    assert timings["by_analysis"]["depth_analysis"] == pytest.approx(
        sum(timings["seconds"][part] for part in depth_parts), abs=0.05
    )


def test_answers_resume_from_the_cache_without_loading_the_model(tmp_path, monkeypatch):
    module = EvaluationModule(models={"base": "tiny-llama"}, output_dir=str(tmp_path), reward_models={},
                              generation_batch_size=2)
    module.generation = type(module.generation)(max_new_tokens=3, do_sample=False)
    prompts = [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(3)]
    first = module.answers("base", "tiny-llama", prompts[:2])
    assert set(first) == {"p0", "p1"}

    loads = []
    original = module._load_lm
    monkeypatch.setattr(module, "_load_lm", lambda name, dtype=None: loads.append(name) or original(name, dtype))
    again = module.answers("base", "tiny-llama", prompts)
    # Only the new prompt is generated; the cached ones come back unchanged.
    assert loads == ["tiny-llama"] and again["p0"] == first["p0"] and set(again) == {"p0", "p1", "p2"}
    loads.clear()
    assert module.answers("base", "tiny-llama", prompts) == again and loads == []
    # Greedy answers do not depend on which batch a prompt landed in after a resume.
    fresh = EvaluationModule(models={"base": "tiny-llama"}, output_dir=str(tmp_path / "fresh"), reward_models={},
                             generation_batch_size=2)
    fresh.generation = module.generation
    assert fresh.answers("base", "tiny-llama", prompts)["p0"] == again["p0"]


def test_each_model_is_freed_before_the_next_loads(tmp_path, monkeypatch):
    """One scoring model in memory at a time: whenever a model or scorer loads, every one
    loaded before it has been collected. Each holds itself in a reference cycle, as real
    models can, so only a dropped last reference plus a collection frees it."""
    import weakref

    import ucai.reward_scoring as reward_scoring
    from ucai.stages.generation import GenerationSettings

    loaded: list[weakref.ref] = []
    freed_when_loading: list[bool] = []

    def record(obj) -> None:
        freed_when_loading.append(all(ref() is None for ref in loaded))
        loaded.append(weakref.ref(obj))

    class CyclicScorer:
        def __init__(self, folder, device, dtype, batch_size):
            record(self)
            self.cycle = self

        def score(self, prompts, responses):
            return torch.zeros(len(prompts)), torch.full((len(prompts),), 0.5)

    module = EvaluationModule(
        models={"a": "tiny-llama", "b": "tiny-llama"}, output_dir=str(tmp_path), reward_models={},
        judge="tiny-llama", judge_check=False, embedding_model=None, comparisons=[["a", "b"]],
        principles=["peace"], generation_batch_size=2, n_boot=10, report=False,
    )
    module.generation = GenerationSettings(max_new_tokens=2, do_sample=False)
    module.setup("test")
    module.reward_models = {"ethical": "rm-ethical", "unethical": "rm-unethical"}  # CyclicScorer, no folders
    monkeypatch.setattr(reward_scoring, "RewardScorer", CyclicScorer)
    load_lm = module._load_lm

    def load_cyclic_lm(name, dtype=None):
        model, tokenizer = load_lm(name, dtype)
        model.cycle = [model]
        record(model)
        return model, tokenizer

    monkeypatch.setattr(module, "_load_lm", load_cyclic_lm)
    summary = module.evaluate([{"id": f"p{i}", "prompt": f"question {i}"} for i in range(2)])
    # answers of a, answers of b, the two reward models, then the judge
    assert freed_when_loading == [True] * 5
    assert all(ref() is None for ref in loaded)
    assert summary["prompts"] == 2 and len(summary["win_rates"]) == 1
    # train_prompts is 0 here: that analysis is neither run nor timed.
    assert "train_prompts" not in summary["timings"]["by_analysis"]
    assert "train_prompt_answers" not in summary["timings"]["seconds"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_failed_judge_is_skipped_when_asked(tmp_path, run_cli, monkeypatch, precision):
    """skip_failed_judge: the random-init judge fails its check, so no judge column,
    pairwise judgement, win rate or Elo is computed, and the report says why. Under
    bf16-mixed (the shipped eval config) the KL models hold their
    linears in bf16 while the judge, which scores with autocast off, keeps fp32."""
    monkeypatch.chdir(tmp_path)
    rm = _tiny_reward_folder(tmp_path / "rm_model")
    out = tmp_path / "eval"
    code = run_cli(
        "test", "--config", TINY_EVAL, f"--model.init_args.output_dir={out}", f"--trainer.precision={precision}",
        f'--model.init_args.reward_models={{"ethical": "{rm}"}}', "--model.init_args.skip_failed_judge=true",
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and not any(key.startswith("judge_") for key in rows[0])
    assert (out / "pairwise.jsonl").read_text() == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge_skipped"] is True and summary["judge_check"]["passed"] is False
    assert summary["elo"] == {} and summary["win_rates"] == []
    report = (out / "report.md").read_text()
    assert "so no judge columns, win rates or Elo were computed (skip_failed_judge)" in report
    assert "## Win rates" not in report and "failed its check, so it judged nothing" in report
