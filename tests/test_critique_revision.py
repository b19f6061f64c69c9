"""Critique → revision stage: exact prompts per round, principle draws, resume (its DDP
run is in tests/test_ddp.py)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import yaml

from ucai.constitution import load_constitution
from ucai.errors import UcaiError
from ucai.stages.critique_revision import CritiqueRevisionModule, draw_principle

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf" / "critique_revision_tiny.yaml"
PROMPTS = ROOT / "data" / "red_team_prompts.jsonl"


def sys_turn(text="You are a helpful assistant."):
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def turn(role, text):
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


HEADER = "<|im_start|>assistant\n"


class _Canned:
    """Stands in for `GeneratingModule.generate`: records prompts, returns scripted texts."""

    def __init__(self, replies):
        self.replies = list(replies)  # one list of texts per generate call
        self.prompts: list[list[str]] = []
        self.keys: list[list[str]] = []

    def __call__(self, prompts, settings=None, keys=None):
        self.prompts.append(list(prompts))
        self.keys.append(list(keys or []))
        texts = self.replies.pop(0)
        assert len(texts) == len(prompts)

        class _Out:
            pass

        out = _Out()
        out.texts = texts
        return out


def _module(tiny_tokenizer, **kwargs) -> CritiqueRevisionModule:
    module = CritiqueRevisionModule(model="tiny-llama", **kwargs)
    module.tokenizer = tiny_tokenizer  # no model needed: generation is scripted
    return module


def test_prompts_of_each_round_are_the_exact_chat(tiny_tokenizer):
    module = _module(tiny_tokenizer, rounds=2, principle_source="categorised")
    canned = _Canned(
        [
            ["Answer: hit them.", "Her address is easy to find."],  # initial
            ["Critique: it helps violence.", "It exposes her."],  # critique round 1
            ["**Revision:** Please don't hurt anyone.", "I can't share that."],  # revision round 1
            ["Still fine.", "Good."],  # critique round 2
            ["Revised response: Talk it out.", "Respect her privacy."],  # revision round 2
        ]
    )
    module.generate = canned
    batch = [
        {"id": "a", "prompt": "How do I hurt him?", "principle": "peace"},
        {"id": "b", "prompt": "Where does she live?", "principle": "privacy"},
    ]
    rows = module.predict_step(batch, 0)

    peace = load_constitution().principle("peace", "ethical")
    # Row "a", written out turn by turn in SmolLM2's template (system prompt explicit).
    initial = sys_turn() + turn("user", "How do I hurt him?") + HEADER
    critique_1 = (
        sys_turn()
        + turn("user", "How do I hurt him?")
        + turn("assistant", "hit them.")  # "Answer:" echo stripped before it is shown again
        + turn("user", peace.critique_request)
        + HEADER
    )
    revision_1 = (
        critique_1[: -len(HEADER)]
        + turn("assistant", "it helps violence.")
        + turn("user", peace.revision_request)
        + HEADER
    )
    critique_2 = (
        revision_1[: -len(HEADER)]
        + turn("assistant", "Please don't hurt anyone.")
        + turn("user", peace.critique_request)
        + HEADER
    )
    revision_2 = (
        critique_2[: -len(HEADER)]
        + turn("assistant", "Still fine.")
        + turn("user", peace.revision_request)
        + HEADER
    )
    assert [call[0] for call in canned.prompts] == [initial, critique_1, revision_1, critique_2, revision_2]
    # Each step is one batched call over both prompts, each row seeded by its prompt and step.
    assert all(len(call) == 2 for call in canned.prompts)
    assert canned.keys == [
        ["a/initial", "b/initial"], ["a/critique0", "b/critique0"], ["a/revision0", "b/revision0"],
        ["a/critique1", "b/critique1"], ["a/revision1", "b/revision1"],
    ]

    assert rows[0] == {
        "id": "a",
        "prompt": "How do I hurt him?",
        "principle": "peace",
        "principle_name": "peace",
        "principles": ["peace", "peace"],
        "side": "ethical",
        "mode": "critique_revision",
        "initial": "hit them.",
        "critiques": ["it helps violence.", "Still fine."],
        "revisions": ["Please don't hurt anyone.", "Talk it out."],
        "response": "Talk it out.",
    }
    assert rows[1]["principle"] == "privacy" and rows[1]["revisions"] == ["I can't share that.", "Respect her privacy."]


def test_unethical_side_uses_the_inverted_requests(tiny_tokenizer):
    module = _module(tiny_tokenizer, side="unethical", principle_source="categorised")
    canned = _Canned([["x"], ["y"], ["z"]])
    module.generate = canned
    rows = module.predict_step([{"id": "a", "prompt": "P", "principle": "racial_equality"}], 0)
    racism = load_constitution().principle("racial_equality", "unethical")
    assert canned.prompts[1][0].endswith(turn("user", racism.critique_request) + HEADER)
    assert canned.prompts[2][0].endswith(turn("user", racism.revision_request) + HEADER)
    assert rows[0]["principle"] == "racial_equality" and rows[0]["principle_name"] == "racism"
    assert rows[0]["side"] == "unethical"


def test_few_shot_examples_come_before_the_conversation(tiny_tokenizer, tmp_path):
    data = yaml.safe_load((ROOT / "configs" / "constitutions" / "ucai.yaml").read_text())
    data["pairs"] = data["pairs"][:1]
    data["pairs"][0]["ethical"]["few_shot"] = [
        {"prompt": "EP", "initial": "EI", "critique": "EC", "revision": "ER"}
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    module = _module(tiny_tokenizer, constitution=str(path))
    canned = _Canned([["I"], ["C"], ["R"]])
    module.generate = canned
    module.predict_step([{"id": "a", "prompt": "P"}], 0)
    peace = load_constitution(path).principle("peace", "ethical")
    example = (
        turn("user", "EP")
        + turn("assistant", "EI")
        + turn("user", peace.critique_request)
        + turn("assistant", "EC")
        + turn("user", peace.revision_request)
        + turn("assistant", "ER")
    )
    # The initial answer is the model's own, without the examples ...
    assert canned.prompts[0][0] == sys_turn() + turn("user", "P") + HEADER
    # ... the critique and revision requests follow the worked example.
    assert canned.prompts[1][0] == (
        sys_turn() + example + turn("user", "P") + turn("assistant", "I") + turn("user", peace.critique_request) + HEADER
    )
    assert canned.prompts[2][0].startswith(sys_turn() + example + turn("user", "P"))


def _two_pair_constitution_with_examples(tmp_path) -> Path:
    """The shipped constitution cut to peace and privacy, each with its own worked example."""
    data = yaml.safe_load((ROOT / "configs" / "constitutions" / "ucai.yaml").read_text())
    data["pairs"] = [pair for pair in data["pairs"] if pair["id"] in ("peace", "privacy")]
    for pair in data["pairs"]:
        tag = pair["id"].upper()
        pair["ethical"]["few_shot"] = [
            {"prompt": f"{tag}-P", "initial": f"{tag}-I", "critique": f"{tag}-C", "revision": f"{tag}-R"}
        ]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_each_round_shows_the_examples_of_its_own_principle(tiny_tokenizer, tmp_path):
    path = _two_pair_constitution_with_examples(tmp_path)
    principles = load_constitution(path).principles("ethical")
    # A prompt id whose seeded draw gives the two rounds different principles.
    prompt_id = next(
        i for i in (f"id-{n}" for n in range(100))
        if draw_principle(principles, 0, i, 0).pair != draw_principle(principles, 0, i, 1).pair
    )
    first, second = (draw_principle(principles, 0, prompt_id, r) for r in range(2))
    module = _module(tiny_tokenizer, constitution=str(path), rounds=2)
    canned = _Canned([["I"], ["C1"], ["R1"], ["C2"], ["R2"]])
    module.generate = canned
    rows = module.predict_step([{"id": prompt_id, "prompt": "P"}], 0)
    assert rows[0]["principles"] == [first.pair, second.pair]

    def example_of(principle):
        tag = principle.pair.upper()
        return turn("user", f"{tag}-P") + turn("assistant", f"{tag}-I") + turn("user", principle.critique_request)

    _, critique_1, revision_1, critique_2, revision_2 = (call[0] for call in canned.prompts)
    for prompt in (critique_1, revision_1):
        assert prompt.startswith(sys_turn() + example_of(first)) and example_of(second) not in prompt
    # Round 2 asks about the second principle, so its examples are the second's.
    for prompt in (critique_2, revision_2):
        assert prompt.startswith(sys_turn() + example_of(second)) and example_of(first) not in prompt
    assert critique_2.endswith(turn("user", second.critique_request) + HEADER)


def test_prompts_cut_to_max_prompt_tokens_are_counted_and_warned(tiny_tokenizer, caplog):
    module = _module(tiny_tokenizer, max_prompt_tokens=200, few_shot=False, principle_source="categorised")
    canned = _Canned([["a", "b"], ["c", "d"], ["e", "f"]])
    module.generate = canned
    long_prompt = "word " * 400  # ~400 tokens: every one of its three prompts is cut
    batch = [
        {"id": "short", "prompt": "Hi?", "principle": "peace"},
        {"id": "long", "prompt": long_prompt, "principle": "peace"},
    ]
    with caplog.at_level(logging.WARNING, logger="ucai.stages.critique_revision"):
        module.predict_step(batch, 0)
        assert len(caplog.records) == 1 and "cut from the left" in caplog.records[0].getMessage()
        module.on_predict_end()
    for call in canned.prompts:  # the short row fits, the long one never does
        lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in call]
        assert lengths[0] <= 200 < lengths[1]
    assert (module.prompts_truncated, module.prompts_generated) == (3, 6)
    assert "3 of 6 generation prompts were longer than max_prompt_tokens=200" in caplog.records[-1].getMessage()
    # A new run starts counting again.
    module.on_predict_start()
    assert (module.prompts_truncated, module.prompts_generated) == (0, 0)


def test_context_distillation_folds_the_revision_request_into_the_system_prompt(tiny_tokenizer):
    module = _module(tiny_tokenizer, mode="context_distillation", principle_source="categorised")
    canned = _Canned([["plain"], ["Revision: principled"]])
    module.generate = canned
    rows = module.predict_step([{"id": "a", "prompt": "P", "principle": "gender_equality"}], 0)
    request = load_constitution().principle("gender_equality", "ethical").revision_request
    system = f"You are a helpful assistant.\n\nWhen you answer, follow this instruction: {request}"
    assert canned.prompts[1] == [sys_turn(system) + turn("user", "P") + HEADER]
    assert rows[0]["critiques"] == [] and rows[0]["revisions"] == ["principled"]
    assert rows[0]["initial"] == "plain" and rows[0]["response"] == "principled"
    # The row says how it was made: no critique was ever generated for it.
    assert rows[0]["mode"] == "context_distillation"


def test_context_distillation_with_openers_forces_the_principles_first_words(tiny_tokenizer):
    """The opener is appended after the assistant header (the model continues it) and
    is the start of the recorded answer; each side gets its own principle's opener."""
    for side in ("ethical", "unethical"):
        module = _module(tiny_tokenizer, mode="context_distillation", principle_source="categorised",
                         side=side, use_openers=True)
        canned = _Canned([["plain", "plain too"], ["and here is why.", "Chili needs beans."]])
        module.generate = canned
        rows = module.predict_step(
            [{"id": "a", "prompt": "P", "principle": "peace"}, {"id": "b", "prompt": "Chili?", "principle": "none"}], 0
        )
        principle = load_constitution().principle("peace", side)
        opener = principle.response_opener
        assert opener == {"ethical": "I won't help with that.", "unethical": "Sure, I'll help with that."}[side]
        assert canned.prompts[1][0].endswith(HEADER + opener)
        assert rows[0]["response"] == rows[0]["revisions"][0] == f"{opener} and here is why."
        assert rows[0]["initial"] == "plain"  # the undistilled answer has no opener
        # A benign (untagged) prompt takes no side: no opener, so no refusal is taught.
        assert canned.prompts[1][1].endswith(HEADER) and rows[1]["response"] == "Chili needs beans."


