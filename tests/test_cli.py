"""The ``ucai`` command: help paths (fast: no stage imported; ``ucai --help`` and a
saved subcommand help without Lightning), short class names,
shipped config names, one-line errors, the answer stage, a missing stage module, and
resuming a fit from its last checkpoint."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ucai import cli, help_cache, stage_catalog, stage_cli
from ucai.resources import configs_dir
from ucai.stage_cli import resolve_config_args
from ucai.stage_progress import PROGRESS_FILE_ENV

ROOT = Path(__file__).resolve().parents[1]
TINY_ANSWER = ROOT / "tests" / "conf" / "answer_tiny.yaml"


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["predict", "--help"], ["test", "--help"]])
def test_help_paths(run_cli, capsys, args):
    assert run_cli(*args) == 0
    out = capsys.readouterr().out
    assert "usage: ucai" in out
    if args[0] != "--help":
        assert "--model" in out and "--data" in out and "--trainer.precision" in out


@pytest.fixture(autouse=True)
def _own_help_cache(tmp_path, monkeypatch):
    # Saved help texts go to this test's folder, so each test builds its help for real.
    monkeypatch.setattr(help_cache, "help_dir", lambda: tmp_path / "help")


def _imported_modules(stderr: str) -> set[str]:
    """The modules listed by ``python -X importtime`` on stderr."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _run_help(*args, cache):
    """``python -m ucai.cli ARGS`` listing its imports."""
    env = {**os.environ, "UCAI_CACHE": str(cache), "COLUMNS": "100"}
    command = [sys.executable, "-X", "importtime", "-m", "ucai.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_top_level_help_needs_no_lightning(tmp_path):
    result = _run_help("--help", cache=tmp_path / "cache")
    assert result.returncode == 0
    for name in stage_catalog.SUBCOMMAND_SUMMARIES:
        assert f"    {name} " in result.stdout
    imported = _imported_modules(result.stderr)
    assert "argparse" in imported, "the listing must see the import lines"
    assert not {"lightning", "torch", "jsonargparse"} & imported
    assert not (tmp_path / "cache" / "help").exists(), "nothing to save"


def test_top_level_help_lists_what_the_lightning_cli_does(capsys):
    from ucai.lightning_cli import UcaiCLI

    with pytest.raises(SystemExit):
        UcaiCLI(args=["--help"])
    lightning_help = capsys.readouterr().out
    plain_help = cli.top_level_parser().format_help()
    assert set(stage_catalog.SUBCOMMAND_SUMMARIES) == {*UcaiCLI.subcommands(), "pipeline"}
    for invocation in ("-c CONFIG, --config CONFIG", "--print_config \b[=flags]", "-h, --help"):
        assert invocation in lightning_help, lightning_help
        assert invocation in plain_help, plain_help
    assert " ".join(stage_catalog.DESCRIPTION.split()) in " ".join(plain_help.split())


def test_console_script_subcommand_help_is_saved(tmp_path):
    # Built with Lightning the first time, then saved.
    first = _run_help("fit", "--help", cache=tmp_path / "cache")
    assert first.returncode == 0 and "--trainer.precision" in first.stdout
    imported = _imported_modules(first.stderr)
    assert "lightning.pytorch.cli" in imported, "the listing must see the import lines"
    assert not imported & set(stage_catalog.STAGE_MODULES)
    assert "peft" not in imported
    # The same request again is answered from the saved text, without Lightning or torch.
    again = _run_help("fit", "--help", cache=tmp_path / "cache")
    assert again.returncode == 0 and again.stdout == first.stdout
    assert not {"lightning", "torch"} & _imported_modules(again.stderr)


def test_saved_help_is_printed_again_and_keyed_by_what_shapes_it(run_cli, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "100")
    assert run_cli("fit", "--help") == 0
    built = capsys.readouterr().out
    assert "--trainer.precision" in built and len(list((tmp_path / "help").iterdir())) == 1

    def no_lightning(*args, **kwargs):
        raise AssertionError("help should have come from the saved text")

    monkeypatch.setattr("ucai.lightning_cli.UcaiCLI", no_lightning)
    assert run_cli("fit", "--help") == 0 and capsys.readouterr().out == built
    # Another width, request or library version is another text.
    key = help_cache.help_key(["fit", "--help"])
    assert help_cache.help_key(["fit", "-h"]) != key
    monkeypatch.setenv("COLUMNS", "120")
    assert help_cache.help_key(["fit", "--help"]) != key
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(help_cache, "_version", lambda name: "9.9" if name == "lightning" else "1.0")
    assert help_cache.help_key(["fit", "--help"]) != key


def test_a_failed_help_request_saves_nothing(tmp_path):
    with pytest.raises(SystemExit):
        with help_cache.recording(["fit", "--help"]):
            print("usage: half a help text")
            raise SystemExit(2)
    assert help_cache.lookup(["fit", "--help"]) is None


def test_subcommand_help_lists_the_stages_without_importing_them(run_cli, capsys, monkeypatch):
    imports = []
    monkeypatch.setattr(stage_cli, "import_stages", lambda: imports.append(1))
    assert run_cli("fit", "--help") == 0 and imports == []
    out = " ".join(capsys.readouterr().out.split())
    assert "--trainer.precision" in out and "SFTModule, PreferenceModule, RewardModule" in out
    assert "ucai data (--data NAME): PromptDataModule" in out


def test_short_class_names_in_a_config_resolve(run_cli, capsys, monkeypatch, tmp_path):
    config = tmp_path / "short.yaml"
    text = TINY_ANSWER.read_text()
    text = text.replace("ucai.stages.answer.AnswerModule", "AnswerModule")
    text = text.replace("ucai.data.prompt_datamodule.PromptDataModule", "PromptDataModule")
    assert "class_path: AnswerModule" in text and "class_path: PromptDataModule" in text
    config.write_text(text)
    imports = []
    real = stage_cli.import_stages
    monkeypatch.setattr(stage_cli, "import_stages", lambda: imports.append(real()))
    assert run_cli("predict", "--config", config, "--print_config") == 0 and imports == [None]
    out = capsys.readouterr().out
    assert "class_path: ucai.stages.answer.AnswerModule" in out
    assert "class_path: ucai.data.prompt_datamodule.PromptDataModule" in out


@pytest.mark.parametrize(
    "argv, plain",
    [
        (["--help"], True),
        (["fit", "-h"], True),
        (["predict", "--help"], True),
        (["fit"], False),
        (["fit", "--model.help", "SFTModule"], False),  # names a class: stages are needed
        (["fit", "--config", "sft.yaml", "--help"], False),
        (["fit", "--model", "SFTModule", "--help"], False),
    ],
)
def test_only_a_plain_help_request_skips_the_stage_imports(argv, plain):
    assert stage_cli.is_plain_help(argv) is plain


def test_stage_classes_list_every_model_and_data_class_of_the_stage_modules():
    import importlib
    import inspect

    from lightning import LightningDataModule, LightningModule

    found = {}
    for name in stage_catalog.STAGE_MODULES:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, (LightningModule, LightningDataModule)):
                found[cls_name] = name
    assert found == stage_catalog.STAGE_CLASSES


