"""Run the whole Constitutional AI pipeline, for one or both constitutions, then evaluate.

    ucai pipeline --config configs/pipeline/demo.yaml
    ucai pipeline --config configs/pipeline/demo.yaml --force sft     # rerun sft and later
    ucai pipeline --config configs/pipeline/demo.yaml --dry-run       # print the commands

Stages, in order: categorise (once), then critique_revision → sft → preferences →
reward → ppo, each for every side before the next stage starts, then eval (once).
Stage by stage rather than side by side so that both sides' preferences exist before
either reward stage: each side's reward stage also scores the OTHER side's pairs
(``data.init_args.cross_path``; the reward models of a constitution and its inverse
should disagree: ``cross_accuracy`` < 0.5 in ``reward_stats.json``). The other side's
preference file is therefore an input of a reward stage too: regenerating one side's
preferences reruns both reward stages. Each stage runs as its own process,
``python -m ucai.cli <fit|predict|test> --config <stage config> <overrides...>``, so its
memory is returned when it ends and a crash stays inside it; on a CPU machine it is
forked from the pipeline, which imports the libraries once (`ucai.stage_process`,
``fork_stages``). Stages configured for bf16 run in ``32-true`` where bf16 matmuls are
not native (`ucai.hardware`, ``bf16_fallback``). The pipeline passes each stage the
paths of its inputs and outputs under ``output_root``::

    <root>/data/prompts.jsonl                 categorise
    <root>/data/<side>/sl.jsonl               critique_revision
    <root>/models/<side>/sl_model/            sft
    <root>/data/<side>/preferences.jsonl      preferences
    <root>/models/<side>/rm_model/            reward
    <root>/models/<side>/rl_model/            ppo
    <root>/eval/ (report.md, scores.jsonl)    eval
    <root>/logs/<stage config name>/          TensorBoard runs

Skipping and resuming. When a stage succeeds, a ``.ucai-stage.json`` beside its output
(inside an output folder, or ``.<file>.ucai-stage.json`` next to an output file)
records a hash of the stage's command, its config file's text and its inputs (file
contents; for model folders the hash recorded in their own marker). A rerun skips a
stage whose outputs exist and whose hash matches, so changing a config or an input
reruns that stage and, through the hashes, everything after it. An interrupted stage
with an unchanged hash resumes: predict stages keep their shard files and skip finished
prompts, evaluation keeps its answer cache, fit stages start again (their outputs are
written atomically at the end). A stage whose hash changed starts from clean outputs.
The hash does not cover ucai's own code: after changing code, use ``--force STAGE``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ucai import stage_process
from ucai.constitution import SIDES
from ucai.errors import UcaiError
from ucai.resources import resolve_shipped
from ucai.stage_process import StageProcess

STAGE_ORDER = ("categorise", "critique_revision", "sft", "preferences", "reward", "ppo", "eval")
PER_SIDE = {"critique_revision", "sft", "preferences", "reward", "ppo"}
MODES = {
    "categorise": "predict",
    "critique_revision": "predict",
    "sft": "fit",
    "preferences": "predict",
    "reward": "fit",
    "ppo": "fit",
    "eval": "test",
}
MAKERS = {
    "categorise": "configs/categorise.yaml",
    "critique_revision": "configs/critique_revision_{side}.yaml",
    "sft": "configs/sft_{side}.yaml",
    "preferences": "configs/preferences_{side}.yaml",
    "reward": "configs/reward_{side}.yaml",
    "ppo": "configs/ppo_{side}.yaml",
    "eval": "configs/eval.yaml",
}
TOP_LEVEL_KEYS = {
    "output_root", "sides", "model", "prompts", "heldout_fraction", "common_overrides", "stages", "python",
    "parallel_sides", "bf16_fallback", "fork_stages",
}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STAGE_KEYS = {"config", "overrides", "enabled"}
MARKER = ".ucai-stage.json"


# --------------------------------------------------------------------------- config


@dataclass
class StageSettings:
    config: list[str]  # stacked like repeated --config (e.g. a stage config + a strategy)
    overrides: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True


@dataclass
class PipelineConfig:
    """The pipeline YAML (see configs/pipeline/demo.yaml for every key, commented)."""

    source: Path
    output_root: Path
    sides: list[str]
    model: str
    prompts: str
    heldout_fraction: float | None
    common_overrides: dict[str, Any]
    stages: dict[str, StageSettings]
    python: str
    parallel_sides: bool = False
    bf16_fallback: bool = True
    fork_stages: bool = True


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UcaiError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    resolved = resolve_shipped(path, "configs")
    if not resolved.is_file():
        raise UcaiError(f"{path}: pipeline config not found")
    try:
        data = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UcaiError(f"{resolved}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError as exc:
        raise UcaiError(f"{resolved}: not valid UTF-8 ({exc.reason})") from None
    data = _mapping(data, str(resolved))
    unknown = sorted(set(data) - TOP_LEVEL_KEYS)
    if unknown:
        raise UcaiError(f"{resolved}: unknown key(s) {unknown}; known keys: {sorted(TOP_LEVEL_KEYS)}")
    sides = data.get("sides", list(SIDES))
    if not isinstance(sides, list) or not sides or any(s not in SIDES for s in sides):
        raise UcaiError(f"{resolved}: 'sides' must be a non-empty list of {list(SIDES)}, got {sides!r}")
    stages_raw = _mapping(data.get("stages"), f"{resolved}: 'stages'")
    unknown = sorted(set(stages_raw) - set(STAGE_ORDER))
    if unknown:
        raise UcaiError(f"{resolved}: unknown stage(s) {unknown}; stages are {list(STAGE_ORDER)}")
    stages = {}
    for name in STAGE_ORDER:
        raw = _mapping(stages_raw.get(name), f"{resolved}: stages.{name}")
        bad = sorted(set(raw) - STAGE_KEYS)
        if bad:
            raise UcaiError(f"{resolved}: stages.{name}: unknown key(s) {bad}; known keys: {sorted(STAGE_KEYS)}")
        configs = raw.get("config", MAKERS[name])
        configs = configs if isinstance(configs, list) else [configs]
        if not configs or not all(isinstance(c, str) and c for c in configs):
            raise UcaiError(f"{resolved}: stages.{name}.config must be a file name or a list of them")
        stages[name] = StageSettings(
            config=configs,
            overrides=_mapping(raw.get("overrides"), f"{resolved}: stages.{name}.overrides"),
            enabled=bool(raw.get("enabled", True)),
        )
    return PipelineConfig(
        source=resolved,
        output_root=Path(str(data.get("output_root", "lightning_logs/pipeline"))),
        sides=list(dict.fromkeys(sides)),
        model=str(data.get("model", "smollm2-135m")),
        prompts=str(data.get("prompts", "data/red_team_prompts.jsonl")),
        heldout_fraction=_fraction(data.get("heldout_fraction"), resolved),
        common_overrides=_mapping(data.get("common_overrides"), f"{resolved}: 'common_overrides'"),
        stages=stages,
        python=str(data.get("python") or sys.executable),
        parallel_sides=_flag(data.get("parallel_sides", False), "parallel_sides", resolved),
        bf16_fallback=_flag(data.get("bf16_fallback", True), "bf16_fallback", resolved),
        fork_stages=_flag(data.get("fork_stages", True), "fork_stages", resolved),
    )


def _flag(value, key: str, source: Path) -> bool:
    if not isinstance(value, bool):
        raise UcaiError(f"{source}: '{key}' must be true or false, got {value!r}")
    return value


def _fraction(value, source: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UcaiError(f"{source}: 'heldout_fraction' must be a number between 0 and 1, got {value!r}")
    return float(value)


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
        return json.dumps(value)
    return str(value)


def override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"--{key}={format_value(value)}" for key, value in overrides.items()]


# --------------------------------------------------------------------------- the plan


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
        return MODES[self.stage]

    @property
    def marker(self) -> Path:
        primary = self.outputs[0]
        return primary / MARKER if self._is_dir_output(primary) else primary.with_name(f".{primary.name}{MARKER}")

    @staticmethod
    def _is_dir_output(path: Path) -> bool:
        return path.suffix == ""

    def command(self, python: str) -> list[str]:
        stacked = [part for config in self.configs for part in ("--config", str(config))]
        return [python, "-m", "ucai.cli", self.mode, *stacked, *self.args]


def _logger_configured(config: Path) -> bool:
    """Whether the stage config has a logger we can point at the output root."""
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UcaiError(f"{config}: could not read stage config ({exc})") from None
    logger = (data.get("trainer") or {}).get("logger")
    return isinstance(logger, dict) and "class_path" in logger


def _configured(configs: list[Path], overrides: dict[str, Any], key: str) -> Any:
    """A stage setting as the stage will see it, by dotted ``key``
    (``trainer.precision``): the override, else the last config that sets it."""
    if key in overrides:
        return overrides[key]
    value = None
    for config in configs:
        found = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        for part in key.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        value = found if found is not None else value
    return value


def _constitution_of(configs: list[Path], overrides: dict[str, Any]) -> Path | None:
    """The constitution file a stage reads.

    It is an input like any other: editing a principle's text or ``response_opener``
    changes what the stage generates, so it must rerun the stage."""
    name = _configured(configs, overrides, "model.init_args.constitution")
    return resolve_shipped(name, "configs") if isinstance(name, str) else None


def _precision_fallback(configs: list[Path], overrides: dict[str, Any]) -> str | None:
    """``32-true`` for a stage configured for bf16 on a device without native bf16 (a
    CPU without AVX-512/AMX, where bf16 matmuls run several times slower than fp32)."""
    from ucai.hardware import precision_fallback  # imports torch: only when a stage is planned

    return precision_fallback(
        _configured(configs, overrides, "trainer.precision"), _configured(configs, overrides, "trainer.accelerator")
    )


def plan(cfg: PipelineConfig) -> list[StageRun]:
    root = cfg.output_root
    prompts = root / "data" / "prompts.jsonl"
    logs = root / "logs"
    runs: list[StageRun] = []

    def paths(side: str) -> dict[str, Path]:
        return {
            "sl": root / "data" / side / "sl.jsonl",
            "sl_model": root / "models" / side / "sl_model",
            "prefs": root / "data" / side / "preferences.jsonl",
            "rm_model": root / "models" / side / "rm_model",
            "rl_model": root / "models" / side / "rl_model",
        }

    def add(stage: str, side: str | None, inputs: list[Path], outputs: list[Path], wiring: dict[str, Any]) -> None:
        settings = cfg.stages[stage]
        names = [c.format(side=side or "") for c in settings.config]
        if not settings.enabled:  # kept in the plan so a missing input can name its maker
            runs.append(StageRun(stage, side, [Path(n) for n in names], inputs, outputs, [], enabled=False))
            return
        configs = []
        for name in names:
            config = find_stage_config(name, cfg.source)
            if config is None:
                raise UcaiError(f"{cfg.source}: stages.{stage}: config {name} not found")
            configs.append(config)
        overrides = dict(cfg.common_overrides)
        if _logger_configured(configs[0]):
            # One TensorBoard folder per stage and side under the root, named as the
            # shipped configs name them, so eval finds the PPO curves whatever config ran.
            overrides["trainer.logger.init_args.save_dir"] = str(logs)
            overrides["trainer.logger.init_args.name"] = f"{stage}_{side}" if side else stage
        if cfg.heldout_fraction is not None and "data.init_args.split" in wiring:
            # Every stage must agree on which prompts are held out for evaluation.
            overrides["data.init_args.heldout_fraction"] = cfg.heldout_fraction
        overrides.update(wiring)
        overrides.update(settings.overrides)  # the user's per-stage settings win
        fallback = None
        if cfg.bf16_fallback and "trainer.precision" not in overrides:
            fallback = _precision_fallback(configs, overrides)
            if fallback is not None:
                overrides["trainer.precision"] = fallback
        constitution = _constitution_of(configs, overrides)
        if constitution is not None:
            inputs = [*inputs, constitution]
        runs.append(
            StageRun(stage, side, configs, inputs, outputs, override_args(overrides), bf16_fallback=fallback is not None)
        )

    add(
        "categorise",
        None,
        [Path(cfg.prompts)],
        [prompts],
        {"data.init_args.path": cfg.prompts, "model.init_args.output": str(prompts)},
    )
    for side in cfg.sides:
        p = paths(side)
        add(
            "critique_revision",
            side,
            [prompts],
            [p["sl"]],
            {
                "data.init_args.path": str(prompts),
                "data.init_args.split": "train",
                "model.init_args.model": cfg.model,
                "model.init_args.output": str(p["sl"]),
            },
        )
        add(
            "sft",
            side,
            [p["sl"]],
            [p["sl_model"]],
            {
                "data.init_args.path": str(p["sl"]),
                "model.init_args.model": cfg.model,
                "model.init_args.output_dir": str(p["sl_model"]),
            },
        )
        add(
            "preferences",
            side,
            [prompts, p["sl_model"]],
            [p["prefs"]],
            {
                "data.init_args.path": str(prompts),
                "data.init_args.split": "train",
                "model.init_args.model": str(p["sl_model"]),
                "model.init_args.output": str(p["prefs"]),
            },
        )
        # With both sides, each reward model is also scored on the other side's pairs.
        cross = [paths(other)["prefs"] for other in cfg.sides if other != side]
        add(
            "reward",
            side,
            [p["prefs"], *cross],
            [p["rm_model"]],
            {
                "data.init_args.path": str(p["prefs"]),
                **({"data.init_args.cross_path": str(cross[0])} if cross else {}),
                "model.init_args.model": cfg.model,
                "model.init_args.output_dir": str(p["rm_model"]),
            },
        )
        add(
            "ppo",
            side,
            [prompts, p["sl_model"], p["rm_model"]],
            [p["rl_model"]],
            {
                "data.init_args.path": str(prompts),
                "data.init_args.split": "train",
                "model.init_args.policy": str(p["sl_model"]),
                "model.init_args.reward_model": str(p["rm_model"]),
                "model.init_args.output_dir": str(p["rl_model"]),
            },
        )
    models = {"base": cfg.model}
    for side in cfg.sides:
        p = paths(side)
        if cfg.stages["sft"].enabled:
            models[f"sl_{side}"] = str(p["sl_model"])
        if cfg.stages["ppo"].enabled:
            models[f"rl_{side}"] = str(p["rl_model"])
    comparisons = [[f"sl_{s}", f"rl_{s}"] for s in cfg.sides]
    if len(cfg.sides) == 2:
        comparisons.append(["rl_ethical", "rl_unethical"])
    comparisons += [["base", f"sl_{s}"] for s in cfg.sides]
    comparisons = [c for c in comparisons if all(m in models for m in c)]
    eval_dir = root / "eval"
    add(
        "eval",
        None,
        [prompts, *[Path(m) for name, m in models.items() if name != "base"],
         *[paths(s)["rm_model"] for s in cfg.sides if cfg.stages["reward"].enabled]],
        [eval_dir],
        {
            "data.init_args.path": str(prompts),
            "data.init_args.split": "heldout",
            "model.init_args.models": models,
            "model.init_args.reward_models": (
                {s: str(paths(s)["rm_model"]) for s in cfg.sides} if cfg.stages["reward"].enabled else {}
            ),
            "model.init_args.ppo_logs": {s: str(logs / f"ppo_{s}") for s in cfg.sides},
            "model.init_args.comparisons": comparisons,
            "model.init_args.judge": cfg.model,
            "model.init_args.output_dir": str(eval_dir),
        },
    )
    # Stage-major order (sorted is stable: sides keep their order within a stage), so
    # both sides' preferences come before either side's reward stage.
    return sorted(runs, key=lambda run: STAGE_ORDER.index(run.stage))


# --------------------------------------------------------------------------- hashing


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_fingerprint(path: Path) -> str:
    """Content hash of a file; for a folder the hash its producing stage recorded."""
    resolved = resolve_shipped(path, "data") if not path.exists() else path
    if resolved.is_file():
        return _file_digest(resolved)
    if resolved.is_dir():
        marker = resolved / MARKER
        if marker.is_file():
            return json.loads(marker.read_text())["hash"]
        listing = sorted((str(p.relative_to(resolved)), p.stat().st_size) for p in resolved.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return "missing"


def stage_hash(run: StageRun) -> str:
    payload = {
        "stage": run.stage,
        "side": run.side,
        "mode": run.mode,
        "configs": [config.read_text(encoding="utf-8") for config in run.configs],
        "args": run.args,
        "inputs": {str(p): input_fingerprint(p) for p in run.inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def outputs_complete(run: StageRun) -> bool:
    for path in run.outputs:
        if StageRun._is_dir_output(path):
            if not path.is_dir() or not any(p.name != MARKER for p in path.iterdir()):
                return False
        elif not path.is_file() or path.stat().st_size == 0:
            return False
    return True


def read_marker(run: StageRun) -> dict | None:
    try:
        return json.loads(run.marker.read_text())
    except (OSError, ValueError):
        return None


def state_file(root: Path, run: StageRun) -> Path:
    return root / ".pipeline" / f"{run.stage}{'-' + run.side if run.side else ''}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    from ucai.data.io import atomic_output

    with atomic_output(path) as handle:
        json.dump(data, handle, indent=2)


def clean_outputs(run: StageRun) -> None:
    """Remove a stage's outputs, their CSV twins, shards and marker (a changed stage restarts clean)."""
    for path in run.outputs:
        if StageRun._is_dir_output(path):
            shutil.rmtree(path, ignore_errors=True)
            continue
        # Everything named <stem>.*: the CSV twin, shard folders and the extra files some
        # stages keep beside their output (prompts.all.jsonl, preferences.dropped.jsonl).
        if path.parent.is_dir():
            for sibling in path.parent.glob(path.stem + ".*"):
                if sibling.is_dir():
                    shutil.rmtree(sibling, ignore_errors=True)
                else:
                    sibling.unlink(missing_ok=True)
        run.marker.unlink(missing_ok=True)


