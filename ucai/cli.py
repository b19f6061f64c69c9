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

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ucai.errors import UcaiError
from ucai.resources import resolve_shipped

# Imported so that short class names (``--model SFTModule``) resolve. Every one is part
# of ucai: a missing one is a broken install and fails the command.
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

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "ucai"},
    },
}


DESCRIPTION = (
    "ucai: Constitutional AI and its mirror image as Lightning stages. "
    "Subcommands: fit (sft, reward, ppo), predict (categorise, critique-revision, preferences), "
    "test (evaluation, judge check); `ucai pipeline --config configs/pipeline/demo.yaml` runs every stage."
)


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run's log folder; with no logger there is no
    run folder, so nothing is written (rather than a stray config.yaml in the cwd)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


class UcaiCLI(LightningCLI):
    """LightningCLI with ucai's defaults: subclass mode, TensorBoard, overwrite-able configs."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            parser_kwargs={"prog": "ucai", "description": DESCRIPTION},
            args=args,
            run=run,
        )


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
    try:
        if argv and argv[0] == "pipeline":
            from ucai.pipeline import main as pipeline_main

            return pipeline_main(resolve_config_args(argv[1:]))
        _import_stages()
        UcaiCLI(args=resolve_config_args(argv))
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
