"""Every YAML shipped under configs/ parses against the code (litgpt's test_config_hub idea).

Stage configs are parsed by the real CLI parser up to the point where classes would be
instantiated, so an unknown key, a wrong type or a renamed class fails here instead of
in a user's run. Strategy configs are composed with a stage config, constitutions go
through the constitution loader, pipeline configs through the pipeline's loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ucai.constitution import load_constitution
from ucai.lightning_cli import UcaiCLI
from ucai.pipeline import load_pipeline_config, plan
from ucai.resources import configs_dir
from ucai.stage_catalog import import_stages

CONFIGS = configs_dir()
STAGE_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))
STRATEGY_CONFIGS = sorted((CONFIGS / "strategies").glob("*.yaml"))
CONSTITUTIONS = sorted((CONFIGS / "constitutions").glob("*.yaml"))
PIPELINES = sorted((CONFIGS / "pipeline").glob("*.yaml"))
TEST_CONFIGS = sorted(p for p in (Path(__file__).parent / "conf").glob("*.yaml") if not p.name.startswith("pipeline"))
PIPELINES += sorted((Path(__file__).parent / "conf").glob("pipeline*.yaml"))


class _Parsed(Exception):
    def __init__(self, config):
        self.config = config


class _ParseOnlyCLI(UcaiCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def _parse(*args: str):
    import_stages()
    with pytest.raises(_Parsed) as info:
        _ParseOnlyCLI(args=list(args))
    return info.value.config


def _subcommand(path: Path) -> str:
    text = path.read_text()
    for command in ("fit", "predict", "test"):
        if f"ucai {command}" in text:
            return command
    return "fit"


@pytest.mark.parametrize("path", STAGE_CONFIGS + TEST_CONFIGS, ids=lambda p: p.name)
def test_stage_config_parses(path):
    command = _subcommand(path)
    config = _parse(command, "--config", str(path))[command]
    assert config.model.class_path.startswith("ucai."), "configs name ucai's classes by full path"


@pytest.mark.parametrize("path", STRATEGY_CONFIGS, ids=lambda p: p.name)
def test_strategy_config_composes_with_a_stage_config(path):
    config = _parse("predict", "--config", str(CONFIGS / "answer.yaml"), "--config", str(path))["predict"]
    strategy = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    if isinstance(strategy, dict):
        assert config.trainer.strategy.class_path == strategy["class_path"]
    else:
        assert config.trainer.strategy == strategy


@pytest.mark.parametrize("path", CONSTITUTIONS, ids=lambda p: p.name)
def test_constitution_loads(path):
    assert load_constitution(path).pairs


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_config_plans_every_stage(path, monkeypatch):
    """The pipeline's plan parses every stage's arguments with the stage's own parser."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    cfg = load_pipeline_config(path)
    runs = plan(cfg)
    assert runs[0].stage == "categorise" and runs[-1].stage == "eval"
    assert all(run.outputs[0].is_relative_to(cfg.output_root) for run in runs)


def test_there_are_configs_to_check():
    assert len(STAGE_CONFIGS) >= 1 and CONSTITUTIONS
