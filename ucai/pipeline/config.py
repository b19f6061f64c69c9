"""The pipeline config: the YAML a user writes (see configs/pipeline/demo.yaml, every
key commented), read and checked into a `PipelineConfig`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ucai.constitution import SIDES
from ucai.errors import UcaiError
from ucai.resources import read_yaml, resolve_shipped
from ucai.stage_outputs import RL_STAGES, STAGE_ORDER, STAGES

TOP_LEVEL_KEYS = {
    "output_root", "sides", "model", "prompts", "heldout_fraction", "common_overrides", "stages", "python",
    "parallel_sides", "bf16_fallback", "fork_stages", "rl",
}
STAGE_KEYS = {"config", "overrides", "enabled"}


@dataclass
class StageSettings:
    """One stage's entry under ``stages:``."""

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
    # The RL algorithms to train from the SL models, the first being the report's "rl"
    # model; a stage runs only when it is listed here (and not disabled under stages:).
    rl: list[str] = field(default_factory=lambda: ["ppo"])
    parallel_sides: bool = False
    bf16_fallback: bool = True
    fork_stages: bool = True


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UcaiError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def load_pipeline_config(path: str | Path, rl: list[str] | None = None) -> PipelineConfig:
    """Read and check a pipeline config; ``rl`` (``ucai pipeline --rl``) replaces its ``rl:``."""
    resolved = resolve_shipped(path, "configs")
    if not resolved.is_file():
        raise UcaiError(f"{path}: pipeline config not found")
    data = _mapping(read_yaml(resolved), str(resolved))
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
    rl = _rl_algorithms(data.get("rl", "ppo") if rl is None else rl, resolved)
    stages = {}
    for name in STAGE_ORDER:
        raw = _mapping(stages_raw.get(name), f"{resolved}: stages.{name}")
        bad = sorted(set(raw) - STAGE_KEYS)
        if bad:
            raise UcaiError(f"{resolved}: stages.{name}: unknown key(s) {bad}; known keys: {sorted(STAGE_KEYS)}")
        configs = raw.get("config", STAGES[name].config)
        configs = configs if isinstance(configs, list) else [configs]
        if not configs or not all(isinstance(c, str) and c for c in configs):
            raise UcaiError(f"{resolved}: stages.{name}.config must be a file name or a list of them")
        stages[name] = StageSettings(
            config=configs,
            overrides=_mapping(raw.get("overrides"), f"{resolved}: stages.{name}.overrides"),
            # An RL stage that `rl:` does not list is planned (its output can be named
            # in errors) but never run.
            enabled=bool(raw.get("enabled", True)) and (name not in RL_STAGES or name in rl),
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
        rl=rl,
    )


def _rl_algorithms(value, source: Path) -> list[str]:
    """``rl: ppo`` or ``rl: [rloo, ppo, dpo]``: the RL stages to run, the first primary."""
    names = value if isinstance(value, list) else [value]
    if not names or any(name not in RL_STAGES for name in names) or len(set(names)) != len(names):
        raise UcaiError(
            f"{source}: 'rl' must be one of {list(RL_STAGES)} or a list of distinct ones, got {value!r}"
        )
    return list(names)


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
