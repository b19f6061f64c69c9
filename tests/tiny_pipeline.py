"""The tiny test config of each pipeline stage (tests/conf/), for tests that plan a
pipeline: the plan parses every stage's arguments, so the configs must be real."""

from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parent / "conf"
TINY_CONFIGS = {
    "categorise": "categorise_tiny.yaml",
    "critique_revision": "critique_revision_tiny.yaml",
    "sft": "sft_tiny.yaml",
    "preferences": "preferences_tiny.yaml",
    "reward_pretrain": "reward_tiny.yaml",
    "reward": "reward_tiny.yaml",
    "ppo": "ppo_tiny.yaml",
    "rloo": "rloo_tiny.yaml",
    "dpo": "dpo_tiny.yaml",
    "eval": "eval_tiny.yaml",
}