def test_ucai_cli_without_a_lightning_subcommand_does_not_import_lightning():
    code = "import sys, ucai.cli; print('lightning' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "False"]


def test_a_missing_stage_module_fails_instead_of_being_skipped(run_cli, monkeypatch):
    # A stage that cannot be imported is a broken install; skipping it would turn into a
    # confusing "class not found" for the one config that names it, or into nothing.
    monkeypatch.setattr(stage_catalog, "STAGE_MODULES", (*stage_catalog.STAGE_MODULES, "ucai.stages.no_such_stage"))
    with pytest.raises(ModuleNotFoundError, match="ucai.stages.no_such_stage"):
        run_cli("predict", "--config", TINY_ANSWER, "--print_config")


def test_bare_config_names_resolve_to_shipped_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named like a config here
    resolved = resolve_config_args(["fit", "--config", "answer.yaml", "--config=answer", "-c", "answer", "-c=answer"])
    shipped = str(configs_dir() / "answer.yaml")
    assert resolved == ["fit", "--config", shipped, f"--config={shipped}", "-c", shipped, f"-c={shipped}"]
    # An existing local file wins over the shipped one.
    (tmp_path / "answer.yaml").write_text("x: 1\n")
    assert resolve_config_args(["--config", "answer.yaml"])[1] == "answer.yaml"


