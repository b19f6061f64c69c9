"""Categorisation: the embedding decision rule, option-order debiasing, balancing, CLI runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ucai.errors import UcaiError
from ucai.stages.categorise import (
    CategoriseModule,
    balance,
    embedding_decision,
    labels_from_config,
    multiple_choice_scores,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"


def test_embedding_decision_with_none_as_a_virtual_label():
    similarities = torch.tensor([[0.30, 0.10], [0.05, 0.08]])
    choice, score = embedding_decision(similarities, threshold=0.12, temperature=0.1, confidence="softmax")
    # Row 0: scores [0.30, 0.10, none=0.12] -> label 0; softmax of [3, 1, 1.2]:
    #   e^3 / (e^3 + e^1 + e^1.2) = 20.0855 / (20.0855 + 2.7183 + 3.3201) = 0.7689
    # Row 1: scores [0.05, 0.08, none=0.12] -> none (column 2); softmax of [0.5, 0.8, 1.2]:
    #   e^1.2 / (e^0.5 + e^0.8 + e^1.2) = 3.3201 / (1.6487 + 2.2255 + 3.3201) = 0.4615
    assert choice.tolist() == [0, 2]
    assert score.tolist() == pytest.approx([0.7689, 0.4615], abs=1e-4)
    _, similarity = embedding_decision(similarities, 0.12, 0.1, "similarity")
    assert similarity.tolist() == pytest.approx([0.30, 0.08])


class _BiasedLM(torch.nn.Module):
    """A fake causal LM whose next-token logits we set by hand.

    It reads the options ``(X) text`` in the prompt and puts ``bias`` on the letter A
    (a pure first-position preference) plus ``preference`` on the letter of the option
    whose text is ``favourite`` (the content preference we want to recover).
    """

    def __init__(self, tokenizer, favourite: str, bias: float, preference: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.tokenizer = tokenizer
        self.favourite = favourite
        self.bias = bias
        self.preference = preference
        self.vocab = len(tokenizer)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        letter_id = {c: self.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCDE"}
        for row, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            options = dict((t, letter) for letter, t in re.findall(r"^\(([A-Z])\) (.*)$", text, flags=re.M))
            logits[row, -1, letter_id["A"]] += self.bias
            logits[row, -1, letter_id[options[self.favourite]]] += self.preference
        return SimpleNamespace(logits=logits)


def test_option_order_averaging_recovers_the_true_preference(tiny_tokenizer):
    # First-position bias ln 4, true preference for "fruit" ln 2 (two options).
    #   order 0 shows (A) fruit (B) cars: logits A = ln4 + ln2 = ln8, B = 0 -> p(fruit) = 8/9
    #   order 1 shows (A) cars (B) fruit: logits A = ln4, B = ln2        -> p(fruit) = 2/6 = 1/3
    #   log-probs averaged: p(fruit) ∝ √(8/9 · 1/3) = √(8/27), p(cars) ∝ √(1/9 · 2/3) = √(2/27)
    #   -> p(fruit) = √8 / (√8 + √2) = 2/3: the true preference (odds 2), bias removed;
    # averaging probabilities would give (8/9 + 1/3) / 2 = 11/18, squashed toward 1/2.
    # Order 1 alone would pick "cars" (p = 2/3) only because it is shown first.
    model = _BiasedLM(tiny_tokenizer, "fruit", bias=math.log(4), preference=math.log(2))
    probabilities = multiple_choice_scores(model, tiny_tokenizer, ["Which one?"], ["fruit", "cars"], "S")
    assert probabilities[0].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-5)
    swapped = multiple_choice_scores(model, tiny_tokenizer, ["Which one?"], ["cars", "fruit"], "S")
    assert swapped[0].tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-5)


def test_multiple_choice_categoriser_beats_a_strong_position_bias(tiny_tokenizer):
    labels = [
        {"id": "violence", "description": "Violence and weapons."},
        {"id": "privacy", "description": "Addresses and stalking."},
        {"id": "cooking", "description": "Recipes and food."},
    ]
    module = CategoriseModule(categoriser="multiple_choice", model="tiny-llama", labels=labels, system_prompt="S")
    module.tokenizer = tiny_tokenizer
    # Bias ln 20 towards A dwarfs the preference ln 3 for cooking in any single order:
    # four options (three labels + "none of these"), each shown in position A once.
    # Each option sits at A once, so averaging log-probs over the four orders adds the
    # same ln 20 / 4 to every option's mean logit: cooking ln 3, the other three 0, and
    # p(cooking) = 3 / (3 + 1 + 1 + 1) = 0.5 exactly. Every single order picks whatever
    # is at A (cooking elsewhere gets 3 / (20 + 3 + 1 + 1) = 0.12).
    module.lm = _BiasedLM(tiny_tokenizer, "Recipes and food.", bias=math.log(20), preference=math.log(3))
    names, confidence = module.categorise(["How do I bake bread?"])
    assert names == ["cooking"]
    assert confidence[0] == pytest.approx(0.5, abs=1e-5)


def test_labels_come_from_the_constitution_or_the_config():
    assert [label.id for label in labels_from_config(None, "constitutions/ucai.yaml")] == [
        "peace", "privacy", "racial_equality", "gender_equality",
    ]
    custom = labels_from_config([{"id": "a", "description": "A things"}], "unused")
    assert custom[0].id == "a" and custom[0].description == "A things"
    with pytest.raises(UcaiError, match=r"labels\[0\]"):
        labels_from_config([{"id": "a"}], "unused")
    with pytest.raises(UcaiError, match="reserved"):
        labels_from_config([{"id": "none", "description": "x"}], "unused")


def test_balance_keeps_the_most_confident_per_label_in_input_order():
    rows = [
        {"id": 1, "principle": "a", "principle_confidence": 0.5},
        {"id": 2, "principle": "b", "principle_confidence": 0.9},
        {"id": 3, "principle": "a", "principle_confidence": 0.8},
        {"id": 4, "principle": "a", "principle_confidence": 0.5},  # ties with id 1: input order wins
        {"id": 5, "principle": "none", "principle_confidence": 0.7},
    ]
    assert [r["id"] for r in balance(rows, 2)] == [1, 2, 3, 5]
    assert [r["id"] for r in balance(rows, 1)] == [2, 3, 5]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multiple_choice_run_through_the_cli(run_cli, tmp_path):
    output = tmp_path / "prompts.jsonl"
    assert run_cli("predict", "--config", CONF / "categorise_tiny.yaml", f"--model.init_args.output={output}") == 0
    rows = _rows(output)
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    allowed = {"peace", "privacy", "racial_equality", "gender_equality", "none"}
    assert all(r["principle"] in allowed and 0 < r["principle_confidence"] <= 1 for r in rows)
    # Input fields are kept; the file's own tag survives as input_principle.
    assert all(r["source"] == "ucai" and r["input_principle"] == "peace" for r in rows)
    assert (tmp_path / "prompts.csv").exists()


def test_embedding_run_with_a_custom_label_set_and_balancing(run_cli, tmp_path, caplog):
    output = tmp_path / "prompts.jsonl"
    args = ["predict", "--config", CONF / "categorise_embedding_tiny.yaml", f"--model.init_args.output={output}"]
    assert run_cli(*args) == 0
    everything = _rows(tmp_path / "prompts.all.jsonl")
    kept = _rows(output)
    assert len(everything) == 12 and {r["principle"] for r in everything} <= {"harm", "snooping", "cooking", "none"}
    # The first 12 shipped prompts are all about violence.
    assert sum(r["principle"] == "harm" for r in everything) >= 8
    counts = {}
    for row in kept:
        counts[row["principle"]] = counts.get(row["principle"], 0) + 1
    assert max(counts.values()) <= 2 and counts.get("harm") == 2
    best_harm = sorted((r for r in everything if r["principle"] == "harm"), key=lambda r: -r["principle_confidence"])[:2]
    assert {r["id"] for r in kept if r["principle"] == "harm"} == {r["id"] for r in best_harm}
    # A rerun with another cap re-balances from the complete file without categorising again.
    assert run_cli(*args, "--model.init_args.max_per_principle=1") == 0
    assert max(sum(r["principle"] == p for r in _rows(output)) for p in counts) == 1


class _ContentBiasedLM(_BiasedLM):
    """No position bias; a fixed liking for one option text, plus a real preference when
    the prompt mentions ``trigger``."""

    def __init__(self, tokenizer, liked: str, liking: float, favourite: str, preference: float, trigger: str):
        super().__init__(tokenizer, favourite, bias=0.0, preference=preference)
        self.liked, self.liking, self.trigger = liked, liking, trigger

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        letter_id = {c: self.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "AB"}
        for row, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            options = dict((t, letter) for letter, t in re.findall(r"^\(([A-Z])\) (.*)$", text, flags=re.M))
            logits[row, -1, letter_id[options[self.liked]]] += self.liking
            if self.trigger in text:
                logits[row, -1, letter_id[options[self.favourite]]] += self.preference
        return SimpleNamespace(logits=logits)


def test_calibration_divides_out_a_preference_for_one_option_text(tiny_tokenizer):
    labels = [
        {"id": "violence", "description": "Violence and weapons."},
        {"id": "cooking", "description": "Recipes and food."},
    ]
    module = CategoriseModule(
        categoriser="multiple_choice", model="tiny-llama", labels=labels, include_none=False, system_prompt="S"
    )
    module.tokenizer = tiny_tokenizer
    # The model likes "violence" by ln 4 whatever it reads, and "cooking" by ln 2 when
    # the prompt is about bread:
    #   bread prompt:  [4, 2] / 6 = [2/3, 1/3]    -> violence, wrongly
    #   "N/A" prompt:  [4, 1] / 5 = [4/5, 1/5]    (the prior)
    #   calibrated:    [2/3 / 4/5, 1/3 / 1/5] = [5/6, 5/3] -> normalised [1/3, 2/3] -> cooking
    module.lm = _ContentBiasedLM(
        tiny_tokenizer, "Violence and weapons.", math.log(4), "Recipes and food.", math.log(2), "bread"
    )
    names, confidence = module.categorise(["How do I bake bread?"])
    assert names == ["violence"] and confidence[0] == pytest.approx(2 / 3, abs=1e-4)
    module.calibrate = True
    names, confidence = module.categorise(["How do I bake bread?"])
    assert names == ["cooking"] and confidence[0] == pytest.approx(2 / 3, abs=1e-4)
