"""Atomic files, the kill-9-proof append log, completion masks and the shard merge."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from ucai.data.io import ResumableJsonl, atomic_output, load_jsonl, write_csv, write_jsonl
from ucai.errors import UcaiError
from ucai.stages.generation import (
    GenerationSettings,
    ResumableJsonlWriter,
    completion_mask_from,
    generate,
)


def test_atomic_output_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": 1}])
    with pytest.raises(RuntimeError):
        with atomic_output(path) as handle:
            handle.write("partial")
            raise RuntimeError("crash")
    assert load_jsonl(path) == [{"id": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.fixture
def umask_027():
    """The process's umask set to 0o027 for the test (ucai reads it once per process)."""
    from ucai import file_modes

    before = os.umask(0o027)
    file_modes._umask.cache_clear()
    yield
    os.umask(before)
    file_modes._umask.cache_clear()


def test_outputs_get_the_mode_the_umask_gives_new_files(tmp_path, umask_027, tiny_model, tiny_tokenizer):
    # mkstemp, mkdtemp and safetensors' save make private files (0o600, 0o700): on a
    # shared machine colleagues could not read a run's data or models.
    from ucai.models import save_pretrained_atomic

    with atomic_output(tmp_path / "rows.jsonl") as handle:
        handle.write("{}\n")
    assert stat.S_IMODE((tmp_path / "rows.jsonl").stat().st_mode) == 0o640
    folder = save_pretrained_atomic(tmp_path / "model", tiny_model, tiny_tokenizer, {"ucai_sft.json": {"a": 1}})
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "model.safetensors" for path in files)
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == {path.name: 0o640 for path in files}


def test_csv_twin_encodes_lists_as_json(tmp_path):
    path = tmp_path / "x.csv"
    write_csv(path, [{"id": "a", "critiques": ["c1", "c2"]}])
    assert path.read_text().splitlines()[1] == 'a,"[""c1"", ""c2""]"'


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n")
    with pytest.raises(UcaiError, match="file is empty"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "cut off', "invalid JSON (Unterminated string starting at: column 12)"),
        ("{bad json", "invalid JSON (Expecting property name enclosed in double quotes: column 2)"),
    ],
)
def test_invalid_json_is_one_sentence_with_its_column(tmp_path, line, message):
    """Python's own message, then the column (its messages may end in "at")."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(UcaiError) as error:
        load_jsonl(path)
    assert str(error.value) == f"{path}:2: {message}"


def test_resumable_jsonl_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ResumableJsonl(path)
    log.append([{"id": "a"}, {"id": "b"}])
    with open(path, "a") as handle:
        handle.write('{"id": "c", "tex')  # killed mid-write
    reopened = ResumableJsonl(path)
    assert reopened.done_ids() == {"a", "b"}
    reopened.append([{"id": "c"}])
    assert [row["id"] for row in reopened.rows()] == ["a", "b", "c"]


def test_completion_mask_includes_first_eos_only():
    eos = 2
    completions = torch.tensor(
        [
            [5, 6, eos, 0, 0],  # stops, then padding
            [5, 6, 7, 8, 9],  # never stops
            [eos, 0, 0, 0, 0],  # empty answer
        ]
    )
    mask, finished = completion_mask_from(completions, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]


def test_batched_generation_matches_one_at_a_time(tiny_model, tiny_tokenizer):
    """Left padding must not change greedy outputs: batch results equal single runs."""
    prompts = ["<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>user\na longer question here<|im_end|>\n"]
    settings = GenerationSettings(max_new_tokens=6, do_sample=False)
    batched = generate(tiny_model, tiny_tokenizer, prompts, settings)
    singles = [generate(tiny_model, tiny_tokenizer, [p], settings).texts[0] for p in prompts]
    assert batched.texts == singles
    assert batched.completion_mask.shape[0] == 2


def _writer_with_shards(tmp_path, shards: dict[int, list[dict]]) -> ResumableJsonlWriter:
    writer = ResumableJsonlWriter(tmp_path / "out.jsonl")
    for rank, rows in shards.items():
        ResumableJsonl(writer.shard_dir / f"rank-{rank}.jsonl").append(rows)
    return writer


def test_merge_orders_by_input_and_drops_duplicates(tmp_path):
    writer = _writer_with_shards(
        tmp_path, {0: [{"id": "c"}, {"id": "a", "v": 1}], 1: [{"id": "b"}, {"id": "a", "v": 2}]}
    )
    assert writer.merge(["a", "b", "c"])
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"] and rows[0]["v"] == 1
    assert (tmp_path / "out.csv").exists() and not writer.shard_dir.exists()


def test_merge_waits_until_every_id_is_done(tmp_path):
    writer = _writer_with_shards(tmp_path, {0: [{"id": "a"}]})
    assert not writer.merge(["a", "b"])
    assert not (tmp_path / "out.jsonl").exists() and writer.shard_dir.exists()


def test_option_probabilities_do_not_depend_on_left_padding(tiny_model, tiny_tokenizer):
    """Positions count real tokens only, so a prompt scores the same alone or in a batch."""
    from ucai.scoring import option_probabilities

    prompts = ["Pick one: (A) yes (B) no. Answer: (", "A much longer question about many things. Answer: ("]
    batched = option_probabilities(tiny_model, tiny_tokenizer, prompts, ["A", "B"])
    singles = torch.cat([option_probabilities(tiny_model, tiny_tokenizer, [p], ["A", "B"]) for p in prompts])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)
    assert torch.allclose(batched.sum(1), torch.ones(2))


def test_a_filesystem_that_refuses_chmod_still_gets_the_output(tmp_path, monkeypatch):
    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr("ucai.file_modes.os.chmod", refuse)
    with atomic_output(tmp_path / "rows.jsonl") as handle:
        handle.write("{}\n")
    assert (tmp_path / "rows.jsonl").read_text() == "{}\n"
