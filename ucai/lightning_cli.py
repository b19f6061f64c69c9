"""The LightningCLI behind ``ucai fit|predict|test``.

Kept apart from `ucai.cli` because importing Lightning costs seconds: ``ucai pipeline``
hands off to `ucai.pipeline` without it, and `ucai.cli` imports this module only when
a Lightning subcommand (or its help) runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ucai.cli import DESCRIPTION
from ucai.hardware import bf16_warning

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "ucai"},
    },
}


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config into the run's log folder; with no logger there is no
    run folder, so nothing is written (rather than a stray config.yaml in the cwd)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


def stage_listing(stage_classes: Mapping[str, str]) -> str:
    """One help paragraph naming ucai's model and data classes.

    jsonargparse lists "known subclasses" only among classes already imported, and the
    help path does not import the stages (seconds of transformers and peft), so the
    names come from `ucai.cli.STAGE_CLASSES` instead.
    """
    models = [name for name in stage_classes if not name.endswith("DataModule")]
    data = [name for name in stage_classes if name.endswith("DataModule")]
    return (
        f"ucai models (--model NAME): {', '.join(models)}. "
        f"ucai data (--data NAME): {', '.join(data)}. "
        "A config may name them by full class_path instead (ucai.stages.sft.SFTModule)."
    )


class UcaiCLI(LightningCLI):
    """LightningCLI with ucai's defaults: subclass mode, TensorBoard, overwrite-able configs."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        run: bool = True,
        stage_classes: Mapping[str, str] | None = None,
        formatter_class: type | None = None,
    ):
        """``formatter_class``: the help formatter of every parser (`ucai.help_layout`
        passes one that records the help it prints)."""
        parser_kwargs: dict = {"prog": "ucai", "description": DESCRIPTION}
        subcommand_kwargs: dict = {}
        if stage_classes:
            subcommand_kwargs["epilog"] = stage_listing(stage_classes)
        if formatter_class is not None:
            parser_kwargs["formatter_class"] = subcommand_kwargs["formatter_class"] = formatter_class
        for subcommand in self.subcommands():
            parser_kwargs[subcommand] = dict(subcommand_kwargs)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            parser_kwargs=parser_kwargs,
            args=args,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = (config or {}).get("trainer") or {}
        warning = bf16_warning(trainer.get("precision"), trainer.get("accelerator"))
        if warning is not None:
            log.warning(warning)
