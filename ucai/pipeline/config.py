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
    "parallel_sides", "bf16_fallback", "fork_stages", "rl", "preference_pretraining",
}
STAGE_KEYS = {"config", "overrides", "enabled"}
PRETRAINING_KEYS = {"path", "config", "overrides"}
PRETRAINING_STAGE = "reward_pretrain"  # runs only when `preference_pretraining:` names a file


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
    # Preference-model pre-training: the hh-rlhf-format file (a local path or a hub
    # dataset file, `ucai.data.preference_data.read_preferences`) the reward_pretrain
    # stage trains on before both reward stages start from its model; None: no PMP.
    preference_pretraining: str | None = None
    parallel_sides: bool = False
    bf16_fallback: bool = True
    fork_stages: bool = True


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UcaiError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def load_pipeline_config(
    path: str | Path, rl: list[str] | None = None, preference_pretraining: str | None = None
) -> PipelineConfig:
    """Read and check a pipeline config; ``rl`` (``ucai pipeline --rl``) replaces its
    ``rl:``, ``preference_pretraining`` (``--pmp``) its ``preference_pretraining.path``."""
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
    pretraining = _pretraining(data.get("preference_pretraining"), preference_pretraining, resolved)
    stages = {}
    for name in STAGE_ORDER:
        raw = _mapping(stages_raw.get(name), f"{resolved}: stages.{name}")
        bad = sorted(set(raw) - STAGE_KEYS)
        if bad:
            raise UcaiError(f"{resolved}: stages.{name}: unknown key(s) {bad}; known keys: {sorted(STAGE_KEYS)}")
        if name == PRETRAINING_STAGE:
            raw = _pretraining_stage(raw, pretraining, resolved)
        configs = raw.get("config", STAGES[name].config)
        configs = configs if isinstance(configs, list) else [configs]
        if not configs or not all(isinstance(c, str) and c for c in configs):
            raise UcaiError(f"{resolved}: stages.{name}.config must be a file name or a list of them")
        stages[name] = StageSettings(
            config=configs,
            overrides=_mapping(raw.get("overrides"), f"{resolved}: stages.{name}.overrides"),
            # An RL stage that `rl:` does not list is planned (its output can be named
            # in errors) but never run; pre-training runs only when a file is named.
            enabled=bool(raw.get("enabled", True))
            and (name not in RL_STAGES or name in rl)
            and (name != PRETRAINING_STAGE or "path" in pretraining),
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
        preference_pretraining=pretraining.get("path"),
    )


def _pretraining_stage(stage: dict, pretraining: dict, source: Path) -> dict:
    """The reward_pretrain stage's settings: ``stages.reward_pretrain`` with the
    ``config``/``overrides`` of ``preference_pretraining:``, each given in one place."""
    both = sorted(key for key in ("config", "overrides") if key in stage and key in pretraining)
    if both:
        raise UcaiError(
            f"{source}: {both} set both under preference_pretraining and stages.{PRETRAINING_STAGE}; set them in one place"
        )
    return {**stage, **{key: pretraining[key] for key in ("config", "overrides") if key in pretraining}}


def _pretraining(value, path_override: str | None, source: Path) -> dict:
    """The ``preference_pretraining:`` entry as a mapping (``{}``: none): a file name
    alone, or ``{path, config, overrides}``; ``path_override`` (``--pmp``) replaces its
    path. The path must be an existing file (relative: to the directory the pipeline
    runs in, like ``prompts:``) or a hub dataset file (`ucai.data.preference_data.hub_file`)."""
    raw = {"path": value} if isinstance(value, str) else dict(_mapping(value, f"{source}: 'preference_pretraining'"))
    bad = sorted(set(raw) - PRETRAINING_KEYS)
    if bad:
        raise UcaiError(f"{source}: preference_pretraining: unknown key(s) {bad}; known keys: {sorted(PRETRAINING_KEYS)}")
    if path_override is not None:
        raw["path"] = path_override
    if "path" not in raw:
        if raw:
            raise UcaiError(f"{source}: preference_pretraining needs a 'path' (an hh-rlhf-format file)")
        return raw
    if not isinstance(raw["path"], str) or not raw["path"]:
        raise UcaiError(f"{source}: preference_pretraining.path must be a file name, got {raw['path']!r}")
    # Imported only here: it imports Lightning, which a pipeline without PMP loads
    # later, in parallel with its fork server (`ucai.pipeline.main`).
    from ucai.data.preference_data import HUB_PREFIX, hub_file

    try:
        hub = hub_file(raw["path"])
    except UcaiError as error:
        raise UcaiError(f"{source}: preference_pretraining.path {error}") from None
    if hub is None and not Path(raw["path"]).expanduser().is_file():
        raise UcaiError(
            f"{source}: preference_pretraining.path {raw['path']}: file not found (an hh-rlhf-format "
            f".jsonl or .jsonl.gz file, or a hub dataset file {HUB_PREFIX}OWNER/NAME/PATH)"
        )
    return raw


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
