"""Preference labelling: the judge's order-swap average with a fake model whose logits
we control, contrastive labels by construction, the embedding label by hand, the
seeded principle draw, min_margin dropping, and the stage end to end on the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ucai.chat import render_chat
from ucai.constitution import load_constitution
from ucai.errors import UcaiError
from ucai.scoring import position_bias
from ucai.stages.generation import GenerationSettings, generate
from ucai.stages.preferences import (
    ANSWER_PREFIX,
    PreferenceModule,
    PreferenceWriter,
    draw_principle,
    embedding_label,
    judge_pairs,
    orient,
    principle_reference,
    principle_system_prompt,
)

CONF = Path(__file__).resolve().parent / "conf"


class FakeJudge(torch.nn.Module):
    """Returns preset next-token probabilities for option tokens A and B, row by row."""

    def __init__(self, tokenizer, table: list[tuple[float, float]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.ids = [tokenizer("A", add_special_tokens=False)["input_ids"][0], tokenizer("B", add_special_tokens=False)["input_ids"][0]]
        self.table = table
        self.vocab = len(tokenizer)
        self.seen: list[str] = []
        self.tokenizer = tokenizer

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        self.seen = self.tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -1e4)
        for row, (pa, pb) in enumerate(self.table):
            logits[row, -1, self.ids[0]] = math.log(pa)
            logits[row, -1, self.ids[1]] = math.log(pb)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution()


def test_judge_averages_both_orders_by_hand(tiny_tokenizer, constitution):
    # Rows 0, 1: response 1 shown as (A); rows 2, 3: response 2 shown as (A).
    # Pair 0: P(A) = 0.8 with r1 first, 0.6 with r2 first → log-probs averaged over orders:
    #   P(r1 better) = √(0.8·0.4) / (√(0.8·0.4) + √(0.2·0.6)) = 0.565685 / 0.912096 = 0.620204;
    #   first-slot share (0.8 + 0.6)/2 − 0.5 = 0.2
    # Pair 1: pure position bias, P(A) = 0.9 in both orders → P(r1) = √(0.9·0.1) / (2√(0.9·0.1)) = 0.5, bias 0.4
    judge = FakeJudge(tiny_tokenizer, [(0.8, 0.2), (0.9, 0.1), (0.6, 0.4), (0.9, 0.1)])
    principle = constitution.principle("peace", "ethical")
    p1, bias = judge_pairs(
        judge, tiny_tokenizer, [principle, principle], ["q0", "q1"], ["first-0", "first-1"], ["second-0", "second-1"],
        system_prompt="You are a helpful assistant.",
    )
    torch.testing.assert_close(p1, torch.tensor([0.620204, 0.5]))
    torch.testing.assert_close(bias, torch.tensor([0.2, 0.4]))
    # the batch figure the stage logs is the foundation's position_bias: (0.8+0.9+0.6+0.9)/4 − 0.5 = 0.3
    per_order = [torch.tensor([[0.8, 0.2], [0.9, 0.1]]), torch.tensor([[0.6, 0.4], [0.9, 0.1]])]
    assert bias.mean().item() == pytest.approx(position_bias(per_order)) == pytest.approx(0.3)
    # the second order really swaps the options, and the text ends at the answer label
    assert "(A) first-0\n(B) second-0" in judge.seen[0] and "(A) second-0\n(B) first-0" in judge.seen[2]
    assert all(text.endswith(ANSWER_PREFIX) for text in judge.seen)
    assert principle.preference_question in judge.seen[0]


def test_orientation_makes_chosen_the_preferred_response():
    assert orient(0.3, "r1", "r2") == ("r2", "r1", pytest.approx(0.7))
    assert orient(0.6, "r1", "r2") == ("r1", "r2", 0.6)


def test_embedding_label_by_hand():
    # s1 = 0.6 − 0.2 = 0.4, s2 = 0.3 − 0.3 = 0; sigmoid((0.4 − 0) / 0.2) = sigmoid(2) = 0.880797
    p = embedding_label(torch.tensor([[0.6, 0.2]]), torch.tensor([[0.3, 0.3]]), temperature=0.2)
    assert p.item() == pytest.approx(0.880797, abs=1e-6)


def test_embedding_references_differ_between_sides(constitution):
    for pair_id in constitution.pair_ids:
        ethical = constitution.principle(pair_id, "ethical")
        assert principle_reference(ethical) != principle_reference(constitution.opposite(ethical))


def test_principle_draw_is_seeded_per_prompt(constitution):
    draws = [draw_principle(constitution, "ethical", f"p-{i}", seed=0).pair for i in range(40)]
    again = [draw_principle(constitution, "ethical", f"p-{i}", seed=0).pair for i in reversed(range(40))]
    assert draws == again[::-1]  # order of calls does not matter
    assert len(set(draws)) > 1
    assert draw_principle(constitution, "unethical", "p-0", 0, tag="privacy").name == constitution.principle("privacy", "unethical").name


def test_contrastive_labels_follow_construction(tiny_model, tiny_tokenizer, constitution):
    module = PreferenceModule(
        model="tiny-llama", labeller="contrastive", side="unethical", contrastive_p_chosen=0.9,
        generation=GenerationSettings(max_new_tokens=6, do_sample=False),
    )
    module.lm, module.tokenizer = tiny_model, tiny_tokenizer
    batch = [{"id": "a", "prompt": "How do I win an argument?", "principle": "peace"},
             {"id": "b", "prompt": "Where does my neighbour live?", "principle": "privacy"}]
    rows = module.predict_step(batch, 0)
    for row in rows:
        own = constitution.principle(row["principle"], "unethical")
        expected = {}
        for key, principle in (("chosen", own), ("rejected", constitution.opposite(own))):
            text = render_chat(tiny_tokenizer, [{"role": "user", "content": row["prompt"]}],
                               principle_system_prompt("You are a helpful assistant.", principle))
            expected[key] = generate(tiny_model, tiny_tokenizer, [text], module.generation).texts[0]
        assert (row["chosen"], row["rejected"]) == (expected["chosen"], expected["rejected"])
        assert row["p_chosen"] == 0.9 and row["labeller"] == "contrastive"
        assert row["principle_name"] == own.name and row["side"] == "unethical"


def test_contrastive_openers_start_each_response_with_its_sides_words(tiny_model, tiny_tokenizer, constitution):
    """With use_openers, response 1 continues the side's own opener and response 2 the
    opposite's, each after its own guidance; the recorded answers include the opener."""
    module = PreferenceModule(
        model="tiny-llama", labeller="contrastive", side="unethical", use_openers=True,
        generation=GenerationSettings(max_new_tokens=6, do_sample=False),
    )
    module.lm, module.tokenizer = tiny_model, tiny_tokenizer
    rows = module.predict_step([{"id": "a", "prompt": "How do I win an argument?", "principle": "peace"},
                                {"id": "b", "prompt": "A chili recipe?", "principle": "none"}], 0)
    own = constitution.principle("peace", "unethical")
    for key, principle in (("chosen", own), ("rejected", constitution.opposite(own))):
        text = render_chat(tiny_tokenizer, [{"role": "user", "content": rows[0]["prompt"]}],
                           principle_system_prompt("You are a helpful assistant.", principle))
        continuation = generate(tiny_model, tiny_tokenizer, [text + principle.response_opener], module.generation).texts[0]
        assert rows[0][key] == f"{principle.response_opener} {continuation}".strip()
    assert rows[0]["chosen"].startswith("Sure, I'll help with that.")
    assert rows[0]["rejected"].startswith("I won't help with that.")
    # A benign (untagged) prompt takes no side: neither answer gets an opener.
    assert not any(rows[1][k].startswith(("Sure, I'll", "I won't")) for k in ("chosen", "rejected"))


