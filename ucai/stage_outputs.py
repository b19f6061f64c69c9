"""Which stage makes which file or folder: one table, read by the pipeline's plan and by
the stages' "input not found" messages.

Paths are relative to a pipeline's ``output_root``; ``{side}`` is ``ethical`` or
``unethical``. A stage run by hand may write anywhere, so a missing input is traced to
its maker by the last part of its path (``.../sl_model`` is the SFT stage's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

from ucai.errors import UcaiError


@dataclass(frozen=True)
class StageOutput:
    """One pipeline stage: how it runs and what it writes."""

    stage: str  # the pipeline's name for it
    title: str  # as a person names it: "the SFT stage"
    mode: str  # the ucai subcommand that runs it
    config: str  # its shipped config, ``{side}`` to fill
    output: str  # what it writes under the output root, ``{side}`` to fill

    @property
    def per_side(self) -> bool:
        return "{side}" in self.config

    def config_for(self, side: str | None) -> str:
        return self.config.format(side=side or "<side>")

    def output_under(self, root: Path, side: str | None = None) -> Path:
        return root / self.output.format(side=side or "<side>")

    def command_for(self, side: str | None) -> str:
        """The command that makes this output by hand."""
        return f"ucai {self.mode} --config {self.config_for(side)}"


STAGES: dict[str, StageOutput] = {
    s.stage: s
    for s in (
        StageOutput("categorise", "the categorise stage", "predict", "configs/categorise.yaml", "data/prompts.jsonl"),
        StageOutput(
            "critique_revision",
            "the critique-revision stage",
            "predict",
            "configs/critique_revision_{side}.yaml",
            "data/{side}/sl.jsonl",
        ),
        StageOutput("sft", "the SFT stage", "fit", "configs/sft_{side}.yaml", "models/{side}/sl_model"),
        StageOutput(
            "preferences",
            "the preferences stage",
            "predict",
            "configs/preferences_{side}.yaml",
            "data/{side}/preferences.jsonl",
        ),
        # Preference-model pre-training: once, not per side, and only when a pipeline
        # names human comparisons (`preference_pretraining:`); both reward stages start
        # from its model.
        StageOutput(
            "reward_pretrain", "the reward pre-training stage", "fit", "configs/reward_pretrain.yaml", "models/pmp_rm"
        ),
        StageOutput("reward", "the reward stage", "fit", "configs/reward_{side}.yaml", "models/{side}/rm_model"),
        # The online and offline RL stages; a pipeline's `rl:` picks which run. Each
        # writes its own folder so that one run can train and compare all three.
        StageOutput("ppo", "the PPO stage", "fit", "configs/ppo_{side}.yaml", "models/{side}/rl_model"),
        StageOutput("rloo", "the RLOO stage", "fit", "configs/rloo_{side}.yaml", "models/{side}/rloo_model"),
        StageOutput("dpo", "the DPO stage", "fit", "configs/dpo_{side}.yaml", "models/{side}/dpo_model"),
        StageOutput("eval", "the evaluation stage", "test", "configs/eval.yaml", "eval"),
    )
}
STAGE_ORDER = tuple(STAGES)
RL_STAGES = ("ppo", "rloo", "dpo")  # the pipeline's `rl:` choices

# Output names that only one stage writes, so a path ending in one names its maker.
_BY_NAME = {PurePath(s.output).name: s for s in STAGES.values() if s.stage != "eval"}


def side_of(path: PurePath) -> str | None:
    """The side a path belongs to, from a folder named after it."""
    parts = {p.lower() for p in path.parts}
    return "unethical" if "unethical" in parts else "ethical" if "ethical" in parts else None


def maker_of(path: PurePath) -> StageOutput | None:
    """The stage that writes a file or folder of this name, if one does."""
    return _BY_NAME.get(path.name)


def made_by(path: PurePath, stage: str | None = None) -> str:
    """``"it is made by the SFT stage (ucai fit --config configs/sft_ethical.yaml)"``
    for a path a stage writes (``stage`` when the path's name does not tell); else ""."""
    maker = maker_of(path) or (STAGES.get(stage) if stage else None)
    if maker is None:
        return ""
    return f"it is made by {maker.title} ({maker.command_for(side_of(path))})"


def require_stage_output(name: str, role: str, stage: str | None = None) -> None:
    """Fail early, naming the stage that makes it, when a stage's model folder is missing.

    Checked: names that are local paths (``./x``, ``/x``, ``~/x``, three or more parts)
    and names ending in a stage's output (``sl_model``). Model aliases and hub ids
    (``owner/name``) are left to `ucai.models.resolve_model`.

    Args:
        name: the folder as configured.
        role: what it is for, opening the message ("PPO policy (SL model)").
        stage: the stage that makes it, when its name does not say.
    """
    path = Path(name).expanduser()
    local = name.startswith((".", "/", "~")) or len(path.parts) > 2 or maker_of(path) is not None
    if local and not path.is_dir():
        hint = made_by(path, stage)
        raise UcaiError(f"{role}: model folder {name} not found" + (f"; {hint}" if hint else ""))
