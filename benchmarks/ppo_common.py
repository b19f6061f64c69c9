"""What the PPO benchmarks share: settings, prompts, a stand-in reward model, TRL's
trainer and the child-process protocol.

`benchmarks/ppo.py` (speed and memory of one iteration) and `benchmarks/ppo_learning.py`
(learning curves against a pipeline-trained reward model) both give ucai's `PPOModule`
and TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` one `PPOSettings`, so the two
libraries run the same algorithm with the same numbers; only each library's own
choices (value function, precision handling) differ, and the benchmarks say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_POLICY = "smollm2-135m"
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class PPOSettings:
    """One PPO configuration, in the terms both libraries share.

    ``batch`` prompts make one iteration (rollout batch); each iteration runs
    ``ppo_epochs`` passes over minibatches of ``minibatch_size`` episodes, i.e.
    `updates_per_iteration` optimiser steps. A decaying ``lr_schedule`` reaches 0 at
    the end of the run in both libraries (ucai steps it per optimiser step, TRL per
    iteration). The KL coefficient is fixed: TRL 1.12 has no adaptive controller.
    """

    batch: int
    response_length: int
    ppo_epochs: int
    minibatch_size: int
    kl_coef: float
    learning_rate: float
    temperature: float = 0.7
    missing_eos_penalty: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    lr_schedule: str = "linear"  # linear (to 0 over the run), constant or cosine
    system_prompt: str = SYSTEM_PROMPT
    seed: int = 0

    def __post_init__(self):
        if self.minibatch_size < 1 or self.batch % self.minibatch_size:
            raise SystemExit(
                f"batch {self.batch} must be a multiple of minibatch {self.minibatch_size} (TRL needs it)"
            )

    @property
    def num_mini_batches(self) -> int:
        return self.batch // self.minibatch_size

    @property
    def updates_per_iteration(self) -> int:
        return self.ppo_epochs * self.num_mini_batches

    def lora_settings(self):
        """The policy adapter as ucai's `LoraSettings` (no dropout, as PPO runs without it)."""
        from ucai.models import LoraSettings

        return LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=0.0, target_modules=list(self.lora_targets)
        )

    def describe(self) -> str:
        return (
            f"batch {self.batch}, response <= {self.response_length} tokens, {self.ppo_epochs} PPO epoch(s) x "
            f"{self.num_mini_batches} minibatch(es) of {self.minibatch_size}, "
            f"lr {self.learning_rate:g} ({self.lr_schedule}), eos penalty {self.missing_eos_penalty:g}, "
            f"KL coef {self.kl_coef:g}, temperature {self.temperature:g}, "
            f"LoRA r={self.lora_r} alpha={self.lora_alpha} {list(self.lora_targets)}"
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PPOSettings:
        return cls(**{**data, "lora_targets": tuple(data["lora_targets"])})


def default_prompts(n: int) -> list[str]:
    """The first ``n`` training-split prompts of the shipped prompt file."""
    from ucai.data.prompt_datamodule import PromptDataModule

    return [row["prompt"] for row in PromptDataModule(limit=n, split="train").rows()]


def build_reward_model(folder: Path, model: str = DEFAULT_POLICY, seed: int = 0) -> None:
    """``model`` with a random scalar head (seeded), saved as a reward-stage folder
    (mean 0, std 1: scores are the head's raw output)."""
    from ucai.models import load_sequence_classifier, load_tokenizer

    classifier = load_sequence_classifier(model, seed=seed)
    tokenizer = load_tokenizer(model, padding_side="right")
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    stats = {"mean": 0.0, "std": 1.0, "system_prompt": SYSTEM_PROMPT, "max_length": 512, "pairs": 0}
    (folder / "reward_stats.json").write_text(json.dumps(stats))


# --------------------------------------------------------------------------- TRL


def normalise_score_head(model, mean: float, std: float) -> None:
    """Make a sequence classifier output ``(r - mean) / std`` instead of ``r``.

    TRL reads a reward (and value) model's score as ``model.score(hidden)``, so the
    bias-free linear head is swapped for one with weight ``w / std`` and bias
    ``(b - mean) / std``: TRL then optimises the reward ucai's ``normalize_score``
    gives PPO, on which the KL coefficient and the missing-eos penalty act alike.
    """
    import torch
    from torch import nn

    old = model.score
    new = nn.Linear(
        old.in_features, old.out_features, bias=True, dtype=old.weight.dtype, device=old.weight.device
    )
    with torch.no_grad():
        new.weight.copy_(old.weight / std)
        old_bias = old.bias if old.bias is not None else torch.zeros_like(new.bias)
        new.bias.copy_((old_bias - mean) / std)
    model.score = new


def trl_ppo_trainer(
    policy: str,
    reward_model: Path,
    prompts: list[str],
    settings: PPOSettings,
    iterations: int,
    work: Path,
    callbacks: tuple = (),
    score_stats: tuple[float, float] | None = None,
    in_order: bool = False,
):
    """TRL 1.12's ``PPOTrainer`` for ``iterations`` rollout batches of ``prompts``.

    The policy is loaded in fp32 with a fresh LoRA adapter (``ref_model=None``: the
    reference is the policy with its adapter disabled); the value model is a full
    trainable copy of the reward model, as in TRL's examples. Prompts are rendered with
    the policy's chat template and ``settings.system_prompt``, as ucai renders them.
    Mixed precision comes only from ``ACCELERATE_MIXED_PRECISION`` (TRL 1.12 refuses
    ``bf16=True`` on CPU).

    Args:
        prompts: at least ``settings.batch * iterations`` user prompts, or fewer to cycle.
        score_stats: ``(mean, std)``: rescale the reward and value heads to normalised
            scores (`normalise_score_head`); None keeps raw reward-model scores.
        in_order: feed the prompts in list order (TRL shuffles them otherwise), so a
            run sees the same batches as a ucai run given the same list unshuffled.
    """
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from ucai.chat import render_chat
    from ucai.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(policy, padding_side="left")
    texts = [
        render_chat(tokenizer, [{"role": "user", "content": p}], settings.system_prompt) for p in prompts
    ]
    dataset = Dataset.from_dict(
        {"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]}
    )
    model = AutoModelForCausalLM.from_pretrained(resolve_model(policy).location, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(
        reward_model, num_labels=1, dtype=torch.float32
    )
    reward = AutoModelForSequenceClassification.from_pretrained(
        reward_model, num_labels=1, dtype=torch.float32
    )
    if score_stats is not None:
        for classifier in (value, reward):
            normalise_score_head(classifier, *score_stats)
    config = PPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=settings.batch,
        gradient_accumulation_steps=1,
        num_mini_batches=settings.num_mini_batches,
        num_ppo_epochs=settings.ppo_epochs,
        total_episodes=settings.batch * iterations,
        local_rollout_forward_batch_size=settings.batch,
        response_length=settings.response_length,
        stop_token="eos",
        missing_eos_penalty=settings.missing_eos_penalty,
        temperature=settings.temperature,
        kl_coef=settings.kl_coef,
        kl_estimator="k1",
        gamma=settings.gamma,
        lam=settings.lam,
        cliprange=settings.cliprange,
        cliprange_value=settings.cliprange_value,
        vf_coef=settings.vf_coef,
        whiten_rewards=False,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_schedule,
        max_grad_norm=settings.max_grad_norm,
        num_sample_generations=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        seed=settings.seed,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=model,
        ref_model=None,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        callbacks=list(callbacks),
        peft_config=settings.lora_settings().to_peft("CAUSAL_LM"),
    )
    if in_order:
        # train() draws from self.dataloader; swap TRL's shuffled loader for one in order.
        ordered = DataLoader(
            trainer.train_dataset,
            batch_size=trainer.local_dataloader_batch_size,
            shuffle=False,
            collate_fn=trainer.data_collator,
            drop_last=True,
        )
        trainer.dataloader = trainer.accelerator.prepare(ordered)
    return trainer


# --------------------------------------------------------------------------- child processes


def print_result(result: dict) -> None:
    """A child's last word: one ``RESULT {json}`` line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def child_env(extra: dict | None = None) -> dict:
    """This process's environment, offline, with quiet tokenizers, plus ``extra``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


def run_child(name: str, command: list[str], env_extra: dict | None = None) -> dict:
    """Run a child process offline and return the dict of its last ``RESULT`` line.

    Exits with the child's stderr tail when it fails or prints no result.
    """
    proc = subprocess.run(command, env=child_env(env_extra), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])