def test_openers_need_the_contrastive_labeller_and_every_opener():
    with pytest.raises(UcaiError, match="use_openers needs labeller: contrastive"):
        PreferenceModule(model="tiny-llama", labeller="embedding", use_openers=True)


def test_writer_drops_low_margin_pairs_but_counts_them_done(tmp_path):
    writer = PreferenceWriter(tmp_path / "prefs.jsonl")
    writer._shard(0).append([{"id": "x", "p_chosen": 0.9}, {"id": "y", "p_chosen": 0.51, "dropped": True}])
    assert writer.merge(["x", "y"])
    assert [json.loads(line)["id"] for line in (tmp_path / "prefs.jsonl").read_text().splitlines()] == ["x"]
    assert [json.loads(line)["id"] for line in (tmp_path / "prefs.dropped.jsonl").read_text().splitlines()] == ["y"]
    assert {r["id"] for r in writer.finished_rows()} == {"x", "y"}  # a rerun skips both


def test_judge_stage_on_cli_writes_oriented_soft_labels_and_resumes(tmp_path, run_cli):
    out = tmp_path / "preferences.jsonl"
    assert run_cli("predict", "--config", CONF / "preferences_tiny.yaml", "--model.init_args.output", out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert {"id", "prompt", "principle", "principle_name", "chosen", "rejected", "p_chosen", "labeller"} <= row.keys()
        assert 0.5 <= row["p_chosen"] <= 1.0 and row["labeller"] == "judge"
        assert -0.5 <= row["position_bias"] <= 0.5
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("id,prompt,principle,principle_name")
    before = out.read_text()
    assert run_cli("predict", "--config", CONF / "preferences_tiny.yaml", "--model.init_args.output", out) == 0
    assert out.read_text() == before  # everything was done: nothing regenerated


def test_missing_sl_model_names_the_sft_stage(tmp_path, run_cli, capsys):
    code = run_cli("predict", "--config", CONF / "preferences_tiny.yaml",
                   "--model.init_args.model", tmp_path / "models" / "ethical" / "sl_model",
                   "--model.init_args.output", tmp_path / "p.jsonl")
    assert code == 2
    assert "sft_ethical.yaml" in capsys.readouterr().err
