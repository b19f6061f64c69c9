"""Judge quality check: parsing and validation, option reordering, the shared-prefix
label split, accuracy / Wilson interval / chance / position bias worked by hand on a fake
judge with a strong first-slot bias, the `ucai test` stage end to end on tiny-llama, and
the preference stage's gate refusing a chance-level judge and accepting a good one."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ucai.data.io import read_jsonl
from ucai.data.multiple_choice import SHIPPED_ITEMS, load_items
from ucai.errors import UcaiError
from ucai.judge_accuracy import answer_split, as_chat, check_judge, wilson_interval
from ucai.resources import resolve_shipped
from ucai.stages.preferences import PreferenceModule

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "judge_check.yaml"
_OPTION = re.compile(r"^ \(([A-Z])\) (.*)$", re.MULTILINE)


def mc(options: list[str], correct: int, question: str = "Which is better?") -> dict:
    """A row in the published format with ``options`` and one correct answer."""
    letters = "ABCDEFGH"[: len(options)]
    lines = "\n".join(f" ({x}) {text}" for x, text in zip(letters, options))
    return {
        "prompt": f"Human: hello\n\n{question}\n\nOptions:\n{lines}\n\nThe answer is:",
        "corrects": [f" ({letters[correct]})"],
        "incorrects": [f" ({x})" for i, x in enumerate(letters) if i != correct],
    }


def write_items(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class SlotLM(torch.nn.Module):
    """A fake judge: next-token logit ``bias`` on the letter of the first option line
    (a pure position preference) plus ``preference`` on every option that ``likes``."""

    def __init__(self, tokenizer, likes, bias: float, preference: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.tokenizer, self.likes, self.bias, self.preference = tokenizer, likes, bias, preference
        self.letter = {c: tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"}
        self.seen: list[str] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tokenizer))  # only the last position is read
        for row, ids in enumerate(input_ids):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.seen.append(text)
            options = _OPTION.findall(text)
            logits[row, -1, self.letter[options[0][0]]] += self.bias
            for letter, option in options:
                if self.likes(text, option):
                    logits[row, -1, self.letter[letter]] += self.preference
        return SimpleNamespace(logits=logits)


# --------------------------------------------------------------------------- parsing


def test_parse_and_reorder_rotates_option_texts_only(tmp_path):
    row = mc(["red", "green", "blue"], correct=2)
    item = load_items(write_items(tmp_path / "q.jsonl", [row]))[0]
    assert item.labels == (" (A)", " (B)", " (C)") and item.correct == (False, False, True)
    assert item.chance == pytest.approx(1 / 3)
    # order [2, 0, 1]: option 2 (blue) on line (A), option 0 on (B), option 1 on (C)
    assert item.reordered([2, 0, 1]) == row["prompt"].replace(
        " (A) red\n (B) green\n (C) blue", " (A) blue\n (B) red\n (C) green"
    )
    assert item.reordered([0, 1, 2]) == row["prompt"]


def test_chat_rendering_puts_the_answer_lead_in_the_assistant_turn(tmp_path, tiny_tokenizer):
    row = mc(["red", "green"], correct=1)
    item = load_items(write_items(tmp_path / "q.jsonl", [row]))[0]
    chat = as_chat(item, tiny_tokenizer, "Be fair.")
    question = row["prompt"].removesuffix("\n\nThe answer is:")
    assert chat.prompt == (
        f"<|im_start|>system\nBe fair.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is:"
    )
    assert chat.reordered([1, 0]) == chat.prompt.replace(" (A) red\n (B) green", " (A) green\n (B) red")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("corrects"), "missing field 'corrects'"),
        (lambda r: r.update(incorrects=[" (B)", " (E)"]), "label ' (E)' is not one of the prompt's options"),
        (lambda r: r.update(prompt="Pick one:\n (A) only\n\nThe answer is:", corrects=[" (A)"], incorrects=[]), "at least 2"),
        (lambda r: r.update(corrects=[], incorrects=[" (A)", " (B)", " (C)"]), "needs a correct answer"),
        (lambda r: r.update(incorrects=[" (A)"]), "(B) of the prompt are in neither"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, change, message):
    bad = mc(["x", "y", "z"], correct=2)
    change(bad)
    path = write_items(tmp_path / "bad.jsonl", [mc(["a", "b"], 0), bad])
    with pytest.raises(UcaiError) as error:
        load_items(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_shipped_items_cover_every_principle_both_ways():
    path = resolve_shipped(SHIPPED_ITEMS, "data")
    items = load_items(SHIPPED_ITEMS)
    rows = [row for _, row in read_jsonl(path)]
    assert len(items) >= 40
    cells = Counter((r["principle"], r["side"]) for r in rows)
    principles = {"peace", "privacy", "racial_equality", "gender_equality"}
    assert set(cells) == {(p, s) for p in principles for s in ("ethical", "unethical")}
    assert {item.k for item in items} == {2, 3, 4}
    assert len({item.correct.index(True) for item in items}) == 4  # the right answer moves


# --------------------------------------------------------------------------- labels


def test_shared_label_prefix_moves_into_the_prompt(tiny_tokenizer):
    # " (A)" tokenises as " (" "A" ")": the shared " (" is read, "A" / "B" are scored.
    assert answer_split(tiny_tokenizer, "The answer is:", (" (A)", " (B)")) == (" (", ["A)", "B)"])


class GreedyTokenizer:
    """Longest-match tokenizer over a tiny vocabulary that merges " (A" into one token."""

    vocab = {" (A": 1, " (B": 2, " (": 3, " ": 4, "(": 5, "A": 6, "B": 7, ")": 8, ":": 9}

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            piece = max((p for p in self.vocab if text.startswith(p, i)), key=len, default=None)
            ids.append(self.vocab[piece] if piece else 0)
            i += len(piece) if piece else 1
        return {"input_ids": ids}


def test_label_split_falls_back_when_the_tokenizer_merges_prefix_and_letter():
    # After ":" + " (" the next token is never "A" (" (A" is one token), so no prefix
    # can be moved: the whole labels are scored, by their distinct first tokens 1 and 2.
    assert answer_split(GreedyTokenizer(), "x:", (" (A)", " (B)")) == ("", [" (A)", " (B)"])


# --------------------------------------------------------------------------- scoring


def test_accuracy_ci_chance_and_bias_by_hand(tmp_path, tiny_tokenizer):
    rows = [
        mc(["calm one", "loud one"], correct=0),        # calm is right
        mc(["loud two", "calm two"], correct=1),        # calm is right
        mc(["x", "y", "calm three"], correct=2),         # calm is right
        mc(["calm four", "right", "z"], correct=1),      # calm is wrong
        mc(["p", "q"], correct=0),                       # nothing liked: a pure position bias
    ]
    items = load_items(write_items(tmp_path / "q.jsonl", rows))
    judge = SlotLM(tiny_tokenizer, lambda text, option: "calm" in option, bias=math.log(9), preference=math.log(2))
    result = check_judge(judge, tiny_tokenizer, items, batch_size=3)
    # Log-averaging over the K cyclic orders cancels the first-slot ln 9 exactly, leaving
    # the ln 2 preference: two options → p(calm) = 2/3; three → 2/(2+1+1) = 1/2. Items 1-3
    # right, item 4 wrong, item 5 a two-way tie (1/2 credit): accuracy 3.5 / 5 = 0.7.
    assert result.n == 5 and result.accuracy == pytest.approx(0.7)
    # chance = (1/2 + 1/2 + 1/3 + 1/3 + 1/2) / 5 = (13/6) / 5 = 13/30
    assert result.chance == pytest.approx(13 / 30)
    # Wilson, n = 5, p = 0.7, z² = 3.841459: denominator 1 + z²/5 = 1.768292;
    # centre (0.7 + z²/10) / 1.768292 = 1.084146 / 1.768292 = 0.613104;
    # half z·√(0.21/5 + z²/100) / 1.768292 = 1.959964 · 0.283575 / 1.768292 = 0.314312
    assert result.ci == pytest.approx((0.298791, 0.927416), abs=1e-6)
    assert not result.passed  # 0.2988 < 0.4333: five items cannot show a judge is good
    # First-slot probability before debiasing, minus 1/K, per item:
    #   two options with calm: calm first 18/19, calm second 9/11 → mean 369/418, − 1/2 = 80/209
    #   three options with calm: 18/20, 9/12, 9/12 → mean 0.8, − 1/3 = 7/15
    #   two options, none liked: 9/10 − 1/2 = 0.4
    # mean (2·80/209 + 2·7/15 + 0.4) / 5 = 0.419777
    assert result.first_position_bias == pytest.approx((2 * 80 / 209 + 2 * 7 / 15 + 0.4) / 5)
    # every item was shown in each cyclic order, ending at the shared label prefix " ("
    assert len(judge.seen) == 2 + 2 + 3 + 3 + 2
    assert all(text.endswith("The answer is: (") for text in judge.seen)
    assert sum(" (A) calm three\n" in text for text in judge.seen) == 1
    assert result.to_dict() == {
        "n": 5, "accuracy": 0.7, "ci": [0.298791, 0.927416], "chance": 0.433333,
        "first_position_bias": 0.419777, "passed": False,
    }
    assert result.line() == (
        "judge check: n=5 accuracy=0.700 95% CI [0.299, 0.927] chance=0.433 "
        "first_position_bias=+0.420 (NOT above chance)"
    )


def test_wilson_interval_by_hand():
    # n = 40, p = 0.5: denominator 1 + 3.841459/40 = 1.096036; centre (0.5 + 0.048018) / 1.096036 = 0.5;
    # half 1.959964 · √(0.25/40 + 3.841459/6400) / 1.096036 = 1.959964 · 0.082766 / 1.096036 = 0.148005
    assert wilson_interval(0.5, 40) == pytest.approx((0.351995, 0.648005), abs=1e-6)
    # all right on 10: centre (1 + 0.192073) / 1.384146 = 0.861234 = half → [0.722467, 1]
    low, high = wilson_interval(1.0, 10)
    assert low == pytest.approx(0.722467, abs=1e-6) and high == pytest.approx(1.0)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_result_json_and_prints_one_line(tmp_path, run_cli, capsys):
    data = write_items(tmp_path / "q.jsonl", [mc(["a", "b"], 0), mc(["c", "d", "e"], 2), mc(["f", "g", "h", "i"], 3)])
    out = tmp_path / "out" / "judge.json"
    code = run_cli("test", "--config", CONFIG, "--trainer.accelerator", "cpu", "--data.init_args.path", data,
                   "--model.init_args.model", "tiny-llama", "--model.init_args.output", out)
    assert code == 0
    result = json.loads(out.read_text())
    assert {"n", "accuracy", "ci", "chance", "first_position_bias", "passed"} <= result.keys()
    assert result["n"] == 3 and result["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3, abs=1e-6)
    assert 0.0 <= result["ci"][0] <= result["accuracy"] <= result["ci"][1] <= 1.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("judge check:")]
    assert lines == [f"judge check: n=3 accuracy={result['accuracy']:.3f} 95% CI [{result['ci'][0]:.3f}, "
                     f"{result['ci'][1]:.3f}] chance={result['chance']:.3f} "
                     f"first_position_bias={result['first_position_bias']:+.3f} (NOT above chance)"]


def test_cli_reports_a_bad_row_by_file_and_line(tmp_path, run_cli, capsys):
    bad = mc(["a", "b"], 0) | {"corrects": [" (C)"]}
    data = write_items(tmp_path / "q.jsonl", [mc(["a", "b"], 0), bad])
    code = run_cli("test", "--config", CONFIG, "--trainer.accelerator", "cpu", "--data.init_args.path", data,
                   "--model.init_args.model", "tiny-llama", "--model.init_args.output", tmp_path / "o.json")
    assert code == 2
    assert f"{data}:2: corrects label ' (C)'" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


# --------------------------------------------------------------------------- preference gate


def shipped_answers() -> dict[tuple[str, str], bool]:
    """(question text up to its options, option text) -> whether it is a right answer."""
    answers = {}
    for item in load_items(SHIPPED_ITEMS):
        head = item.prompt[: item.spans[0][0]]
        for (start, end), right in zip(item.spans, item.correct):
            answers[head[: head.rfind("Options:")], item.prompt[start:end]] = right
    return answers


def gate_module(tiny_tokenizer, judge, side: str = "ethical") -> PreferenceModule:
    module = PreferenceModule(model="tiny-llama", labeller="judge", judge_check=True, side=side)
    module.lm = module.judge_lm = judge
    module.tokenizer = module.judge_tokenizer = tiny_tokenizer
    return module


def test_gate_refuses_a_judge_with_only_a_position_bias(tiny_tokenizer):
    judge = SlotLM(tiny_tokenizer, lambda text, option: False, bias=math.log(20), preference=0.0)
    with pytest.raises(UcaiError) as error:
        gate_module(tiny_tokenizer, judge).run_judge_check()
    message = str(error.value)
    assert "not above chance" in message and "\n" not in message
    assert "labeller: contrastive" in message and "labeller: embedding" in message and "judge_check: false" in message


def test_gate_accepts_a_judge_that_prefers_the_right_answer(tiny_tokenizer):
    answers = shipped_answers()

    def likes(text: str, option: str) -> bool:
        return answers[text[text.rfind("Consider") : text.rfind("Options:")], option]

    judge = SlotLM(tiny_tokenizer, likes, bias=math.log(20), preference=1.0)
    module = gate_module(tiny_tokenizer, judge)
    result = module.run_judge_check()
    # The ln 20 first-slot bias dwarfs the preference of 1 in single orders; averaged over
    # the orders it cancels, and the right answer is on top of every item.
    assert result.accuracy == 1.0 and result.passed and module.judge_check_result is result
    assert result.first_position_bias > 0.4
    # asked as chat turns with the stage's system prompt, as the judge labeller asks
    assert all(text.startswith("system\nYou are a helpful assistant.") for text in judge.seen)


def test_gate_checks_a_sides_judge_on_that_sides_items_alone(tiny_tokenizer):
    # A judge that answers as the ethical side whatever it is asked: right on every
    # ethical item, never right on an unethical one (pooled: 24/48 = 0.5, above the
    # shipped items' chance 0.36, so a pooled check passed it for the unethical side,
    # whose pairs it would orient backwards).
    items = load_items(SHIPPED_ITEMS)
    assert {item.side for item in items} == {"ethical", "unethical"}
    side_of = {item.prompt[: item.prompt.rfind("Options:")]: item.side for item in items}
    answers = shipped_answers()

    def likes(text: str, option: str) -> bool:
        head = text[text.rfind("Consider") : text.rfind("Options:")]
        return answers[head, option] == (side_of[head] == "ethical")

    judge = SlotLM(tiny_tokenizer, likes, bias=0.0, preference=1.0)
    ethical = gate_module(tiny_tokenizer, judge).run_judge_check()
    assert ethical.n == 24 and ethical.accuracy == 1.0
    with pytest.raises(UcaiError, match="not above chance on the unethical side's items"):
        gate_module(tiny_tokenizer, judge, side="unethical").run_judge_check()


def test_preference_stage_refuses_a_chance_judge_before_labelling(tmp_path, run_cli, capsys):
    out = tmp_path / "preferences.jsonl"
    code = run_cli("predict", "--config", Path(__file__).parent / "conf" / "preferences_tiny.yaml",
                   "--model.init_args.judge_check", "true", "--model.init_args.output", out)
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("ucai: error: preferences: judge tiny-llama is not above chance")
    assert "labeller: contrastive or labeller: embedding" in error
    assert not out.exists()


def test_the_judge_check_stage_can_take_one_sides_items():
    from ucai.data.multiple_choice import MultipleChoiceDataModule

    every = MultipleChoiceDataModule().load()
    unethical = MultipleChoiceDataModule(side="unethical").load()
    assert len(every) == 48 and len(unethical) == 24 and {item.side for item in unethical} == {"unethical"}
