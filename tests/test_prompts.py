"""Prompt readers: every format, cleaning, stable ids, and errors that name file and line."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from ucai.data.prompts import first_human_turn, parse_transcript, read_prompts, stable_id
from ucai.errors import UcaiError

TRANSCRIPT = "\n\nHuman: How do I find my neighbour's phone number?\n\nAssistant: I can't help with that.\n\nHuman: Please?\n\nAssistant: No."


def test_parse_transcript_turns():
    messages = parse_transcript(TRANSCRIPT)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "How do I find my neighbour's phone number?"
    assert first_human_turn(TRANSCRIPT) == "How do I find my neighbour's phone number?"


def test_red_team_attempts_json_array(tmp_path):
    rows = [
        {
            "transcript": TRANSCRIPT,
            "min_harmlessness_score_transcript": -1.5,
            "num_params": 52e9,
            "model_type": "context distillation",
            "rating": 2,
            "task_description": "find a phone number",
            "task_descripton_harmlessness_score": 0.2,
            "red_team_member_id": 7,
            "is_upworker": False,
            "tags": None,
        },
        {"transcript": "\n\nHuman:   \n\nAssistant: ok", "rating": 0},
    ]
    path = tmp_path / "red_team_attempts.json"
    path.write_text(json.dumps(rows))
    records = read_prompts(path)
    assert len(records) == 1, "the transcript with an empty first turn is dropped"
    assert records[0].prompt == "How do I find my neighbour's phone number?"
    assert records[0].score == -1.5 and records[0].source == "hh-rlhf/red-team-attempts"
    assert records[0].id == stable_id(records[0].prompt)


def test_hh_preference_jsonl_gz(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"chosen": TRANSCRIPT, "rejected": TRANSCRIPT + " x"}) + "\n")
        handle.write(json.dumps({"chosen": "\n\nHuman: second?\n\nAssistant: a", "rejected": "b"}) + "\n")
    assert [r.prompt for r in read_prompts(path)] == [
        "How do I find my neighbour's phone number?",
        "second?",
    ]


def test_real_hh_rlhf_file(hh_rlhf_path):
    records = read_prompts(hh_rlhf_path)
    # 2,312 transcripts; many share a first question, so de-duplication keeps fewer.
    assert 1500 < len(records) <= 2312
    assert all(r.prompt and r.prompt == r.prompt.strip() for r in records)
    assert len({r.id for r in records}) == len(records)
    assert all(r.source == "hh-rlhf" for r in records)


def test_jsonl_with_prompt_column_dedup_and_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "  Hello there  ", "principle": "none"}\n'
        "\n"
        '{"prompt": "hello   THERE"}\n'
        '{"id": "x1", "prompt": "Second", "principle": "peace"}\n'
    )
    records = read_prompts(path)
    assert [(r.id, r.prompt, r.principle) for r in records] == [
        (stable_id("Hello there"), "Hello there", "none"),
        ("x1", "Second", "peace"),
    ]
    # Stable: reading again (or in another order) gives the same ids.
    assert [r.id for r in read_prompts(path)] == [r.id for r in records]


def test_length_bounds_principles_and_limit(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("short\na somewhat longer prompt\nthird prompt here\n")
    assert [r.prompt for r in read_prompts(path, min_chars=6, max_chars=20)] == ["third prompt here"]
    assert len(read_prompts(path, limit=2)) == 2


def test_csv_reader(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,principle\na,"Hi, you",peace\nb,Other,\n')
    records = read_prompts(path)
    assert [(r.id, r.prompt, r.principle) for r in records] == [("a", "Hi, you", "peace"), ("b", "Other", None)]


def test_csv_without_prompt_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question\nwhy\n")
    with pytest.raises(UcaiError, match=r"p.csv:1: missing column\(s\) 'prompt'"):
        read_prompts(path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: invalid JSON"),
        ('{"prompt": "ok"}\n["a list"]\n', r"p.jsonl:2: expected a JSON object"),
        ('{"prompt": "ok"}\n{"text": "no prompt"}\n', r"p.jsonl:2: missing field 'prompt'"),
        ('{"prompt": 12}\n', r"p.jsonl:1: field 'prompt' must be a string"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', r"p.jsonl:2: duplicate id 'a'"),
        ("", r"no prompts left"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, pattern):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(UcaiError, match=pattern):
        read_prompts(path)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UcaiError, match=r"p.jsonl:2: not valid UTF-8"):
        read_prompts(path)


def test_empty_prompt_policy(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "   "}\n')
    assert len(read_prompts(path)) == 1
    with pytest.raises(UcaiError, match=r"p.jsonl:2: empty prompt"):
        read_prompts(path, empty="error")


def test_missing_file():
    with pytest.raises(UcaiError, match="prompt file not found"):
        read_prompts("nowhere/prompts.jsonl")


def test_shipped_prompt_set():
    records = read_prompts("data/red_team_prompts.jsonl")
    counts = Counter(r.principle for r in records)
    red_team = sum(counts[p] for p in ("peace", "privacy", "racial_equality", "gender_equality"))
    assert red_team >= 200 and counts["none"] >= 40
    assert min(counts[p] for p in ("peace", "privacy", "racial_equality", "gender_equality")) >= 40
    assert set(counts) == {"peace", "privacy", "racial_equality", "gender_equality", "none"}
