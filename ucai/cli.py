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
# no class, and it is answered from `ucai.help_cache` without Lightning when it can.
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


def __getattr__(name: str):
    # The LightningCLI pieces live in ucai.lightning_cli, imported on first use, so that
    # `ucai pipeline` and `import ucai.cli` do not pay for Lightning.
    if name in ("UcaiCLI", "RunConfigSaver", "TRAINER_DEFAULTS", "DESCRIPTION"):
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
            saved = help_cache.lookup(argv)
            if saved is not None:  # printed before by this same code: no Lightning needed
                sys.stdout.write(saved)
                raise SystemExit(0)
        else:
            _import_stages()
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
