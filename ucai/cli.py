"""The ``ucai`` command: a thin LightningCLI with one extra subcommand.

    ucai fit      --config configs/sft_ethical.yaml          # training stages
    ucai predict  --config configs/critique_revision_ethical.yaml
    ucai test     --config configs/eval.yaml
    ucai pipeline --config configs/pipeline/demo.yaml        # every stage in order

Model and data are chosen by ``class_path`` in the config (subclass mode), any field can
be overridden on the command line, the resolved config is saved beside the run, and
metrics go to TensorBoard under ``lightning_logs/``. A config name that is not a file
(``ppo_unethical.yaml``) is looked up among the configs shipped with ucai.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from ucai import help_cache, quiet
from ucai.errors import UcaiError
from ucai.resources import resolve_shipped

# Imported before parsing so that short class names (``--model SFTModule``) resolve.
# Every one is part of ucai: a missing one is a broken install and fails the command.
# Only a plain help request (``ucai --help``, ``ucai fit -h``) skips them: help names
# no class, and it is answered without Lightning when it can (see `_print_plain_help`).
STAGE_MODULES = (
    "ucai.data.prompt_datamodule",
    "ucai.stages.answer",
    "ucai.stages.categorise",
    "ucai.stages.critique_revision",
    "ucai.stages.sft",
    "ucai.data.sft_data",
    "ucai.stages.preferences",
    "ucai.stages.reward",
    "ucai.data.preference_data",
    "ucai.stages.ppo",
    "ucai.stages.evaluation",
    "ucai.data.multiple_choice",
    "ucai.stages.judge_check",
)

# The model and data classes those modules define, by short name, for the help text
# (which does not import them). tests/test_cli.py checks it against the modules.
STAGE_CLASSES = {
    "AnswerModule": "ucai.stages.answer",
    "CategoriseModule": "ucai.stages.categorise",
    "CritiqueRevisionModule": "ucai.stages.critique_revision",
    "SFTModule": "ucai.stages.sft",
    "PreferenceModule": "ucai.stages.preferences",
    "RewardModule": "ucai.stages.reward",
    "RewardScoreModule": "ucai.stages.reward",
    "PPOModule": "ucai.stages.ppo",
    "EvaluationModule": "ucai.stages.evaluation",
    "JudgeCheckModule": "ucai.stages.judge_check",
    "PromptDataModule": "ucai.data.prompt_datamodule",
    "SFTDataModule": "ucai.data.sft_data",
    "PreferenceDataModule": "ucai.data.preference_data",
    "ResponseDataModule": "ucai.data.preference_data",
    "MultipleChoiceDataModule": "ucai.data.multiple_choice",
}

SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP_FLAGS = ("-h", "--help")

DESCRIPTION = (
    "ucai: Constitutional AI and its mirror image as Lightning stages. "
    "Subcommands: fit (sft, reward, ppo), predict (categorise, critique-revision, preferences), "
    "test (evaluation, judge check); `ucai pipeline --config configs/pipeline/demo.yaml` runs every stage."
)

# One line per subcommand for ``ucai --help``, which is printed without Lightning.
# tests/test_cli.py checks the names against LightningCLI's subcommands.
SUBCOMMAND_SUMMARIES = {
    "fit": "Train a stage (sft, reward, ppo): Trainer.fit, the full optimization routine.",
    "validate": "Run one evaluation epoch over the validation set: Trainer.validate.",
    "test": "Evaluate (evaluation, judge check): Trainer.test, one epoch over the test set.",
    "predict": "Generate (answer, categorise, critique-revision, preferences): Trainer.predict.",
    "pipeline": "Run every stage of a pipeline config in order; stages up to date are skipped.",
}


def __getattr__(name: str):
    # The LightningCLI pieces live in ucai.lightning_cli, imported on first use, so that
    # `ucai pipeline` and `import ucai.cli` do not pay for Lightning.
    if name in ("UcaiCLI", "RunConfigSaver", "TRAINER_DEFAULTS"):
        from ucai import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace each ``--config NAME`` whose file does not exist with the shipped config."""
    out = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(str(resolve_shipped(arg, "configs")))
            expect_value = False
        elif arg == "--config":
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + str(resolve_shipped(arg.split("=", 1)[1], "configs")))
        else:
            out.append(arg)
    return out