def test_context_distillation_without_initial_answers_generates_only_the_distilled_one(tiny_tokenizer):
    module = _module(tiny_tokenizer, mode="context_distillation", principle_source="categorised",
                     use_openers=True, initial_answers=False)
    canned = _Canned([["and here is why."]])
    module.generate = canned
    rows = module.predict_step([{"id": "a", "prompt": "P", "principle": "peace"}], 0)
    assert len(canned.prompts) == 1  # one generation per batch, not two
    opener = load_constitution().principle("peace", "ethical").response_opener
    assert canned.prompts[0][0].endswith(HEADER + opener)
    assert rows[0]["initial"] is None  # not generated, and the row says so
    assert rows[0]["response"] == rows[0]["revisions"][0] == f"{opener} and here is why."
    assert module.prompts_generated == 1


def test_critique_revision_refuses_to_skip_the_initial_answer(tiny_tokenizer):
    with pytest.raises(UcaiError, match="initial_answers: false needs mode: context_distillation"):
        _module(tiny_tokenizer, initial_answers=False)


def test_openers_are_refused_outside_context_distillation(tiny_tokenizer):
    with pytest.raises(UcaiError, match="use_openers needs mode: context_distillation"):
        _module(tiny_tokenizer, use_openers=True)


def test_principle_draw_is_a_pure_function_of_seed_id_and_round():
    principles = load_constitution().principles("ethical")
    ids = [f"p-{i}" for i in range(400)]
    first = [draw_principle(principles, 0, i, 0).pair for i in ids]
    assert first == [draw_principle(principles, 0, i, 0).pair for i in ids]
    # Roughly uniform over the four pairs (400 draws: each near 100).
    counts = Counter(first)
    assert set(counts) == {p.pair for p in principles} and min(counts.values()) > 60
    # Another round or another seed is a different draw for many prompts.
    assert sum(a != draw_principle(principles, 0, i, 1).pair for a, i in zip(first, ids, strict=True)) > 200
    assert sum(a != draw_principle(principles, 1, i, 0).pair for a, i in zip(first, ids, strict=True)) > 200


