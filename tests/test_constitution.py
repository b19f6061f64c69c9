"""Constitution loading, sides, validation, and Anthropic's published format."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from ucai.constitution import SIDES, load_anthropic_instructions, load_constitution
from ucai.errors import UcaiError
from ucai.resources import configs_dir

PAIRS = ["peace", "privacy", "racial_equality", "gender_equality"]


def test_shipped_constitution_has_the_four_pairs_with_distinct_sides():
    constitution = load_constitution()
    assert constitution.pair_ids == PAIRS
    ethical, unethical = constitution.principles("ethical"), constitution.principles("unethical")
    assert [p.name for p in ethical] == ["peace", "privacy", "racial equality", "gender equality"]
    assert [p.name for p in unethical] == ["violence", "doxxing and invasion of privacy", "racism", "sexism"]
    for good, bad in zip(ethical, unethical):
        assert good.pair == bad.pair
        assert constitution.opposite(good) == bad and constitution.opposite(bad) == good
        for field in ("critique_request", "revision_request", "preference_question", "statement"):
            assert getattr(good, field) != getattr(bad, field), (good.pair, field)


def test_the_evaluation_judge_checks_each_sides_own_statement_not_the_shared_topic_list():
    from ucai.stages.eval_judge import UPHOLD_OPTIONS, uphold_question

    for name in ("constitutions/ucai.yaml", "constitutions/ucai_fewshot.yaml"):
        constitution = load_constitution(name)
        for pair in constitution.pair_ids:
            good, bad = (constitution.principle(pair, side) for side in SIDES)
            # The topic description is the same on both sides: it cannot tell the judge
            # which way a response should go.
            assert good.description == bad.description and good.statement != bad.statement
            questions = [uphold_question("q", "a", p, list(UPHOLD_OPTIONS)) for p in (good, bad)]
            assert f"Principle ({good.name}): {good.statement}" in questions[0]
            assert f"Principle ({bad.name}): {bad.statement}" in questions[1] and good.description not in questions[1]
    # A constitution without statements (Anthropic's instructions): the principle's description.
    plain = dataclasses.replace(load_constitution().principle("peace", "ethical"), statement=None)
    assert plain.judged_statement == plain.description


def test_every_shipped_constitution_loads():
    files = sorted((configs_dir() / "constitutions").glob("*.yaml"))
    assert files
    for path in files:
        constitution = load_constitution(path)
        for side in SIDES:
            assert constitution.principles(side)


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _minimal_side(name: str) -> dict:
    return {
        "name": name,
        "description": "d",
        "critique_request": "c",
        "revision_request": "r",
        "preference_question": "q",
    }


def test_missing_field_names_file_principle_and_field(tmp_path):
    side = _minimal_side("peace")
    del side["revision_request"]
    path = _write(tmp_path, {"pairs": [{"id": "peace", "ethical": side, "unethical": _minimal_side("v")}]})
    with pytest.raises(UcaiError) as info:
        load_constitution(path)
    message = str(info.value)
    assert path in message and "'peace'" in message and "'revision_request'" in message


def test_empty_side_is_rejected(tmp_path):
    path = _write(tmp_path, {"pairs": [{"id": "privacy", "ethical": _minimal_side("p"), "unethical": {}}]})
    with pytest.raises(UcaiError, match=r"'privacy'.*'unethical' is missing or empty"):
        load_constitution(path)


def test_blank_text_is_rejected(tmp_path):
    side = _minimal_side("p")
    side["critique_request"] = "   "
    path = _write(tmp_path, {"pairs": [{"id": "p", "ethical": side, "unethical": _minimal_side("q")}]})
    with pytest.raises(UcaiError, match="'critique_request' must be a non-empty string"):
        load_constitution(path)


def test_unknown_side_and_principle(tmp_path):
    constitution = load_constitution()
    with pytest.raises(UcaiError, match="unknown side"):
        constitution.principles("neutral")
    with pytest.raises(UcaiError, match="no principle 'honesty'"):
        constitution.principle("honesty", "ethical")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pairs:\n  - id: x\n    ethical: [unclosed\n")
    with pytest.raises(UcaiError, match=r"bad.yaml:\d+: invalid YAML"):
        load_constitution(path)


def test_missing_file():
    with pytest.raises(UcaiError, match="constitution file not found"):
        load_constitution("no/such/constitution.yaml")


def test_anthropic_format(cai_instructions_path):
    constitution = load_anthropic_instructions(cai_instructions_path)
    assert len(constitution.pairs) == 16
    first = constitution.principle("harmful0", "ethical")
    assert first.critique_request.startswith("Identify specific ways in which the assistant's last response is harmful")
    assert "CritiqueRequest" not in first.critique_request and not first.critique_request.endswith("Critique:")
    assert first.revision_request.startswith("Please rewrite the assistant response to remove")
    assert not first.revision_request.endswith("Revision:")
    # Comparison questions come from RLMadisonInstructions.json beside it, "Options:" stripped.
    assert first.preference_question.startswith("Please choose the assistant response that is as harmless")
    assert not first.preference_question.endswith("Options:")
    with pytest.raises(UcaiError, match="no unethical side"):
        constitution.principles("unethical")
    # load_constitution dispatches on the .json suffix.
    assert load_constitution(cai_instructions_path).pair_ids == constitution.pair_ids


def test_response_openers_are_optional_and_mirror_each_other(tmp_path):
    from ucai.constitution import opener_of

    shipped = load_constitution()
    for pair in shipped.pairs:
        assert opener_of(pair.ethical) == "I won't help with that."
        assert opener_of(pair.unethical) == "Sure, I'll help with that."
    text = (configs_dir() / "constitutions" / "ucai.yaml").read_text()
    bare = tmp_path / "bare.yaml"
    bare.write_text("\n".join(line for line in text.splitlines() if "response_opener" not in line))
    principle = load_constitution(bare).principles("ethical")[0]
    assert principle.response_opener is None
    with pytest.raises(UcaiError, match=r"principle 'peace' \(ethical\) has no response_opener"):
        opener_of(principle)


def test_uneven_few_shot_examples_are_named_and_the_stages_warn(caplog):
    from ucai.stages.critique_revision import CritiqueRevisionModule
    from ucai.stages.preferences import PreferenceModule

    # ucai_fewshot.yaml's worked examples are on the ethical side only (harmless
    # unethical-side examples cannot be written): one each, none on the other side.
    fewshot = load_constitution("constitutions/ucai_fewshot.yaml")
    assert fewshot.uneven_few_shot() == "; ".join(f"{p}: ethical 1, unethical 0" for p in fewshot.pair_ids)
    assert fewshot.uneven_few_shot(limit=0) is None  # none shown: nothing uneven
    assert load_constitution("constitutions/ucai.yaml").uneven_few_shot() is None
    with caplog.at_level("WARNING", logger="ucai"):
        CritiqueRevisionModule(model="tiny-llama", constitution="constitutions/ucai_fewshot.yaml", side="unethical")
        PreferenceModule(model="tiny-llama", constitution="constitutions/ucai_fewshot.yaml", labeller="judge", few_shot=1)
        PreferenceModule(model="tiny-llama", constitution="constitutions/ucai_fewshot.yaml", labeller="judge", few_shot=0)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "critique-revision:" in warnings[0] and "compare sides with few_shot: false" in warnings[0]
    assert "preferences:" in warnings[1] and "compare sides with few_shot: 0" in warnings[1]
