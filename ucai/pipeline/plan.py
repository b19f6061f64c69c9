"""The plan: every stage run of a pipeline, with its inputs, outputs and command.

Each stage's arguments are parsed by the stage's own parser as the plan is made
(`ucai.lightning_cli.StageArgumentParser`), so a bad value in any stage fails before
the first stage runs, and the settings the pipeline acts on (a stage's precision, its
constitution) are the ones the stage will see.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ucai.errors import UcaiError
from ucai.hardware import precision_fallback
from ucai.models import check_model_name
from ucai.pipeline.config import PipelineConfig
from ucai.resources import resolve_shipped
from ucai.stage_outputs import RL_STAGES, STAGE_ORDER, STAGES

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class StageRun:
    """One stage invocation: what it reads, what it writes and the command."""

    stage: str
    side: str | None
    configs: list[Path]
    inputs: list[Path]
    outputs: list[Path]
    args: list[str]
    enabled: bool = True
    bf16_fallback: bool = False  # runs in 32-true although configured for bf16 (no native bf16 here)

    @property
    def label(self) -> str:
        return f"{self.stage} ({self.side})" if self.side else self.stage

    @property
    def mode(self) -> str:
        return STAGES[self.stage].mode

    def stage_args(self) -> list[str]:
        """The arguments of ``ucai <mode>``: its stacked configs, then the overrides."""
        stacked = [part for config in self.configs for part in ("--config", str(config))]
        return [*stacked, *self.args]

    def command(self, python: str) -> list[str]:
        return [python, "-m", "ucai.cli", self.mode, *self.stage_args()]


def is_folder_output(path: Path) -> bool:
    """Model folders have no suffix; data files do."""
    return path.suffix == ""


def find_stage_config(name: str, pipeline_config: Path) -> Path | None:
    """A stage config by path: as given, shipped, beside the pipeline config, or in the project."""
    candidates = [resolve_shipped(name, "configs"), pipeline_config.parent / name, PROJECT_ROOT / name]
    return next((c for c in candidates if c.is_file()), None)


def format_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it from the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        # Values the stage's parser made of a config's strings (a ModelCheckpoint's
        # ``train_time_interval`` as a timedelta) go back as the strings it reads.
        return json.dumps(value, default=str)
    return str(value)


def override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"--{key}={format_value(value)}" for key, value in overrides.items()]


_parser = None


def stage_parser():
    """The one `ucai.lightning_cli.StageArgumentParser` of this process (built on first use)."""
    global _parser
    if _parser is None:
        from ucai.lightning_cli import StageArgumentParser
        from ucai.stage_catalog import import_stages

        import_stages()  # configs name the stage classes
        _parser = StageArgumentParser()
    return _parser


def parse_stage(run_label: str, mode: str, configs: list[Path], overrides: dict[str, Any]):
    """A stage's effective settings (jsonargparse Namespace), as ``ucai <mode>`` parses them."""
    stacked = [part for config in configs for part in ("--config", str(config))]
    try:
        return stage_parser().parse(mode, [*stacked, *override_args(overrides)])
    except UcaiError as error:
        raise UcaiError(f"{run_label}: {error}") from None


LOGGER_FOLDER_ARGS = ("save_dir", "name")


def _class_of(class_path: object) -> type | None:
    """The class a config's ``class_path`` names, or None where it names none that
    imports (the stage's own parse reports that; the plan leaves such a setting as it is)."""
    if not isinstance(class_path, str):
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _logs_to_a_folder(settings) -> bool:
    """Whether the stage logs through one configurable logger (a class with init args)
    whose ``__init__`` names its folder by ``save_dir`` and ``name`` (TensorBoard, CSV,
    W&B loggers do; MLflow's does not and is left as configured)."""
    logger = settings.trainer.get("logger")
    cls = _class_of(logger.get("class_path")) if hasattr(logger, "get") else None
    if cls is None:
        return False
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return all(arg in parameters for arg in LOGGER_FOLDER_ARGS)