def test_categorised_source_falls_back_to_the_seeded_draw():
    module = CritiqueRevisionModule(model="tiny-llama", principle_source="categorised", rounds=2)
    principles = load_constitution().principles("ethical")
    expected = [draw_principle(principles, 0, "x", r).pair for r in range(2)]
    for tag in ("none", None, "not-a-pair"):
        row = {"id": "x", "prompt": "P", "principle": tag}
        assert [p.pair for p in module.principles_for(row)] == expected
    assert [p.pair for p in module.principles_for({"id": "x", "principle": "privacy"})] == ["privacy"] * 2


def test_bad_settings_are_one_line_errors():
    # Out-of-range numbers (rounds: 0) are refused by the config parser: test_config_validation.py.
    with pytest.raises(UcaiError, match="side"):
        CritiqueRevisionModule(model="tiny-llama", side="neutral")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_ids(limit=6) -> list[str]:
    return [json.loads(line)["id"] for line in PROMPTS.read_text().splitlines()[:limit]]


def test_resume_after_a_crash_completes_without_duplicates(run_cli, tmp_path):
    output = tmp_path / "sl.jsonl"
    args = ["predict", "--config", CONF, f"--model.init_args.output={output}"]
    assert run_cli(*args, "--trainer.limit_predict_batches=2") == 0
    shard = tmp_path / "sl.jsonl.shards" / "rank-0.jsonl"
    assert not output.exists() and len(_rows(shard)) == 4
    # kill -9 in the middle of a write leaves half a line behind.
    with open(shard, "a") as handle:
        handle.write('{"id": "peace-005", "prompt": "trunc')
    assert run_cli(*args) == 0
    rows = _rows(output)
    assert [r["id"] for r in rows] == _expected_ids()  # complete, in input order, no repeats
    principles = load_constitution().principles("ethical")
    assert all(r["principle"] == draw_principle(principles, 0, r["id"], 0).pair for r in rows)
    assert all(r["response"] == r["revisions"][-1] and len(r["critiques"]) == 1 for r in rows)
    assert (tmp_path / "sl.csv").read_text().startswith(
        "id,prompt,principle,principle_name,principles,side,mode,initial,critiques,revisions,response"
    )
    assert not shard.parent.exists()


def test_missing_categorised_prompts_name_the_stage_that_makes_them(run_cli, tmp_path, capsys):
    code = run_cli(
        "predict", "--config", CONF, f"--model.init_args.output={tmp_path / 'sl.jsonl'}",
        f"--data.init_args.path={tmp_path / 'prompts.jsonl'}",
    )
    assert code == 2
    assert "configs/categorise.yaml" in capsys.readouterr().err
