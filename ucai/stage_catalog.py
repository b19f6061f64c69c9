"""The ucai stages by name: which modules define them and what the subcommands do.

Plain data, importing nothing: ``ucai --help`` and the help cache read it without
loading the stages, and `import_stages` loads them when a command needs their classes.
"""

from __future__ import annotations

import importlib

# Imported before parsing so that short class names (``--model SFTModule``) resolve.
# Every one is part of ucai: a missing one is a broken install and fails the command.
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
    "ucai.stages.dpo",
    "ucai.data.dpo_data",
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
    "DPOModule": "ucai.stages.dpo",
    "EvaluationModule": "ucai.stages.evaluation",
    "JudgeCheckModule": "ucai.stages.judge_check",
    "PromptDataModule": "ucai.data.prompt_datamodule",
    "SFTDataModule": "ucai.data.sft_data",
    "PreferenceDataModule": "ucai.data.preference_data",
    "ResponseDataModule": "ucai.data.preference_data",
    "DPODataModule": "ucai.data.dpo_data",
    "MultipleChoiceDataModule": "ucai.data.multiple_choice",
}

SUBCOMMANDS = ("fit", "validate", "test", "predict")

DESCRIPTION = (
    "ucai: Constitutional AI and its mirror image as Lightning stages. "
    "Subcommands: fit (sft, reward and its pre-training, ppo, rloo, dpo), predict (answer, categorise, "
    "critique-revision, preferences, reward scores), test (evaluation, judge check); "
    "`ucai pipeline --config configs/pipeline/demo.yaml` runs every stage."
)

# One line per subcommand for ``ucai --help``, which is printed without Lightning.
# tests/test_cli.py checks the names against LightningCLI's subcommands.
SUBCOMMAND_SUMMARIES = {
    "fit": "Train a stage (sft, reward, reward pre-training, ppo, rloo, dpo): Trainer.fit.",
    "validate": "Run one evaluation epoch over the validation set: Trainer.validate.",
    "test": "Evaluate (evaluation, judge check): Trainer.test, one epoch over the test set.",
    "predict": "Generate or score (answer, categorise, critique-revision, preferences, reward scores): Trainer.predict.",
    "pipeline": "Run every stage of a pipeline config in order; stages up to date are skipped.",
}


def import_stages() -> None:
    """Import every stage module, so that their classes can be named in a config."""
    for name in STAGE_MODULES:
        importlib.import_module(name)