def _is_model_checkpoint(class_path: object) -> bool:
    """Whether ``class_path`` names Lightning's `ModelCheckpoint` or a subclass of it
    (PPO's `PPOCheckpoint`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cls = _class_of(class_path)
    return cls is not None and issubclass(cls, ModelCheckpoint)


def _checkpoints_under(settings, folder: Path) -> list[dict] | None:
    """The stage's callbacks with the ``dirpath`` of each `ModelCheckpoint` that names
    one moved to ``folder/checkpoints`` (a second to ``checkpoints-2``, ...); None when
    there is none to move. The shipped configs fix ``dirpath`` under ./lightning_logs
    so that ``--ckpt_path last`` finds it by hand: every pipeline (and both sides of a
    run sharing one config) would write into that one folder."""
    callbacks = settings.trainer.get("callbacks")
    if not isinstance(callbacks, list):
        return None
    entries, moved = [], 0
    for callback in callbacks:
        entry = callback.as_dict() if hasattr(callback, "as_dict") else callback
        init_args = entry.get("init_args") if isinstance(entry, dict) else None
        if isinstance(init_args, dict) and init_args.get("dirpath") and _is_model_checkpoint(entry.get("class_path")):
            moved += 1
            name = "checkpoints" if moved == 1 else f"checkpoints-{moved}"
            entry = {**entry, "init_args": {**init_args, "dirpath": str(folder / name)}}
        entries.append(entry)
    return entries if moved else None


class _Planner:
    """Builds the `StageRun` of each stage from the pipeline config."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = cfg.output_root
        self.logs = cfg.output_root / "logs"
        self.runs: list[StageRun] = []

    def output(self, stage: str, side: str | None = None) -> Path:
        return STAGES[stage].output_under(self.root, side)

    def add(self, stage: str, side: str | None, inputs: list[Path], wiring: dict[str, Any]) -> None:
        """Plan ``stage``: its configs found, ``wiring`` (the paths the pipeline passes)
        placed among the user's overrides, the logger pointed at the output root and the
        precision lowered where bf16 is not native."""
        cfg = self.cfg
        settings = cfg.stages[stage]
        names = [c.format(side=side or "") for c in settings.config]
        outputs = [self.output(stage, side)]
        label = f"{stage} ({side})" if side else stage
        if not settings.enabled:  # kept in the plan so a missing input can name its maker
            self.runs.append(StageRun(stage, side, [Path(n) for n in names], inputs, outputs, [], enabled=False))
            return
        configs = []
        for name in names:
            config = find_stage_config(name, cfg.source)
            if config is None:
                raise UcaiError(f"{cfg.source}: stages.{stage}: config {name} not found")
            configs.append(config)
        wired: dict[str, Any] = {}
        if cfg.heldout_fraction is not None and "data.init_args.split" in wiring:
            # Every stage must agree on which prompts are held out for evaluation.
            wired["data.init_args.heldout_fraction"] = cfg.heldout_fraction
        wired.update(wiring)
        wired.update(settings.overrides)  # the user's per-stage settings win
        mode = STAGES[stage].mode
        effective = parse_stage(label, mode, configs, {**cfg.common_overrides, **wired})
        staged_side = (effective.model.get("init_args") or {}).get("side")
        if side is not None and staged_side is not None and staged_side != side:
            # The run would write this side's files with the other side's principles.
            if "model.init_args.side" in {**cfg.common_overrides, **settings.overrides}:
                raise UcaiError(f"{cfg.source}: stages.{stage}: side '{staged_side}' set for the {side} side's run")
            # A stage config shared by both sides (or named for the other): the run's
            # side is set like its paths. Only where it differs, so that a run whose
            # config names its side keeps its command (and stays up to date).
            wired["model.init_args.side"] = side
        overrides = dict(cfg.common_overrides)
        redirected = _logs_to_a_folder(effective)
        if redirected:
            # One TensorBoard folder per stage and side under the root, named as the
            # shipped configs name them, so eval finds the PPO curves whatever config ran.
            overrides["trainer.logger.init_args.save_dir"] = str(self.logs)
            overrides["trainer.logger.init_args.name"] = f"{stage}_{side}" if side else stage
        overrides.update(wired)
        if "trainer.callbacks" not in overrides:  # a user's own list is theirs
            checkpoints = _checkpoints_under(effective, self.logs / (f"{stage}_{side}" if side else stage))
            if checkpoints is not None:
                overrides["trainer.callbacks"] = checkpoints
        fallback = None
        if cfg.bf16_fallback and "trainer.precision" not in overrides:
            fallback = precision_fallback(effective.trainer.get("precision"), effective.trainer.get("accelerator"))
            if fallback is not None:
                overrides["trainer.precision"] = fallback
        # What the planner adds is valid by construction (a folder the logger's class
        # takes, precision 32-true), so the final command is parsed again only where that
        # may not hold: the folder arguments come before the user's overrides (theirs
        # win), so they meet the stage config's logger, which a user override of
        # ``trainer.logger`` then replaces. Parsing is most of a plan's time (the CPU
        # experiment's plan: 11.7 s with a second parse of every stage, 9.3 s without).
        if redirected and any(key.split(".")[:2] == ["trainer", "logger"] for key in {**cfg.common_overrides, **wired}):
            parse_stage(label, mode, configs, overrides)
        # The constitution is an input like any other: editing a principle's text or its
        # response opener changes what the stage generates, so it must rerun the stage.
        constitution = (effective.model.get("init_args") or {}).get("constitution")
        if isinstance(constitution, str):
            inputs = [*inputs, resolve_shipped(constitution, "configs")]
        run = StageRun(stage, side, configs, inputs, outputs, override_args(overrides), bf16_fallback=fallback is not None)
        self.runs.append(run)


