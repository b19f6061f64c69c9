"""The LightningCLI behind ``ucai fit|validate|test|predict``, and the same parser for
checking a stage's arguments without running it (`StageArgumentParser`)."""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from argparse import ArgumentError
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ucai.config_source import value_source
from ucai.errors import UcaiError
from ucai.hardware import bf16_warning
from ucai.provenance import ucai_version
from ucai.stage_catalog import DESCRIPTION, STAGE_CLASSES
from ucai.stage_progress import PROGRESS_FILE_ENV, write_progress

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


class ProgressToFile(Callback):
    """Writes where the stage stands (``training: epoch 1/2, batch 7/13``) to the file the
    pipeline names in ``UCAI_PROGRESS_FILE`` (`ucai.stage_progress`), at most once every
    ``every`` seconds and from rank 0 only, for the pipeline to print while the sides
    run side by side with their consoles in log files."""

    def __init__(self, path: str | Path, every: float = 5.0):
        self.path = Path(path)
        self.every = every
        self.last = -math.inf

    def report(self, trainer, pl_module, text: str) -> None:
        now = time.monotonic()
        if not trainer.is_global_zero or now - self.last < self.every:
            return
        self.last = now
        rates = getattr(pl_module, "throughput", None)  # the generating stages' prompts/s
        if rates and "prompts/s" in rates:
            text += f", {rates['prompts/s']:.2f} prompts/s"
        try:
            write_progress(self.path, text)
        except OSError as error:  # a progress line is never worth the stage's run
            log.warning("progress line not written to %s (%s); no more are tried", self.path, error)
            self.last = math.inf

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epochs = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, " if (trainer.max_epochs or 0) > 0 else ""
        self.report(trainer, pl_module, f"training: {epochs}batch {batch_idx + 1}/{_count(trainer.num_training_batches)}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = _count(trainer.num_predict_batches[dataloader_idx])
        self.report(trainer, pl_module, f"predicting: batch {batch_idx + 1}/{total}")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        total = _count(trainer.num_test_batches[dataloader_idx])
        self.report(trainer, pl_module, f"testing: batch {batch_idx + 1}/{total}")


def _count(batches: float) -> str:
    return "?" if math.isinf(batches) else str(int(batches))


def stage_listing(stage_classes: Mapping[str, str]) -> str:
    """One help paragraph naming ucai's model and data classes.

    jsonargparse lists "known subclasses" only among classes already imported, and the
    help path does not import the stages, so the names come from the catalog instead.
    """
    models = [name for name in stage_classes if not name.endswith("DataModule")]
    data = [name for name in stage_classes if name.endswith("DataModule")]
    return (
        f"ucai models (--model NAME): {', '.join(models)}. "
        f"ucai data (--data NAME): {', '.join(data)}. "
        "A config may name them by full class_path instead (ucai.stages.sft.SFTModule)."
    )


def one_line(error: ArgumentError, argv: Sequence[str] = ()) -> UcaiError:
    """jsonargparse's error, which spans every alternative it tried, as the one line a
    user needs: the option as they would type it and what is wrong with its value.

    ``Parser key "model": ... Problem with given class_path 'X': Parser key "kl_coef":
    Expected a <class 'float'>. Got value: abc`` becomes
    ``--model.init_args.kl_coef: Expected a <class 'float'>. Got value: abc``; where the
    reason leaves the value out, the value jsonargparse was given is added. Where a
    config file among ``argv`` (the parsed arguments) set the option, its file and line
    lead the message instead of the value (jsonargparse's value would be the file's
    whole mapping)."""
    lines = [raw.strip().removeprefix("- ").strip() for raw in str(error).splitlines()]
    keys: list[str] = []
    detail = given = None
    for number, line in enumerate(lines):
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key[1])
            if key[2]:
                detail = key[2]
                break
            continue
        if re.match(r"Problem with given class_path '[^']+':", line):
            # Only a top-level class (--model, --data) is written with init_args.
            if len(keys) == 1:
                keys.append("init_args")
            continue
        if line.startswith("Does not validate against any of the Union subtypes"):
            detail = _union_mismatch(lines[number:])
        if line.startswith(("Does not validate against", "Subtypes:", "Errors:")) or not line:
            if detail is None:
                continue
        detail = detail or line
        given = next((rest.split(":", 1)[1].strip() for rest in lines[number:] if rest.startswith("Given value:")), None)
        nested = re.fullmatch(r"NestedArg\(key='[^']*', val=(.*)\)", given or "")
        if nested:
            given = nested[1].strip("'\"")
        break
    if not keys or detail is None:
        text = " ".join(str(error).split())
        option = re.search(r"does not accept option '([^']+)'", text)
        source = value_source(argv, option[1].split(".")) if option else None
        return UcaiError(f"{source[0]}:{source[1]}: {text}" if source else text)
    unknown = re.match(r"Option '([^']+)' is not accepted", detail)
    path = ".".join(keys).split(".") + ([unknown[1]] if unknown else [])
    # A mapping as the value given is a class's whole mapping, as read from a config
    # file: jsonargparse checks a file's values as it reads it, before any later
    # command-line option could replace them.
    from_mapping = bool(given and given.startswith("{"))
    source = value_source(argv, path, files_only=from_mapping)
    # jsonargparse names the value after a colon ("Got value: x", "PositiveInt: 0 does ...").
    if given and not (source and from_mapping) and not re.search(rf"\w: '?{re.escape(given)}'?(\s|$)", detail):
        detail = f"{detail} (given: {given})"
    where = f"{source[0]}:{source[1]}: " if source else ""
    return UcaiError(f"{where}--{'.'.join(keys)}: {detail}")