# --------------------------------------------------------------------------- running


def start_stage(
    run: StageRun, python: str, threads: int | None = None, log: Path | None = None, fork: bool = False
) -> StageProcess:
    """Start one stage (see `ucai.stage_process`).

    Args:
        threads: CPU threads for the stage's torch (``OMP_NUM_THREADS``); None: torch's default.
        log: file for the stage's console output (stages running side by side would
            interleave their progress bars); None: this process's console.
        fork: fork it from this process (after `stage_process.prepare_fork`) rather
            than start a fresh interpreter.
    """
    return stage_process.start(run.command(python), threads, log, fork)


def run_stage(run: StageRun, python: str, threads: int | None = None, log: Path | None = None, fork: bool = False) -> int:
    """Run one stage to the end and return its exit status (arguments as `start_stage`)."""
    process = start_stage(run, python, threads, log, fork)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.interrupt()
        process.wait()
        raise


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def timed_run(run: StageRun, python: str, fork: bool = False) -> tuple[int, float]:
    """`run_stage` on this console, returning (exit status, seconds)."""
    begin = time.perf_counter()
    code = run_stage(run, python, fork=fork)
    return code, time.perf_counter() - begin


def run_side_by_side(runs: list[StageRun], python: str, logs: Path, fork: bool = False) -> list[tuple[int, float]]:
    """Run the sides of one stage at the same time, the CPUs split between them.

    On a small CPU machine this is faster than one after the other: a stage's import,
    model loading, tokenising and the per-token Python work of decoding use one core,
    and a 135M model's small matmuls gain little from a second thread. Each stage's
    console output goes to ``logs/console/<stage>_<side>.log``. The CPUs are split, not
    shared: two demo generation stages at once took 47 s with one thread each and 146 s
    with two each (OpenMP threads spinning against each other).
    """
    threads = max(1, available_cpus() // len(runs))
    (logs / "console").mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    # Started here, on the main thread: a process that forks must not have other threads.
    processes = [start_stage(run, python, threads, console_log(logs, run), fork) for run in runs]

    def finish(process: StageProcess) -> tuple[int, float]:
        code = process.wait()
        return code, time.perf_counter() - begin

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = [pool.submit(finish, process) for process in processes]
        try:
            return [future.result() for future in futures]
        except KeyboardInterrupt:
            for process in processes:
                process.interrupt()
            raise


def decide_fork(cfg: PipelineConfig) -> bool:
    """Whether this pipeline forks its stages (``fork_stages``, where `stage_process.prepare_fork`
    allows it); says which, and why not, on the console."""
    if not cfg.fork_stages:
        return False
    why_not = stage_process.prepare_fork(cfg.python)
    if why_not is None:
        print(
            f"ucai pipeline: stages are forked from this process, which imported their libraries once "
            f"({stage_process.preload():.1f} s; fork_stages: false starts each in a fresh interpreter)",
            flush=True,
        )
        return True
    print(f"ucai pipeline: each stage starts a fresh interpreter: {why_not}", flush=True)
    return False


def console_log(logs: Path, run: StageRun) -> Path:
    return logs / "console" / f"{run.stage}_{run.side}.log" if run.side else logs / "console" / f"{run.stage}.log"


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "".join(path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _quote(command: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)


def headline(eval_dir: Path) -> list[str]:
    path = eval_dir / "summary.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    lines = ["", "Headline (means over held-out prompts; Elo from the judge's pairwise verdicts):"]
    columns = [c for c in ("rm_ethical", "rm_unethical", "judge_mean", "refusal", "repetition_4") if c in summary["columns"]]
    header = f"  {'model':<14}" + "".join(f"{c:>14}" for c in columns) + (f"{'Elo':>8}" if summary.get("elo") else "")
    lines.append(header)
    for model, stats in summary["models"].items():
        row = f"  {model:<14}" + "".join(f"{stats[c]['mean']:>14.3f}" for c in columns)
        if summary.get("elo"):
            row += f"{summary['elo'].get(model, float('nan')):>8.0f}"
        lines.append(row)
    for w in summary.get("win_rates", []):
        lines.append(f"  {w['a']} beats {w['b']}: {w['win_rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}] ({w['n']} judgements)")
    lines += _comparison_lines(summary)
    return lines


def _comparison_lines(summary: dict) -> list[str]:
    """The RM agreement, the judge check and the corrected RL-ethical vs RL-unethical
    differences, one line each."""
    lines = []
    corr = summary.get("rm_correlation") or {}
    if corr.get("r") is not None:
        lines.append(f"  rm_ethical vs rm_unethical scores: Pearson r = {corr['r']:+.2f} over {corr['n']} answers")
    check = summary.get("judge_check")
    if check:
        verdict = "passed" if check["passed"] else "FAILED (its columns carry no information)"
        lines.append(f"  judge check {verdict}: accuracy {check['accuracy']:.3f}, chance {check['chance']:.3f}, n={check['n']}")
    between_sides = [d for d in summary.get("differences", []) if (d["a"], d["b"]) == ("rl_ethical", "rl_unethical")]
    if between_sides:
        method = (summary.get("multiple_comparisons") or {}).get("method", "uncorrected")
        significant = [d["column"] for d in between_sides if d["significant"]]
        lines.append(
            f"  rl_ethical vs rl_unethical differ ({method}-corrected, n={between_sides[0].get('n', '?')} prompts) on: "
            + (", ".join(significant) if significant else "no scorer")
        )
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ucai pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML (e.g. configs/pipeline/demo.yaml)")
    parser.add_argument("--force", choices=[*STAGE_ORDER, "all"], help="rerun this stage and every later one")
    parser.add_argument("--stop-after", choices=STAGE_ORDER, help="stop once this stage has run for every side")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ucai pipeline``; returns the exit status."""
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    cfg = load_pipeline_config(args.config)
    everything = plan(cfg)
    producers = {path: run for run in everything for path in run.outputs}
    runs = [run for run in everything if run.enabled]
    force_from = 0 if args.force == "all" else (STAGE_ORDER.index(args.force) if args.force else None)
    stop_at = STAGE_ORDER.index(args.stop_after) if args.stop_after else len(STAGE_ORDER)
    runs = [r for r in runs if STAGE_ORDER.index(r.stage) <= stop_at]
    root = cfg.output_root
    print(f"ucai pipeline: {len(runs)} stage runs, sides {', '.join(cfg.sides)}, model {cfg.model}, output {root}", flush=True)
    fallen = [run.label for run in runs if run.bf16_fallback]
    if fallen:
        print(
            f"ucai pipeline: no native bfloat16 here (a CPU without AVX-512/AMX, a GPU before Ampere): {len(fallen)} stage runs "
            "configured for bf16 run in 32-true, several times faster here (bf16_fallback: false keeps bf16)",
            flush=True,
        )
    timings: list[tuple[StageRun, str, float]] = []
    started = time.perf_counter()
    numbers = {id(run): number for number, run in enumerate(runs, start=1)}

    fork: bool | None = None

    def header(run: StageRun) -> str:
        return f"[{numbers[id(run)]}/{len(runs)}] {run.label}"

    for _, group in itertools.groupby(runs, key=lambda run: run.stage):
        pending: list[tuple[StageRun, str]] = []  # (run, hash) to execute
        starts: list[str] = []  # their start lines
        for run in group:
            command = run.command(cfg.python)
            if args.dry_run:
                print(f"{header(run)}: {_quote(command)}")
                continue
            for path in run.inputs:
                if input_fingerprint(path) == "missing":
                    maker = producers.get(path)
                    hint = (
                        f"; it is made by the {maker.label} stage ({MAKERS[maker.stage].format(side=maker.side)})"
                        if maker
                        else ""
                    )
                    raise UcaiError(f"{run.label}: input {path} not found{hint}")
            current = stage_hash(run)
            forced = force_from is not None and STAGE_ORDER.index(run.stage) >= force_from
            marker = read_marker(run)
            if not forced and marker and marker.get("hash") == current and outputs_complete(run):
                print(f"{header(run)}: up to date, skipped ({run.outputs[0]})", flush=True)
                timings.append((run, "skipped", 0.0))
                continue
            state_path = state_file(root, run)
            try:
                previous = json.loads(state_path.read_text())
            except (OSError, ValueError):
                previous = {}
            resuming = not forced and previous.get("hash") == current and previous.get("status") == "running"
            if not resuming:
                clean_outputs(run)
            write_json_atomic(state_path, {"hash": current, "status": "running", "command": command})
            pending.append((run, current))
            starts.append(f"\n==> {header(run)}{' (resuming)' if resuming else ''}\n    {_quote(command)}")
        if not pending:
            continue
        if fork is None:  # decided once, before the first stage runs (it imports Lightning)
            fork = decide_fork(cfg)
        # Side by side only when both sides of the stage run (one may be up to date).
        side_by_side = cfg.parallel_sides and len(pending) > 1
        for (run, _), start in zip(pending, starts, strict=True):
            where = f"\n    console: {console_log(root / 'logs', run)}" if side_by_side else ""
            print(start + where, flush=True)
        if side_by_side:
            results = run_side_by_side([run for run, _ in pending], cfg.python, root / "logs", fork)
        else:
            results = []
            for run, _ in pending:
                results.append(timed_run(run, cfg.python, fork))
                if results[-1][0] != 0:
                    break  # one after the other: stop at the first failure
        failed = None
        for (run, current), (code, elapsed) in zip(pending, results, strict=False):
            if code != 0:
                if side_by_side:
                    sys.stderr.write(f"--- last lines of {console_log(root / 'logs', run)}:\n{log_tail(console_log(root / 'logs', run))}")
                print(
                    f"ucai pipeline: {run.label} failed with exit status {code} after {_fmt_seconds(elapsed)}; "
                    "fix the cause and rerun the same command to resume",
                    file=sys.stderr,
                )
                failed = failed or (code if code > 0 else 1)
                continue
            if not outputs_complete(run):
                missing = ", ".join(str(p) for p in run.outputs)
                print(f"ucai pipeline: {run.label} exited 0 but did not write {missing}", file=sys.stderr)
                failed = failed or 1
                continue
            command = run.command(cfg.python)
            write_json_atomic(
                run.marker,
                {"hash": current, "stage": run.stage, "side": run.side, "command": command,
                 "seconds": round(elapsed, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            )
            write_json_atomic(state_file(root, run), {"hash": current, "status": "done", "command": command})
            print(f"<== {run.label} done in {_fmt_seconds(elapsed)}", flush=True)
            timings.append((run, "ran", elapsed))
        if failed:
            return failed
    if args.dry_run:
        return 0
    total = time.perf_counter() - started
    print(f"\nucai pipeline finished in {_fmt_seconds(total)}. Artefacts:")
    for run, status, seconds in timings:
        took = _fmt_seconds(seconds) if status == "ran" else "skipped"
        print(f"  {run.label:<28} {took:>10}  {', '.join(str(p) for p in run.outputs)}")
    print(f"  {'TensorBoard logs':<28} {'':>10}  {root / 'logs'}")
    eval_dir = root / "eval"
    for line in headline(eval_dir):
        print(line)
    report = eval_dir / "report.md"
    if report.is_file():
        print(f"\nreport: {report}")
    return 0