def plan(cfg: PipelineConfig) -> list[StageRun]:
    """Every stage run of ``cfg`` in the order they run: categorise, then each per-side
    stage for every side before the next stage, then eval."""
    try:  # here, not when critique-revision loads it after categorise has run
        check_model_name(cfg.model)
    except UcaiError as error:
        raise UcaiError(f"{cfg.source}: model: {error}") from None
    planner = _Planner(cfg)
    output = planner.output
    prompts = output("categorise")
    planner.add(
        "categorise", None, [Path(cfg.prompts)], {"data.init_args.path": cfg.prompts, "model.init_args.output": str(prompts)}
    )
    if cfg.preference_pretraining is not None:
        _plan_pretraining(planner)
    for side in cfg.sides:
        generation_input = {"data.init_args.path": str(prompts), "data.init_args.split": "train"}
        planner.add(
            "critique_revision",
            side,
            [prompts],
            {**generation_input, "model.init_args.model": cfg.model, "model.init_args.output": str(output("critique_revision", side))},
        )
        planner.add(
            "sft",
            side,
            [output("critique_revision", side)],
            {
                "data.init_args.path": str(output("critique_revision", side)),
                "model.init_args.model": cfg.model,
                "model.init_args.output_dir": str(output("sft", side)),
            },
        )
        planner.add(
            "preferences",
            side,
            [prompts, output("sft", side)],
            {
                **generation_input,
                "model.init_args.model": str(output("sft", side)),
                "model.init_args.output": str(output("preferences", side)),
            },
        )
        # With both sides, each reward model is also scored on the other side's pairs.
        cross = [output("preferences", other) for other in cfg.sides if other != side]
        start = _reward_start(planner, side)
        planner.add(
            "reward",
            side,
            [output("preferences", side), *cross, *start["inputs"]],
            {
                "data.init_args.path": str(output("preferences", side)),
                **({"data.init_args.cross_path": str(cross[0])} if cross else {}),
                **start["wiring"],
                "model.init_args.output_dir": str(output("reward", side)),
            },
        )
        for algorithm in RL_STAGES:
            _plan_rl(planner, algorithm, side, generation_input)
    _plan_eval(planner)
    # Stage-major order (sorted is stable: sides keep their order within a stage), so
    # both sides' preferences come before either side's reward stage.
    return sorted(planner.runs, key=lambda run: STAGE_ORDER.index(run.stage))


def _plan_pretraining(planner: _Planner) -> None:
    """Preference-model pre-training, once for both sides, on the named human comparisons.

    Its validation pairs are the benchmark's (``benchmarks/rm_hh.py``, the same hash
    split at `BENCHMARK_FRACTION`), so the model is never trained on the pairs it is
    measured on; there is no other side's file to cross-score.
    """
    from ucai.data.preference_data import BENCHMARK_FRACTION, hub_file

    cfg = planner.cfg
    path = cfg.preference_pretraining
    planner.add(
        "reward_pretrain",
        None,
        [] if hub_file(path) else [Path(path)],  # a hub file is named by its args alone
        {
            "data.init_args.path": path,
            "data.init_args.val_fraction": BENCHMARK_FRACTION,
            "data.init_args.val_size": None,  # a fixed tail split would take other pairs
            "data.init_args.cross_path": None,
            "model.init_args.model": cfg.model,
            "model.init_args.output_dir": str(planner.output("reward_pretrain")),
        },
    )


# The head each side's reward model starts from after pre-training: a Bradley–Terry
# model of the swapped preferences is the negated model.
PRETRAINED_HEAD = {"ethical": "keep", "unethical": "negate"}