def _union_mismatch(lines: Sequence[str]) -> str | None:
    """``not one of: 64, 32, 16, '16-mixed', ..., null`` for a value that is none of a
    union's literal choices (Lightning's ``precision``), rather than the first
    alternative's complaint alone (``Expected a <class 'int'>``); None where an
    alternative says more than "Expected a" (its own message is then the one to show)."""
    subtypes = next((line for line in lines if line.startswith("Subtypes:")), None)
    errors = [line for line in lines if line.startswith("Expected a")]
    others = [line for line in lines[lines.index("Errors:") + 1 :] if not line.startswith(("Expected a", "Given value"))] if "Errors:" in lines else []
    if subtypes is None or not errors or others:
        return None
    choices = []
    for literal, name in re.findall(r"typing\.Literal\[([^\]]*)\]|<class '([^']+)'>", subtypes):
        choices.append(literal if literal else ("null" if name == "NoneType" else f"any {name}"))
    return f"not one of: {', '.join(choices)}"


class UcaiCLI(LightningCLI):
    """LightningCLI with ucai's defaults: subclass mode, TensorBoard, overwrite-able configs,
    and errors raised (`one_line` makes them a line) rather than printed with the usage."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True):
        # The saved config.yaml names the code that ran it, beside Lightning's version.
        header = [f"lightning.pytorch=={lightning.pytorch.__version__}", ucai_version()]
        parser_kwargs: dict = {"prog": "ucai", "description": DESCRIPTION, "exit_on_error": False, "dump_header": header}
        for subcommand in self.subcommands():
            parser_kwargs[subcommand] = {"epilog": stage_listing(STAGE_CLASSES), "exit_on_error": False, "dump_header": header}
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

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if progress := os.environ.get(PROGRESS_FILE_ENV):  # set by the pipeline for a stage run side by side
            trainer.callbacks.append(ProgressToFile(progress))
        return trainer

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        trainer = (config or {}).get("trainer") or {}
        warning = bf16_warning(trainer.get("precision"), trainer.get("accelerator"))
        if warning is not None:
            log.warning(warning)


class _ParserOnly(UcaiCLI):
    """Builds and parses, and instantiates nothing."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:  # parsing must not touch the global RNGs
        pass

    def _parse_ckpt_path(self) -> None:  # would read the checkpoint named by ckpt_path
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


class StageArgumentParser:
    """Parses a stage's arguments (``fit --config X.yaml --model.init_args.k=v ...``)
    exactly as ``ucai fit`` will, and returns the effective settings.

    The pipeline parses every stage before the first one runs, so a bad value in a late
    stage's override fails at once. One parser serves every stage (building it is the
    slow part); the stage modules must be imported (`ucai.stage_catalog.import_stages`).
    """

    def __init__(self):
        self._parser = None

    def parse(self, subcommand: str, args: Sequence[str]):
        """The stage's effective settings (a jsonargparse Namespace: ``settings.trainer.precision``,
        ``settings.model.init_args``); a bad value raises a one-line `UcaiError`."""
        command = [subcommand, *args]
        try:
            if self._parser is None:
                with warnings.catch_warnings():
                    # The arguments are a stage's, not this process's sys.argv, on purpose.
                    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
                    self._parser = _ParserOnly(args=command).parser
            return self._parser.parse_args(command)[subcommand]
        except ArgumentError as error:
            raise one_line(error, command) from None