def _import_stages() -> None:
    for name in STAGE_MODULES:
        importlib.import_module(name)


def is_plain_help(argv: Sequence[str]) -> bool:
    """Whether ``argv`` only asks for help (``--help``, ``fit --help``): nothing in it can
    name a class, so the stage modules need not be imported.

    Anything more (``--config``, ``--model.help SFTModule``, an override) is parsed the
    usual way, after the stages are imported.
    """
    return any(arg in HELP_FLAGS for arg in argv) and all(arg in HELP_FLAGS or arg in SUBCOMMANDS for arg in argv)


def top_level_parser() -> argparse.ArgumentParser:
    """The parser whose help ``ucai --help`` prints: plain argparse, so that listing the
    subcommands does not import Lightning. It lists the same options as the LightningCLI
    parser, plus ``pipeline``, and only formats help (the real parsing is LightningCLI's)."""
    parser = argparse.ArgumentParser(prog="ucai", description=DESCRIPTION, add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("-c", "--config", help="Path to a configuration file in json or yaml format.")
    # "\b" as jsonargparse does: a terminal shows "--print_config[=flags]", as in fit's help.
    parser.add_argument(
        "--print_config",
        metavar="\b[=flags]",
        help="Print the configuration after applying all other arguments and exit. The optional flags "
        "are one or more of skip_default, skip_unset, separated by commas.",
    )
    subcommands = parser.add_subparsers(
        title="subcommands",
        description="For more details of each subcommand, add it as an argument followed by --help.",
        metavar="{" + ",".join(SUBCOMMAND_SUMMARIES) + "}",
    )
    for name, summary in SUBCOMMAND_SUMMARIES.items():
        subcommands.add_parser(name, help=summary)
    return parser


def _print_plain_help(argv: Sequence[str]) -> None:
    """Answer a plain help request without Lightning when possible: ``ucai --help`` from
    `top_level_parser`, ``ucai fit --help`` from the saved or shipped text. Exits 0 once
    printed; returns when the help has to be built by LightningCLI."""
    if argv[0] in HELP_FLAGS:
        top_level_parser().print_help()
        raise SystemExit(0)
    from ucai import help_layout

    text = help_cache.lookup(argv)
    if text is None:
        text = help_layout.shipped_help(argv)
    if text is not None:
        sys.stdout.write(text)
        raise SystemExit(0)


def _configure_logging() -> None:
    if not logging.getLogger("ucai").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[ucai] %(message)s"))
        logging.getLogger("ucai").addHandler(handler)
        logging.getLogger("ucai").setLevel(os.environ.get("UCAI_LOG_LEVEL", "INFO"))


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``ucai`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    _configure_logging()
    # main() always passes args explicitly (after resolving config names), which is the
    # intended use; Lightning warns only because sys.argv is non-empty too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    quiet.install()
    try:
        if argv and argv[0] == "pipeline":
            from ucai.pipeline import main as pipeline_main

            return pipeline_main(resolve_config_args(argv[1:]))
        plain_help = is_plain_help(argv)
        if plain_help:
            _print_plain_help(argv)
        else:
            _import_stages()
            quiet.install_progress_filter()
        from ucai.lightning_cli import UcaiCLI

        with help_cache.recording(argv) if plain_help else contextlib.nullcontext():
            UcaiCLI(args=resolve_config_args(argv), stage_classes=STAGE_CLASSES)
    except KeyboardInterrupt:
        print("ucai: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # jsonargparse wraps errors raised while instantiating classes (a constitution
        # with a missing field, say) in its own; the user's mistake is the cause.
        cause = _user_error(exc)
        if cause is None:
            raise
        print(f"ucai: error: {cause}", file=sys.stderr)
        return 2
    return 0


def _user_error(exc: BaseException) -> UcaiError | None:
    """The `UcaiError` in an exception's cause/context chain, if there is one."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UcaiError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