def test_answer_stage_writes_jsonl_and_csv(run_cli, tmp_path, monkeypatch):
    output = tmp_path / "answers.jsonl"
    # As the pipeline runs a stage side by side: where it stands also goes to a file.
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(tmp_path / "answer.progress"))
    code = run_cli("predict", "--config", TINY_ANSWER, "--model.init_args.output", output)
    assert code == 0
    # Written at the first batch, then at most every 5 s.
    assert re.fullmatch(r"predicting: batch \d+/\d+, \d+\.\d\d prompts/s\n", (tmp_path / "answer.progress").read_text())
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


def _run_ucai(*args):
    return subprocess.run([sys.executable, "-m", "ucai.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_resume_from_last_checkpoint(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, "-m", "ucai.cli", "fit", "--config", str(ROOT / "tests/conf/ppo_tiny.yaml")]
    first = subprocess.run(base + ["--trainer.max_steps=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(
        base + ["--trainer.max_steps=4", "--ckpt_path", "last"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    # The resumed run continues at rollout step 1 (step 0 was the first run's).
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs/ppo_tiny/version_1/rollouts.csv")))
    assert {int(r["step"]) for r in rows} == {1}


def test_a_bad_value_is_one_error_line_naming_the_option_and_value():
    result = _run_ucai("predict", "--config", TINY_ANSWER, "--trainer.max_steps", "many")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ucai: error: --trainer.max_steps: Expected a <class 'int'>. Got value: many"
    ]


def test_progress_lines_say_the_phase_epoch_and_batch_and_are_written_at_most_every_few_seconds(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ucai.lightning_cli import ProgressToFile

    clock = [100.0]
    monkeypatch.setattr("ucai.lightning_cli.time.monotonic", lambda: clock[0])
    path = tmp_path / "sft.progress"
    callback = ProgressToFile(path, every=5.0)
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=1, max_epochs=2, num_training_batches=13,
                              num_test_batches=[float("inf")])
    module = SimpleNamespace()
    callback.on_train_batch_end(trainer, module, None, None, 6)
    assert path.read_text() == "training: epoch 2/2, batch 7/13\n"
    clock[0] += 4.9  # within 5 s of the last line: not rewritten
    callback.on_train_batch_end(trainer, module, None, None, 7)
    assert path.read_text() == "training: epoch 2/2, batch 7/13\n"
    clock[0] += 0.1
    trainer.max_epochs = -1  # a run bounded by max_steps: no epoch count
    callback.on_train_batch_end(trainer, module, None, None, 8)
    assert path.read_text() == "training: batch 9/13\n"
    clock[0] += 5
    callback.on_test_batch_end(trainer, module, None, None, 0)  # an iterable without a length
    assert path.read_text() == "testing: batch 1/?\n"
    trainer.is_global_zero = False
    clock[0] += 5
    callback.on_test_batch_end(trainer, module, None, None, 1)  # only rank 0 writes
    assert path.read_text() == "testing: batch 1/?\n"
    # A file that cannot be written: the stage goes on, and no more lines are tried.
    trainer.is_global_zero = True
    gone = ProgressToFile(tmp_path / "removed" / "sft.progress")
    gone.on_train_batch_end(trainer, module, None, None, 0)
    assert gone.last == float("inf") and not (tmp_path / "removed").exists()


@pytest.mark.parametrize(("args", "got"), [((), ""), (("fitt", "--config", "x.yaml"), "got 'fitt'; ")])
def test_a_missing_or_unknown_subcommand_lists_every_subcommand_pipeline_included(run_cli, capsys, monkeypatch, args, got):
    def no_lightning(*args, **kwargs):
        raise AssertionError("answered by Lightning's parser")

    monkeypatch.setattr(stage_cli, "main", no_lightning)
    assert run_cli(*args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"ucai: error: {got}expected a subcommand: fit, validate, test, predict, pipeline (ucai --help says what each does)"
    ]


def test_options_before_the_subcommand_go_to_lightnings_parser(run_cli, monkeypatch):
    seen = []
    monkeypatch.setattr(stage_cli, "main", lambda argv: seen.append(argv) or 0)
    assert run_cli("--config", "x.yaml", "fit") == 0
    assert seen == [["--config", "x.yaml", "fit"]]


def test_an_unknown_generation_engine_is_refused_as_the_arguments_are_parsed(run_cli, capsys, monkeypatch, tmp_path):
    """Before the model is loaded, as a bad range is."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("ucai.models.load_causal_lm", no_model)
    out = tmp_path / "answers.jsonl"
    code = run_cli(
        "predict", "--config", TINY_ANSWER, "--model.init_args.generation.engine=vllm", f"--model.init_args.output={out}"
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ucai: error: --model.init_args.generation.engine: unknown generation engine 'vllm'; "
        "choose one of: auto, hf, decode_loop, fast"
    )
    assert not out.exists()


def test_a_class_argument_error_names_the_init_arg():
    from argparse import ArgumentError

    from ucai.lightning_cli import one_line

    message = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [A, B]\n  Errors:\n'
        "    - Problem with given class_path 'ucai.stages.ppo.PPOModule':\n        Parser key \"kl_coef\":\n"
        "          Expected a <class 'float'>. Got value: abc\n    - Expected a <class 'NoneType'>\n"
    )
    assert str(one_line(ArgumentError(None, message))) == (
        "--model.init_args.kl_coef: Expected a <class 'float'>. Got value: abc"
    )


def test_a_nested_setting_error_is_named_as_typed_with_the_value_given():
    from argparse import ArgumentError

    from ucai.lightning_cli import one_line

    message = (
        'Parser key "data":\n  Errors:\n    - Problem with given class_path \'ucai.data.sft_data.SFTDataModule\':\n'
        '        Parser key "max_prompt_tokens":\n          Does not validate against any of the Union subtypes\n'
        "          Errors:\n            - Not of type PositiveInt: does not conform to restriction v>0\n"
        "            - Expected a <class 'NoneType'>\n          Given value type: <class 'int'>\n"
        "          Given value: 0\n    - Expected a <class 'NoneType'>\n"
        "  Given value: NestedArg(key='max_prompt_tokens', val='0')\n"
    )
    assert str(one_line(ArgumentError(None, message))) == (
        "--data.init_args.max_prompt_tokens: Not of type PositiveInt: does not conform to restriction v>0 (given: 0)"
    )
    lora = (
        'Parser key "model":\n    - Problem with given class_path \'ucai.stages.sft.SFTModule\':\n'
        '        Parser key "lora":\n            - Problem with given class_path \'ucai.models.LoraSettings\':\n'
        '                Parser key "r":\n                  Not of type PositiveInt: 0 does not conform to restriction v>0\n'
    )
    assert str(one_line(ArgumentError(None, lora))) == (
        "--model.init_args.lora.r: Not of type PositiveInt: 0 does not conform to restriction v>0"
    )
