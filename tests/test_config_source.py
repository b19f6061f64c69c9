"""Which config file and line gave an option its value (`ucai.config_source`), and the
one-line errors that name them."""

from __future__ import annotations

from argparse import ArgumentError

from ucai.config_source import key_line, value_source
from ucai.lightning_cli import one_line

CONFIG = """\
trainer:
  precision: 32-true
model:
  class_path: ucai.stages.sft.SFTModule
  init_args:
    learning_rate: abc
    lora:
      r: 4
"""


def test_key_line_walks_the_mapping_and_finds_nothing_outside_it(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(CONFIG)
    assert key_line(path, ["trainer", "precision"]) == 2
    assert key_line(path, ["model", "init_args", "lora", "r"]) == 8
    assert key_line(path, ["model", "init_args", "lora", "alpha"]) is None
    assert key_line(path, ["model", "class_path", "x"]) is None  # a scalar has no keys
    assert key_line(tmp_path / "missing.yaml", ["trainer"]) is None
    (tmp_path / "bad.yaml").write_text("trainer: [unclosed\n")
    assert key_line(tmp_path / "bad.yaml", ["trainer"]) is None


def test_the_last_argument_that_sets_a_key_is_its_source(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(CONFIG)
    second.write_text("model:\n  init_args:\n\n    learning_rate: 0.1\n")
    keys = ["model", "init_args", "learning_rate"]
    assert value_source(["fit", "--config", str(first)], keys) == (first, 6)
    assert value_source(["fit", f"--config={first}", "-c", str(second)], keys) == (second, 4)
    # A later command-line option replaces the file's value, by its own key or one above it.
    assert value_source(["fit", "-c", str(first), "--model.init_args.learning_rate=1"], keys) is None
    assert value_source(["fit", "-c", str(first), "--model=other.yaml"], keys) is None
    assert value_source(["fit", "-c", str(first), "--model.init_args.lora.r=2"], keys) == (first, 6)
    # ... unless the value is known to come from a file.
    assert value_source(["fit", "-c", str(first), "--model.init_args.learning_rate=1"], keys, files_only=True) == (first, 6)
    # A mapping given on the command line is not the file's, though (the file's line
    # would name a valid value).
    lora = ["model", "init_args", "lora", "r"]
    assert value_source(["fit", "-c", str(first), '--model.init_args.lora={"r": "abc"}'], lora, files_only=True) is None
    assert value_source(["fit", "-c", str(first), "--model", '{"init_args": {}}'], lora, files_only=True) is None
    assert value_source(["fit", "-c", str(first), "--model.init_args.lora.r=2"], lora, files_only=True) == (first, 8)
    assert value_source(["fit", "--trainer.precision=16"], keys) is None


def test_a_value_from_a_file_is_named_by_its_file_and_line_not_by_the_files_mapping(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(CONFIG)
    mapping = "{'class_path': 'ucai.stages.sft.SFTModule', 'init_args': {'learning_rate': 'abc'}}"
    message = (
        'Parser key "model":\n  Errors:\n    - Problem with given class_path \'ucai.stages.sft.SFTModule\':\n'
        '        Parser key "learning_rate":\n          Expected a <class \'float\'>\n'
        f"  Given value: {mapping}\n"
    )
    argv = ["fit", "--config", str(path)]
    assert str(one_line(ArgumentError(None, message), argv)) == (
        f"{path}:6: --model.init_args.learning_rate: Expected a <class 'float'>"
    )
    # Without the arguments (or with the value set on the command line) the value given is shown.
    assert str(one_line(ArgumentError(None, message))) == (
        f"--model.init_args.learning_rate: Expected a <class 'float'> (given: {mapping})"
    )
    unknown = "Subcommand 'fit' does not accept option 'trainer.precision'"
    assert str(one_line(ArgumentError(None, unknown), argv)) == f"{path}:2: {unknown}"


def test_a_value_that_is_none_of_a_unions_literals_lists_them():
    message = (
        'Parser key "trainer.precision":\n  Does not validate against any of the Union subtypes\n'
        "  Subtypes: [typing.Literal[64, 32], typing.Literal['bf16-mixed', '32-true'], <class 'NoneType'>]\n"
        "  Errors:\n    - Expected a <class 'int'>\n    - Expected a typing.Literal['bf16-mixed', '32-true']\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: 33-true\n"
    )
    assert str(one_line(ArgumentError(None, message))) == (
        "--trainer.precision: not one of: 64, 32, 'bf16-mixed', '32-true', null (given: 33-true)"
    )
