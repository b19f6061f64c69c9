"""The ``ucai`` command: help paths, shipped config names, one-line errors, the answer stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ucai.cli import resolve_config_args
from ucai.resources import configs_dir

ROOT = Path(__file__).resolve().parents[1]
TINY_ANSWER = ROOT / "tests" / "conf" / "answer_tiny.yaml"


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["predict", "--help"], ["test", "--help"]])
def test_help_paths(run_cli, capsys, args):
    with pytest.raises(SystemExit) as info:
        run_cli(*args)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: ucai" in out
    if args[0] != "--help":
        assert "--model" in out and "--data" in out and "--trainer.precision" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "ucai.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "{fit,validate,test,predict}" in result.stdout


def test_bare_config_names_resolve_to_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named like a config here
    resolved = resolve_config_args(["fit", "--config", "answer.yaml", "--config=answer"])
    assert resolved[2] == str(configs_dir() / "answer.yaml")
    assert resolved[3] == "--config=" + str(configs_dir() / "answer.yaml")
    # An existing local file wins over the shipped one.
    (tmp_path / "answer.yaml").write_text("x: 1\n")
    assert resolve_config_args(["--config", "answer.yaml"])[1] == "answer.yaml"


def test_answer_stage_writes_jsonl_and_csv(run_cli, tmp_path):
    output = tmp_path / "answers.jsonl"
    code = run_cli("predict", "--config", TINY_ANSWER, "--model.init_args.output", output)
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    assert rows[0]["id"] == "peace-001" and set(rows[0]) == {"id", "prompt", "principle", "response", "model"}
    assert (tmp_path / "answers.csv").read_text().startswith("id,prompt,principle,response,model")
    assert not (tmp_path / "answers.jsonl.shards").exists()


def test_answer_stage_resumes_after_an_interruption(run_cli, tmp_path):
    output = tmp_path / "answers.jsonl"
    # First run stops after one batch of 4 (as a crash would): the final file is not written.
    assert run_cli("predict", "--config", TINY_ANSWER, "--model.init_args.output", output,
                   "--trainer.limit_predict_batches", "1") == 0
    assert not output.exists()
    shard = tmp_path / "answers.jsonl.shards" / "rank-0.jsonl"
    assert len(shard.read_text().splitlines()) == 4
    with open(shard, "a") as handle:  # a write torn by kill -9
        handle.write('{"id": "peace-0')
    assert run_cli("predict", "--config", TINY_ANSWER, "--model.init_args.output", output) == 0
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert ids == [f"peace-{i:03d}" for i in range(1, 11)], "input order is kept"


def _run_ucai(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ucai.cli", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_unknown_model_alias_is_one_line_and_nonzero(tmp_path):
    output = tmp_path / "a.jsonl"
    result = _run_ucai("predict", "--config", TINY_ANSWER, "--model.init_args.model", "smollm9", "--model.init_args.output", output)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ucai: error:")]
    assert error_lines and "unknown model alias 'smollm9'" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert not output.exists() and not (tmp_path / "a.jsonl.shards").exists()


def test_unknown_config_key_fails(tmp_path):
    result = _run_ucai("predict", "--config", TINY_ANSWER, "--model.init_args.no_such_key", "1")
    assert result.returncode != 0
    assert "no_such_key" in result.stderr