def _reward_start(planner: _Planner, side: str) -> dict[str, Any]:
    """What a side's reward model starts from: the base model with a zero head, or,
    after pre-training, the pre-trained reward model with its head kept (ethical) or
    negated (unethical). ``{"inputs": [...], "wiring": {...}}``."""
    cfg = planner.cfg
    if cfg.preference_pretraining is None or not cfg.stages["reward_pretrain"].enabled:
        return {"inputs": [], "wiring": {"model.init_args.model": cfg.model}}
    pretrained = planner.output("reward_pretrain")
    wiring = {"model.init_args.model": str(pretrained), "model.init_args.init_head": PRETRAINED_HEAD[side]}
    return {"inputs": [pretrained], "wiring": wiring}


def _plan_rl(planner: _Planner, algorithm: str, side: str, generation_input: dict[str, str]) -> None:
    """One RL stage of one side. PPO and RLOO sample the train prompts and are scored by
    the side's reward model; DPO learns from the side's preference pairs directly."""
    output = planner.output
    policy = str(output("sft", side))
    if algorithm == "dpo":
        preferences = output("preferences", side)
        planner.add(
            algorithm,
            side,
            [preferences, output("sft", side)],
            {
                "data.init_args.path": str(preferences),
                "model.init_args.policy": policy,
                "model.init_args.output_dir": str(output(algorithm, side)),
            },
        )
        return
    planner.add(
        algorithm,
        side,
        [output("categorise"), output("sft", side), output("reward", side)],
        {
            **generation_input,
            "model.init_args.policy": policy,
            "model.init_args.reward_model": str(output("reward", side)),
            "model.init_args.output_dir": str(output(algorithm, side)),
        },
    )


def rl_model_names(cfg: PipelineConfig, side: str) -> dict[str, str]:
    """Evaluation's name for each RL stage's model of ``side`` that runs: ``rl_<side>``
    for the primary algorithm (the first of ``rl:``), ``<algorithm>_<side>`` for the
    others, e.g. ``{"ppo": "rl_ethical", "dpo": "dpo_ethical"}``."""
    names = {}
    for rank, algorithm in enumerate(cfg.rl):
        if cfg.stages[algorithm].enabled:
            names[algorithm] = f"rl_{side}" if rank == 0 else f"{algorithm}_{side}"
    return names


def _plan_eval(planner: _Planner) -> None:
    """The evaluation: every trained model, the comparisons that have both models, and
    both reward models as scorers."""
    cfg, output = planner.cfg, planner.output
    models = {"base": cfg.model}
    algorithms = {}  # evaluation's model name -> the RL algorithm that trained it
    for side in cfg.sides:
        if cfg.stages["sft"].enabled:
            models[f"sl_{side}"] = str(output("sft", side))
        for algorithm, name in rl_model_names(cfg, side).items():
            models[name] = str(output(algorithm, side))
            algorithms[name] = algorithm
    primary = cfg.rl[0]
    # The report's per-iteration curves: the primary algorithm's, when it samples online.
    curves = {} if primary == "dpo" else {s: str(planner.logs / f"{primary}_{s}") for s in cfg.sides}
    comparisons = [[f"sl_{s}", f"rl_{s}"] for s in cfg.sides]
    if len(cfg.sides) == 2:
        comparisons.append(["rl_ethical", "rl_unethical"])
    comparisons += [["base", f"sl_{s}"] for s in cfg.sides]
    # The other algorithms' models meet their SL model, so every model is in the Elo graph.
    comparisons += [[f"sl_{s}", name] for s in cfg.sides for name in rl_model_names(cfg, s).values() if name != f"rl_{s}"]
    comparisons = [c for c in comparisons if all(m in models for m in c)]
    reward_models = {s: output("reward", s) for s in cfg.sides} if cfg.stages["reward"].enabled else {}
    planner.add(
        "eval",
        None,
        [output("categorise"), *[Path(m) for name, m in models.items() if name != "base"], *reward_models.values()],
        {
            "data.init_args.path": str(output("categorise")),
            "data.init_args.split": "heldout",
            "model.init_args.models": models,
            "model.init_args.reward_models": {s: str(path) for s, path in reward_models.items()},
            "model.init_args.ppo_logs": curves,
            "model.init_args.algorithms": algorithms,
            "model.init_args.comparisons": comparisons,
            "model.init_args.judge": cfg.model,
            "model.init_args.output_dir": str(output("eval")),
        },
    )
