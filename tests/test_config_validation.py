"""Settings are checked where they are declared: an out-of-range size, count, rate,
fraction or probability of a stage, its data module or its generation settings, and an
output path that cannot be created, each end in one ``ucai: error:`` line naming the
option and the value, with status 2, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from ucai.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"

# (subcommand, config, override): a sample of fields per stage and data module.
OUT_OF_RANGE = [
    ("predict", CONF / "critique_revision_tiny.yaml", "--model.init_args.rounds=0"),
    ("predict", CONF / "critique_revision_tiny.yaml", "--model.init_args.generation.temperature=-1"),
    ("predict", CONF / "critique_revision_tiny.yaml", "--model.init_args.generation.top_p=1.5"),
    ("predict", CONF / "critique_revision_tiny.yaml", "--model.init_args.generation.top_k=-1"),
    ("predict", CONF / "answer_tiny.yaml", "--model.init_args.generation.max_new_tokens=0"),
    ("predict", CONF / "answer_tiny.yaml", "--model.init_args.generation.repetition_penalty=-1"),
    ("predict", CONF / "answer_tiny.yaml", "--data.init_args.heldout_fraction=1.5"),
    ("predict", CONF / "answer_tiny.yaml", "--data.init_args.batch_size=0"),
    ("predict", CONF / "answer_tiny.yaml", "--data.init_args.num_workers=-1"),
    ("predict", CONF / "categorise_tiny.yaml", "--model.init_args.temperature=0"),
    ("predict", CONF / "preferences_tiny.yaml", "--model.init_args.min_margin=0.5"),
    ("predict", CONF / "preferences_tiny.yaml", "--model.init_args.contrastive_p_chosen=0.4"),
    ("predict", CONF / "preferences_tiny.yaml", "--model.init_args.few_shot=-1"),
    ("predict", CONF / "preferences_tiny.yaml", "--model.init_args.embedding_temperature=0"),
    ("predict", CONF / "reward_score_tiny.yaml", "--data.init_args.batch_size=0"),
    ("test", CONF / "eval_tiny.yaml", "--model.init_args.alpha=1"),
    ("test", CONF / "eval_tiny.yaml", "--model.init_args.n_boot=0"),
    ("test", CONF / "eval_tiny.yaml", "--model.init_args.tie_margin=-0.1"),
    ("test", CONF / "eval_tiny.yaml", "--model.init_args.generation_batch_size=0"),
    ("test", ROOT / "configs" / "judge_check.yaml", "--data.init_args.batch_size=0"),
    ("fit", CONF / "sft_tiny.yaml", "--data.init_args.val_fraction=1.5"),
    ("fit", CONF / "sft_tiny.yaml", "--data.init_args.max_length=1"),
    ("fit", CONF / "sft_tiny.yaml", "--data.init_args.bucket_batches=0"),
    ("fit", CONF / "reward_tiny.yaml", "--data.init_args.val_fraction=1"),
]

# Optional fields (``int | None``): jsonargparse's message names the field, not the value.
OPTIONAL_OUT_OF_RANGE = [
    ("predict", CONF / "answer_tiny.yaml", "--model.init_args.max_prompt_tokens=0"),
    ("predict", CONF / "answer_tiny.yaml", "--data.init_args.limit=0"),
    ("predict", CONF / "categorise_tiny.yaml", "--model.init_args.max_per_principle=0"),
    ("predict", CONF / "preferences_tiny.yaml", "--model.init_args.judge_max_tokens=0"),
    ("test", CONF / "eval_tiny.yaml", "--model.init_args.max_prompt_tokens=0"),
    ("test", ROOT / "configs" / "judge_check.yaml", "--model.init_args.max_length=0"),
    ("test", ROOT / "configs" / "judge_check.yaml", "--data.init_args.limit=0"),
    ("fit", CONF / "reward_tiny.yaml", "--data.init_args.val_size=-1"),
    ("fit", CONF / "reward_tiny.yaml", "--data.init_args.pad_to_multiple_of=0"),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a model or tokenizer fails the test."""
    import ucai.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the settings were checked")

    for name in ("load_causal_lm", "load_tokenizer", "load_sequence_classifier"):
        monkeypatch.setattr(ucai.models, name, refuse)


def _error(capsys, subcommand: str, config: Path, *overrides: str) -> str:
    """The ``ucai: error:`` line of a run that must fail with status 2 (the status of a
    `UcaiError`, printed as that one line; any other exception would propagate)."""
    assert main([subcommand, "--config", str(config), *overrides]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ucai: error: ")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize(("subcommand", "config", "override"), OUT_OF_RANGE, ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_an_out_of_range_setting_is_one_line_naming_it(subcommand, config, override, capsys, no_model_loads):
    option, value = override.split("=")
    line = _error(capsys, subcommand, config, override)
    assert option in line and f"{value} does not conform" in line, line


@pytest.mark.parametrize(
    ("subcommand", "config", "override"), OPTIONAL_OUT_OF_RANGE, ids=lambda v: str(v).rsplit("/", 1)[-1]
)
def test_an_out_of_range_optional_setting_is_one_line_naming_it(subcommand, config, override, capsys, no_model_loads):
    option = override.split("=")[0]
    line = _error(capsys, subcommand, config, override)
    assert option in line and "does not conform" in line, line


@pytest.mark.parametrize(
    ("subcommand", "config", "option"),
    [
        ("predict", CONF / "answer_tiny.yaml", "--model.init_args.output"),
        ("predict", CONF / "critique_revision_tiny.yaml", "--model.init_args.output"),
        ("predict", CONF / "categorise_tiny.yaml", "--model.init_args.output"),
        ("predict", CONF / "preferences_tiny.yaml", "--model.init_args.output"),
        ("test", ROOT / "configs" / "judge_check.yaml", "--model.init_args.output"),
        ("test", CONF / "eval_tiny.yaml", "--model.init_args.output_dir"),
        ("fit", CONF / "sft_tiny.yaml", "--model.init_args.output_dir"),
        ("fit", CONF / "reward_tiny.yaml", "--model.init_args.output_dir"),
        ("fit", CONF / "ppo_tiny.yaml", "--model.init_args.output_dir"),
        ("predict", CONF / "reward_score_tiny.yaml", "--model.init_args.output"),
    ],
    ids=lambda v: str(v).rsplit("/", 1)[-1],
)
def test_an_output_that_cannot_be_created_is_one_line_naming_it(subcommand, config, option, tmp_path, capsys, no_model_loads):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    for output, reason in (
        (in_the_way / "out", f"{in_the_way} is a file"),
        (Path("/proc/ucai-test/out"), "/proc does not accept new files"),
    ):
        line = _error(capsys, subcommand, config, f"{option}={output}")
        assert f"{option}: cannot write {output}: {reason}" in line, line
