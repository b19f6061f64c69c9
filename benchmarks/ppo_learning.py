"""PPO learning curves: ucai against TRL 1.12's PPOTrainer on a pipeline-trained reward model.

What it measures: how far PPO raises the reward model's score in a fixed number of
iterations, for ucai's `PPOModule` and for ``trl.experimental.ppo.PPOTrainer``, given
the same reward model (RM), policy, prompts in the same order and the same settings.
Each side's curve is its per-iteration mean RM score (the RM's raw output, before any
missing-eos penalty, on that iteration's fresh rollouts) and mean KL to the reference
(per sequence, k1, summed over response tokens). A side's gain is

    (mean of the last 5 iterations - mean of the first 5) / RM score std

with the std from the RM folder's ``reward_stats.json`` (the spread of the RM's scores
on its training responses; ucai refuses an RM folder without it, so no fallback is
needed). With fewer than 10 iterations the windows shrink to ``iterations // 2``.

At a fixed KL coefficient that gain mixes how fast a side moves with how good its
direction is, so the benchmark also reads each run on the reward–KL frontier: its
score gain at 1, 2 and 3 nats of KL to the reference (``--kl-levels``), defined in
`ucai.frontier` and applied alike to both sides:

* per run: smooth the per-iteration KL and score curves with the same centred moving
  average (``--smooth``, 5 iterations, truncated at the ends), follow the smoothed
  (KL, score) points in iteration order joined by straight lines, and take the score
  where that path first reaches the level, minus the run's starting score (the mean of
  its first ``min(5, iterations // 2)`` iterations, the plain gain's baseline), in RM
  std units. Why smoothing: one iteration's 8 responses put a noise of about a third of
  an RM std on its mean score and the k1 KL jumps from batch to batch, so on the raw
  curve a single batch would decide where a level is first crossed; smoothing both
  coordinates with the same window keeps every point a (KL, score) pair of the same
  rollouts. Why the first crossing: KL need not grow monotonically, and the score when
  a run had first spent that much KL is what the frontier asks. A running maximum
  (biased upwards by the noise) and a fitted curve (an imposed shape) were rejected.
  A run whose smoothed KL never reaches a level gives no value there;
* per configuration (side, learning rate): the median over seeds of the runs that
  reached the level, printed as n/a unless more than half of them did (the median of
  the few fastest seeds would be a biased pick); the table says how many reached it;
* per side: when a side runs several learning rates (``--ucai-learning-rates``,
  ``--trl-learning-rates``; e.g. a higher one for the slower side until the sides' KL
  ranges overlap), its value at each level is that of its best learning rate there,
  the "peer's best" rule of shared/BENCHMARKS.md applied to both sides (give both the
  same number of learning rates: a best-of-n pick gains from noise).

Run (from the repository root; at the defaults a run takes about 7 minutes on one
core of an otherwise idle 2-core CPU, for ucai and TRL alike, and 10-15 minutes when
two runs and other work share the machine; ``OMP_NUM_THREADS=1`` lets the ucai runs and
the TRL runs go in two processes at once, ``--reuse`` then merging their files):

    nice -n 10 .venv/bin/python benchmarks/ppo_learning.py \\
        --reward-model lightning_logs/experiment_cpu/models/ethical/rm_model --seeds 0 1 2

The last two lines are ``ppo_learning: ucai_gain=X trl_gain=Y`` (median plain gains,
each side's first learning rate) and, last,
``ppo_frontier: ucai_at_1=… ucai_at_2=… ucai_at_3=… trl_at_1=… trl_at_2=… trl_at_3=…
ratio_at_2=…`` (the ratio ucai/TRL at 2 nats, n/a unless both gains are positive). A
single run's gain swings widely with the sampling seed, so ``--seeds 0 1 2`` runs every
configuration once per seed (alternating the order A B, B A, ...; the prompt order is
the same for all) and the summaries are medians over seeds. Each run's per-iteration
table and gains are printed when it ends, and it is written to ``--out`` (default
benchmarks/results/ppo_learning.json) at once, so partial results survive;
``--reuse`` takes the runs of ``--out`` (or of the files named) made with the same
inputs and settings instead of rerunning them (a cut-short benchmark resumes; TRL's
curves serve every ucai variant), and with ``--summary-only`` prints the summaries of
those runs without training anything (safe beside a benchmark still writing them). Each run records its wall time and the machine's
load averages before and after. Run logs, ucai's rollouts.csv and TensorBoard files
stay in ``--work`` (a fresh temporary folder by default). `benchmarks/ppo_ablation.py`
runs ucai variants (critic, precision scope, clipping) with the same code.

Inputs, by default mirroring what `ucai.pipeline` gives the PPO stage for the RM's side
(``<root>/models/<side>/rm_model``):

* policy: ``<root>/models/<side>/sl_model`` when it exists, else ``smollm2-135m``;
* prompts: ``<root>/data/prompts.jsonl`` (else data/red_team_prompts.jsonl), filtered
  by the principles of ``configs/ppo_<side>.yaml``, train split with the pipeline's
  held-out fraction (read from its stage markers; else SETTINGS["heldout_fraction"]),
  shuffled once with the seed, cut to a multiple of the batch, and fed to both sides
  in that order (cycled when the run needs more).

Settings (SETTINGS below; batch, length, lr, KL coef, epochs, minibatch and
temperature are also flags): rollout batch 8, responses of at most 48 new tokens (stop
at eos, no missing-eos penalty), temperature 0.7, 2 PPO epochs over one minibatch of
8, KL coefficient 0.05 (fixed, k1), constant learning rate 2e-4, LoRA r=8 alpha=16 on
q/k/v/o projections, gamma 1, lambda 0.95, clip 0.2 (policy and value), value-loss
weight 0.1, no gradient clipping (below); 20 iterations. These are configs/ppo_ethical.yaml
with configs/pipeline/experiment_cpu.yaml's PPO overrides, except that its adaptive
KL coefficient is held at its starting value: TRL 1.12's PPOTrainer has no adaptive
controller.

Both sides run with TRL 1.12's precision scope and clipping: sampling, the rollout
forward (log-probs, reference log-probs, values) and RM scoring in fp32, the PPO update
(loss forward and backward) under bf16 autocast, and no gradient clipping. TRL 1.12
never clips (its ``max_grad_norm`` is ignored) and autocasts only its loss forward; ucai
matches it with ``rollout_precision: fp32`` (which needs ``frozen_linear_bf16:
false``) and ``max_grad_norm: 0`` under ``bf16-mixed`` (``--ucai-variant adapter``, the
MATCHED arguments below). ucai's shipped stage config (fp32 rollouts too, clipping at
1) is the ``clip-1`` variant of `benchmarks/ppo_ablation.py`.

* ucai runs through its CLI as the pipeline does,
  ``python -m ucai.cli fit --config configs/ppo_<side>.yaml`` plus overrides, in
  ``bf16-mixed`` on the CPU, with ``normalize_score``: PPO's reward is
  ``(r - mean) / std``, clipped to +-10. Its curves come from the run's rollouts.csv
  (scores, KL) and TensorBoard scalars (penalised scores, eos fraction).
* TRL runs in a child process on the CPU with bf16 autocast (``--trl-precision fp32``:
  its fp32 default). Its reward and value models are loaded from the RM folder with
  the score head rescaled to ``(r - mean) / std`` (see
  `ppo_common.normalise_score_head`), so it optimises the same reward on the same
  scale; the value model is a full trainable copy of the RM, as in TRL's examples
  (ucai: a second LoRA adapter with a head copied from the RM's). Its per-iteration RM scores are
  recorded where TRL computes them (its ``get_reward``), KL from its log history.

Where the RM reads a response, both sides agree: at the end-of-turn token. ucai
decodes each response (special tokens dropped, whitespace stripped), renders it with
the chat template, which closes the turn, and scores at ``<|im_end|>`` even when the
response was cut at the token limit. TRL's ``get_reward`` scores at the last non-pad
token, so a cut response would be scored at its last word, a position the RM never
saw in training; most responses at 48 tokens are cut. The TRL child therefore
replaces the ``get_reward`` PPOTrainer trains with (`score_at_end_of_turn`): for the
RM it appends one column, eos on rows without one and pad on the others, so every
row is scored at an eos, for the training reward as well as the recorded curve. TRL
still scores the ids it sampled where ucai re-tokenises decoded text; the two agree
(to 1e-7 in fp32) whenever decode-and-render gives back the same ids; it does not
for responses that start or end with whitespace, hold special tokens, or were sampled
in a tokenisation the tokenizer would not produce from their text.

TRL's reward model runs in fp32 whatever ``--trl-precision`` says (accelerate autocasts
only the models it prepares, and PPOTrainer does not prepare the RM); with ucai's fp32
rollouts the RM runs in fp32 on both sides. (Under ``bf16-rollout`` ucai scores it
under bf16 autocast; raw scores differ by about 1e-2 from this alone, small beside the
RM's score std.)

Both curves are converted back to raw RM units (``score * std + mean``) before the
gains are taken, so the gain is in units of the RM's score std either way.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ppo_common, when run as a script

from ppo_common import (  # noqa: E402
    DEFAULT_POLICY,
    PPOSettings,
    child_env,
    print_result,
    run_child,
    trl_ppo_trainer,
)

REPO = Path(__file__).resolve().parents[1]

# The PPO settings of both sides: configs/ppo_ethical.yaml with the PPO overrides of
# configs/pipeline/experiment_cpu.yaml, except its adaptive KL (TRL 1.12 has none; both
# sides use the fixed starting coefficient).
SETTINGS = {
    "learning_rate": 2.0e-4,  # experiment_cpu.yaml (ppo_ethical.yaml: 1e-5)
    "lr_schedule": "constant",  # experiment_cpu.yaml (ppo_ethical.yaml: linear)
    "kl_coef": 0.05,  # fixed here; experiment_cpu.yaml adapts it (target 4, horizon 80)
    "ppo_epochs": 2,  # experiment_cpu.yaml (ppo_ethical.yaml: 4)
    "minibatch_size": 8,  # experiment_cpu.yaml (ppo_ethical.yaml: 4)
    "temperature": 0.7,
    "missing_eos_penalty": 0.0,  # experiment_cpu.yaml (ppo_ethical.yaml: 1.0)
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gamma": 1.0,
    "lam": 0.95,
    "cliprange": 0.2,
    "cliprange_value": 0.2,
    "vf_coef": 0.1,
    "max_grad_norm": 0.0,  # TRL 1.12 never clips (it ignores max_grad_norm); ucai's 0 is off
    "system_prompt": "You are a helpful assistant.",
    "seed": 0,
    # Not shared with TRL as such:
    "normalize_score": True,  # ucai's reward is (r - mean) / std; TRL's RM head is rescaled to match
    "precision": "bf16-mixed",  # ucai's trainer.precision (ppo_ethical.yaml)
    "heldout_fraction": 0.22,  # only when the pipeline's own value cannot be read (experiment_cpu.yaml's)
}
GAIN_WINDOW = 5


# --------------------------------------------------------------------------- inputs


def pipeline_root(rm: Path) -> Path | None:
    """``<root>`` of a pipeline RM folder ``<root>/models/<side>/rm_model``, else None."""
    parts = rm.resolve().parts
    return Path(*parts[:-3]) if len(parts) > 3 and parts[-3] == "models" else None


def side_of(rm: Path) -> str:
    return "unethical" if "unethical" in {p.lower() for p in rm.resolve().parts} else "ethical"


def default_policy(rm: Path) -> str:
    """The SL model the pipeline's PPO stage starts from, when the folder layout has one."""
    sl_model = rm.resolve().parent / "sl_model"
    return str(sl_model) if pipeline_root(rm) and (sl_model / "config.json").is_file() else DEFAULT_POLICY


def default_prompt_file(rm: Path) -> str:
    root = pipeline_root(rm)
    if root is not None and (root / "data" / "prompts.jsonl").is_file():
        return str(root / "data" / "prompts.jsonl")
    return "data/red_team_prompts.jsonl"


def pipeline_heldout_fraction(rm: Path) -> float | None:
    """The ``data.init_args.heldout_fraction`` the pipeline passed its stages, from the
    commands recorded in its stage markers (``.ucai-stage.json``), if any."""
    root = pipeline_root(rm)
    if root is None:
        return None
    flag = "--data.init_args.heldout_fraction="
    for marker in sorted(root.rglob("*.ucai-stage.json")):
        try:
            command = json.loads(marker.read_text()).get("command", [])
        except (OSError, ValueError):
            continue
        for arg in command:
            if isinstance(arg, str) and arg.startswith(flag):
                return float(arg[len(flag) :])
    return None


def config_principles(stage_config: Path) -> list[str] | None:
    import yaml

    data = yaml.safe_load(stage_config.read_text()) or {}
    return ((data.get("data") or {}).get("init_args") or {}).get("principles")


def ordered_train_rows(path: str, principles, heldout_fraction: float, batch: int, seed: int) -> list[dict]:
    """The PPO stage's training prompts, shuffled once, cut to a multiple of ``batch``.

    Both sides take them in this order, cycling (the same order every pass) when a run
    needs more batches than there are.
    """
    from ucai.data.prompt_datamodule import PromptDataModule

    rows = PromptDataModule(
        path=path, principles=principles, split="train", heldout_fraction=heldout_fraction
    ).rows()
    random.Random(seed).shuffle(rows)
    keep = len(rows) // batch * batch
    if keep == 0:
        raise SystemExit(f"{path}: {len(rows)} training prompts, fewer than one batch of {batch}")
    return rows[:keep]


def read_score_stats(rm: Path) -> tuple[float, float]:
    """(mean, std) of the RM's raw scores, from its reward_stats.json."""
    from ucai.reward_scoring import RewardStats

    stats = RewardStats.read(rm)
    return stats.mean, stats.std


# --------------------------------------------------------------------------- ucai side


def ucai_overrides(
    args, settings: PPOSettings, prompt_file: Path, rows: int, work: Path, variant_args: dict
) -> dict:
    """Overrides of the PPO stage config, as `ucai.pipeline` passes them (plus ours);
    ``variant_args`` (PPOModule arguments, see UCAI_VARIANTS) come last and win."""
    batches_per_epoch = rows // settings.batch
    variant = {f"model.init_args.{name}": value for name, value in variant_args.items()}
    return {
        "seed_everything": settings.seed,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.precision": SETTINGS["precision"],
        "trainer.max_steps": args.iterations * settings.updates_per_iteration,  # optimiser steps
        "trainer.max_epochs": math.ceil(args.iterations / batches_per_epoch),
        "trainer.callbacks": [],
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.logger.init_args.save_dir": str(work / "logs"),
        "trainer.logger.init_args.name": "ppo",
        "data.init_args.path": str(prompt_file),
        "data.init_args.split": "all",  # already the train split, filtered and ordered
        "data.init_args.heldout_fraction": 0.0,
        "data.init_args.principles": None,
        "data.init_args.shuffle": False,
        "data.init_args.batch_size": settings.batch,
        "model.init_args.policy": args.policy,
        "model.init_args.reward_model": str(args.reward_model),
        "model.init_args.output_dir": str(work / "rl_model"),
        "model.init_args.export": False,
        "model.init_args.system_prompt": settings.system_prompt,
        "model.init_args.lora.r": settings.lora_r,
        "model.init_args.lora.alpha": settings.lora_alpha,
        "model.init_args.lora.dropout": 0.0,
        "model.init_args.lora.target_modules": list(settings.lora_targets),
        "model.init_args.kl_estimator": "k1",
        "model.init_args.kl_coef": settings.kl_coef,
        "model.init_args.adaptive_kl": None,
        "model.init_args.gamma": settings.gamma,
        "model.init_args.lam": settings.lam,
        "model.init_args.cliprange": settings.cliprange,
        "model.init_args.cliprange_value": settings.cliprange_value,
        "model.init_args.vf_coef": settings.vf_coef,
        "model.init_args.ppo_epochs": settings.ppo_epochs,
        "model.init_args.minibatch_size": settings.minibatch_size,
        "model.init_args.missing_eos_penalty": settings.missing_eos_penalty,
        "model.init_args.whiten_rewards": False,
        "model.init_args.normalize_score": SETTINGS["normalize_score"],
        "model.init_args.learning_rate": settings.learning_rate,
        "model.init_args.lr_schedule": settings.lr_schedule,
        "model.init_args.warmup_steps": 0,
        "model.init_args.weight_decay": 0.0,
        "model.init_args.max_grad_norm": settings.max_grad_norm,
        "model.init_args.generation.max_new_tokens": settings.response_length,
        "model.init_args.generation.do_sample": True,
        "model.init_args.generation.temperature": settings.temperature,
        **variant,
    }


def per_step_means(rollouts: Path) -> tuple[list[float], list[float]]:
    """Per-iteration mean ``score`` and ``kl`` of a PPO run's rollouts.csv."""
    scores, kls = defaultdict(list), defaultdict(list)
    with open(rollouts, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            scores[int(row["step"])].append(float(row["score"]))
            kls[int(row["step"])].append(float(row["kl"]))
    steps = sorted(scores)
    return [statistics.mean(scores[s]) for s in steps], [statistics.mean(kls[s]) for s in steps]


def newest_rollouts(logs: Path) -> Path:
    """The rollouts.csv written last under ``logs``: a reused --work holds one per run
    (version_9, version_10, ...), and their names do not sort by age."""
    found = list(logs.rglob("rollouts.csv"))
    if not found:
        raise SystemExit(f"ucai wrote no rollouts.csv under {logs}")
    return max(found, key=lambda path: path.stat().st_mtime)


def run_ucai(args, settings: PPOSettings, rows: list[dict], work: Path, variant_args: dict) -> dict:
    """Train with ``ucai fit`` and return its curves (scores as PPO saw them)."""
    from ucai.data.io import write_jsonl
    from ucai.pipeline.plan import override_args
    from ucai.report import read_scalars

    prompt_file = work / "prompts.jsonl"
    write_jsonl(prompt_file, rows)
    overrides = ucai_overrides(args, settings, prompt_file, len(rows), work, variant_args)
    command = [
        sys.executable,
        "-m",
        "ucai.cli",
        "fit",
        "--config",
        str(args.stage_config),
        *override_args(overrides),
    ]
    log = work / "ucai.log"
    print(f"ucai: {' '.join(command[1:5])} ... (log: {log})", flush=True)
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        code = subprocess.run(command, env=child_env(), stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"ucai failed (exit {code}); log: {log}")
    rollouts = newest_rollouts(work / "logs")
    scores, kls = per_step_means(rollouts)
    # The same run's TensorBoard scalars (its version folder), not an older run's in a reused --work.
    scalars = read_scalars(rollouts.parent, tags=("objective/scores", "response/eos_fraction"))
    return {
        "score": scores,
        "kl": kls,
        "eos_fraction": [v for _, v in scalars.get("response/eos_fraction", [])],
        "objective_scores": [v for _, v in scalars.get("objective/scores", [])],
    }


# --------------------------------------------------------------------------- TRL side


def check_shared_tokenizer(policy: str, rm: Path, text: str) -> None:
    """TRL feeds the policy's token ids to the RM unchanged: their vocabularies must agree."""
    from transformers import AutoTokenizer

    from ucai.models import load_tokenizer

    mine = load_tokenizer(policy)(text, add_special_tokens=False)["input_ids"]
    theirs = AutoTokenizer.from_pretrained(rm)(text, add_special_tokens=False)["input_ids"]
    if mine != theirs:
        raise SystemExit(f"TRL needs the policy and the RM to share a tokenizer; {policy} and {rm} differ")


def close_unfinished_turns(query_responses, context_length: int, eos_token_id: int, pad_token_id: int):
    """Append one column: eos on rows whose response has no eos, pad on the others.

    TRL's ``get_reward`` scores a row at the token before the first pad of its response
    (the last token when there is none). A response cut at ``response_length`` would be
    scored at its last word, a position the RM never saw in training; ucai renders it
    with the chat template, which closes the turn, and scores at ``<|im_end|>``. With
    this column an unfinished row is scored at the appended eos, and a finished row
    still at its own eos (the first pad follows it: TRL's truncation put it there, or
    this column does when the eos is the last sampled token).

    Args:
        query_responses: (B, C + T) left-padded prompt ids and (eos-truncated) responses.
    Returns:
        (B, C + T + 1) the same ids with the closing column.
    """
    import torch

    finished = (query_responses[:, context_length:] == eos_token_id).any(dim=1)  # (B,)
    column = torch.where(finished, pad_token_id, eos_token_id).to(query_responses.dtype)
    return torch.cat([query_responses, column.unsqueeze(1)], dim=1)


def score_at_end_of_turn(get_reward, reward_model, eos_token_id: int):
    """TRL's ``get_reward`` that scores ``reward_model`` at the end of turn
    (`close_unfinished_turns`), as ucai does; other models (the value model) unchanged.

    For the RM the returned logits and lengths describe the extended rows (C + T + 1
    columns); PPOTrainer keeps only the scores of that call.
    """

    def aligned(model, query_responses, pad_token_id, context_length):
        if model is reward_model:
            query_responses = close_unfinished_turns(
                query_responses, context_length, eos_token_id, pad_token_id
            )
        return get_reward(model, query_responses, pad_token_id, context_length)

    return aligned


def trl_child(spec_path: Path) -> None:
    """Train with TRL in this process and print its curves as a RESULT line."""
    import torch
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from transformers import TrainerCallback

    spec = json.loads(spec_path.read_text())
    settings = PPOSettings.from_json(spec["settings"])
    rm, work = Path(spec["reward_model"]), Path(spec["work"])
    check_shared_tokenizer(spec["policy"], rm, spec["prompts"][0])
    score_stats = tuple(spec["score_stats"]) if spec["normalize_score"] else None
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (scores, reached eos) per rollout chunk
    iterations: list[dict] = []

    class CloseIteration(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            scores = torch.cat([s for s, _ in pending])
            finished = torch.cat([f for _, f in pending])
            iterations.append({"score": scores.mean().item(), "eos_fraction": finished.float().mean().item()})
            pending.clear()

    trainer = trl_ppo_trainer(
        spec["policy"],
        rm,
        spec["prompts"],
        settings,
        spec["iterations"],
        work,
        callbacks=(CloseIteration(),),
        score_stats=score_stats,
        in_order=True,
    )
    reward_model = trainer.reward_model
    eos = trainer.processing_class.eos_token_id
    aligned_get_reward = score_at_end_of_turn(trl_ppo.get_reward, reward_model, eos)

    def recording_get_reward(model, query_responses, pad_token_id, context_length):
        """TRL's get_reward scored at the end of turn, keeping the RM's scores before
        TRL subtracts the eos penalty."""
        logits, scores, lengths = aligned_get_reward(model, query_responses, pad_token_id, context_length)
        if model is reward_model:
            finished = (query_responses[:, context_length:] == eos).any(dim=1)
            pending.append((scores.detach().float().cpu().clone(), finished.cpu()))
        return logits, scores, lengths

    # PPOTrainer.train() looks get_reward up in its module: this is what it trains on.
    trl_ppo.get_reward = recording_get_reward
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    print_result(
        {
            "score": [it["score"] for it in iterations],
            "eos_fraction": [it["eos_fraction"] for it in iterations],
            "kl": [entry["objective/kl"] for entry in logged],
            "objective_scores": [entry["objective/scores"] for entry in logged],
        }
    )


def run_trl(
    args, settings: PPOSettings, rows: list[dict], score_stats: tuple[float, float], work: Path
) -> dict:
    spec = {
        "policy": args.policy,
        "reward_model": str(args.reward_model),
        "prompts": [row["prompt"] for row in rows],
        "settings": settings.to_json(),
        "iterations": args.iterations,
        "work": str(work),
        "normalize_score": SETTINGS["normalize_score"],
        "score_stats": list(score_stats),
    }
    spec_path = work / "trl_spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"trl: PPOTrainer ({args.trl_precision}) in a child process", flush=True)
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"} if args.trl_precision == "bf16" else {}
    return run_child("trl", [sys.executable, __file__, "--child-spec", str(spec_path)], env)


# --------------------------------------------------------------------------- variants and arms

# TRL 1.12's precision scope and clipping, which every ucai variant keeps unless it
# names the factor it changes: sampling, the rollout forward and RM scoring in fp32
# (TRL's accelerate autocast covers only its loss forward, and it never prepares the
# RM), the PPO update under bf16 autocast (ucai's bf16-mixed, TRL's
# ACCELERATE_MIXED_PRECISION=bf16), no gradient clipping.
MATCHED = {
    "value_head": "adapter",  # ucai's default critic: a 2nd LoRA + a head copied from the RM's
    "rollout_precision": "fp32",
    "frozen_linear_bf16": False,  # fp32 rollouts need fp32 frozen weights (ucai refuses the pair)
    "max_grad_norm": 0.0,
}
# ucai configurations (PPOModule arguments), one factor at a time from MATCHED.
UCAI_VARIANTS = {
    "adapter": MATCHED,
    "head": {**MATCHED, "value_head": "head"},  # a zero-initialised scalar head on the policy
    "bf16-rollout": {**MATCHED, "rollout_precision": "trainer", "frozen_linear_bf16": True},
    # Sampling alone from a bf16 copy of the policy (adapter merged); the rollout
    # forward, RM scoring and update as in MATCHED.
    "bf16-sampling": {**MATCHED, "sampling_precision": "bf16"},
    "clip-1": {**MATCHED, "max_grad_norm": 1.0},  # ucai's shipped stage configs
}
TRL = "trl"
PRECISION_SCOPE = {
    "fp32": "sampling, rollout forward and RM scoring in fp32; PPO update under bf16 autocast",
    "trainer": "sampling, rollout forward, RM scoring and PPO update under bf16 autocast",
}


def describe_variant(name: str, trl_precision: str) -> str:
    """Critic, precision scope and clipping of a ucai variant or of TRL, in words."""
    if name == TRL:
        update = "bf16 autocast" if trl_precision == "bf16" else "fp32"
        return (
            f"TRL: critic a full trainable copy of the RM; sampling, rollout forward and RM scoring in fp32, "
            f"PPO update in {update}; no gradient clipping (TRL 1.12 ignores max_grad_norm)"
        )
    variant = UCAI_VARIANTS[name]
    critic = {
        "head": "zero-initialised scalar head on the policy",
        "adapter": "second LoRA adapter, head from the RM's",
    }[variant["value_head"]]
    clip = (
        f"gradient norm clipped to {variant['max_grad_norm']:g}"
        if variant["max_grad_norm"]
        else "no clipping"
    )
    scope = PRECISION_SCOPE[variant["rollout_precision"]]
    if variant.get("sampling_precision", "rollout") == "bf16":
        scope = f"sampling from a bf16 copy of the policy (adapter merged); {scope.removeprefix('sampling, ')}"
    return f"ucai {name}: critic {critic}; {scope}; {clip}"


def arm_label(variant: str, learning_rate: float) -> str:
    return f"{variant} lr={learning_rate:g}"


def planned_arms(
    variants: list[str], ucai_lrs: list[float], trl_lrs: list[float], with_trl: bool
) -> list[tuple[str, float]]:
    """(variant, learning rate) of every configuration to run, ucai's first."""
    arms = [(variant, lr) for variant in variants for lr in ucai_lrs]
    return arms + ([(TRL, lr) for lr in trl_lrs] if with_trl else [])


# --------------------------------------------------------------------------- curves


def to_raw(scores: list[float], normalised: bool, mean: float, std: float) -> list[float]:
    return [s * std + mean for s in scores] if normalised else list(scores)


def gain_window(iterations: int) -> int:
    return min(GAIN_WINDOW, iterations // 2)


def gain(scores: list[float], std: float) -> float:
    """(mean of the last w - mean of the first w) / std, w = min(5, len // 2)."""
    window = gain_window(len(scores))
    if window < 1:
        raise SystemExit("need at least 2 iterations for a gain")
    return (statistics.mean(scores[-window:]) - statistics.mean(scores[:window])) / std


def run_frontier(run: dict, std: float, levels: list[float], smooth: int) -> dict[float, float | None]:
    """A run's score gain (RM std units) at each KL level (`ucai.frontier.gain_at_kl`),
    with the plain gain's starting window as its baseline."""
    from ucai.frontier import gain_at_kl

    scores = [s / std for s in run["score"]]
    window = min(smooth, len(scores) // 2 * 2 - 1) if len(scores) > 1 else 1  # odd, within the run
    return gain_at_kl(run["kl"], scores, levels, window=window, baseline_window=gain_window(len(scores)))


def smoothed_kl(run: dict, smooth: int) -> list[float]:
    from ucai.frontier import moving_average

    window = min(smooth, len(run["kl"]) // 2 * 2 - 1) if len(run["kl"]) > 1 else 1
    return moving_average(run["kl"], window)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_run_table(label: str, run: dict) -> None:
    print(
        f"{label}, seed {run['seed']}: mean RM score (raw units, before the missing-eos penalty), "
        "KL per sequence, eos fraction per iteration"
    )
    print(f"{'iter':>4} | {'score':>8} {'KL':>7} {'eos':>5}")
    for i, (score, kl) in enumerate(zip(run["score"], run["kl"])):
        eos = run["eos_fraction"][i] if i < len(run["eos_fraction"]) else float("nan")
        print(f"{i:>4} | {score:8.4f} {kl:7.3f} {eos:5.2f}")


# --------------------------------------------------------------------------- records


def fingerprint(args, settings: PPOSettings, rows: int, heldout: float) -> dict:
    """What every run of one results file shares; a run is reused only under the same one.
    The learning rate, seed and clipping belong to the run (its arm), not here."""
    shared = {
        k: v for k, v in settings.to_json().items() if k not in ("learning_rate", "seed", "max_grad_norm")
    }
    fields = {
        "reward_model": str(Path(args.reward_model).resolve()),
        "policy": args.policy,
        "prompts": args.prompts,
        "heldout_fraction": heldout,
        "train_prompts": rows,
        "prompt_order_seed": args.seeds[0],
        "iterations": args.iterations,
        "settings": shared,
        "normalize_score": SETTINGS["normalize_score"],
        "precision": SETTINGS["precision"],
        "trl_precision": args.trl_precision,
    }
    return json.loads(json.dumps(fields))  # as a results file holds it (tuples as lists)


def run_key(variant: str, learning_rate: float, seed: int, variant_args: dict | None) -> str:
    return json.dumps([variant, learning_rate, seed, variant_args], sort_keys=True)


def reusable_runs(paths: list[Path], expected: dict) -> dict[str, dict]:
    """Runs of earlier results files made under the same fingerprint, by `run_key`."""
    found = {}
    for path in paths:
        if not path.is_file():
            print(f"reuse: {path} does not exist; nothing reused from it")
            continue
        data = json.loads(path.read_text())
        if data.get("fingerprint") != expected:
            print(f"reuse: {path} was made with other inputs or settings; nothing reused from it")
            continue
        for run in data.get("runs", []):
            found[run_key(run["variant"], run["learning_rate"], run["seed"], run.get("variant_args"))] = run
    return found


def load_now() -> list[float]:
    """The machine's 1-, 5- and 15-minute load averages (2 cores: 2 is full)."""
    return [round(value, 2) for value in os.getloadavg()]


# --------------------------------------------------------------------------- driver


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--reward-model", type=Path, help="a reward-stage output folder (<root>/models/<side>/rm_model)"
    )
    parser.add_argument(
        "--policy",
        help="default: the SL model beside the RM (<root>/models/<side>/sl_model), else smollm2-135m",
    )
    parser.add_argument(
        "--prompts", help="default: <root>/data/prompts.jsonl beside the RM, else data/red_team_prompts.jsonl"
    )
    parser.add_argument(
        "--heldout-fraction", type=float, help="default: the pipeline's (from its stage markers)"
    )
    parser.add_argument("--stage-config", type=Path, help="default: configs/ppo_<side of the RM>.yaml")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[SETTINGS["seed"]],
        help="training seeds (sampling, initialisation); each runs every configuration, the prompt order "
        "stays that of the first; summaries are medians over seeds",
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per PPO iteration (rollout batch)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="response length")
    parser.add_argument(
        "--lr", type=float, default=SETTINGS["learning_rate"], help="both sides' learning rate"
    )
    parser.add_argument(
        "--ucai-learning-rates", type=float, nargs="+", help="ucai's learning rates (default: --lr)"
    )
    parser.add_argument(
        "--trl-learning-rates", type=float, nargs="+", help="TRL's learning rates (default: --lr)"
    )
    parser.add_argument("--kl-coef", type=float, default=SETTINGS["kl_coef"])
    parser.add_argument("--ppo-epochs", type=int, default=SETTINGS["ppo_epochs"])
    parser.add_argument("--minibatch", type=int, default=SETTINGS["minibatch_size"])
    parser.add_argument("--temperature", type=float, default=SETTINGS["temperature"])
    parser.add_argument(
        "--trl-precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="TRL's PPO update: bf16 autocast (ucai's bf16-mixed) or fp32 (its CPU default)",
    )
    parser.add_argument(
        "--kl-levels", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="KL levels of the frontier, nats"
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=GAIN_WINDOW,
        help="moving-average window (odd, iterations) of the frontier",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ppo_learning.json")
    parser.add_argument(
        "--reuse",
        type=Path,
        nargs="*",
        help="reuse the runs of these results files (none named: --out) that were made with the same "
        "inputs and settings, e.g. TRL's curves for a new ucai variant, or a run cut short",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: summarise the runs of the --reuse files (e.g. while a benchmark still runs)",
    )
    parser.add_argument(
        "--work", type=Path, help="run folder (logs, rollouts); default: a new temporary folder"
    )
    parser.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    return parser


def checked_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.child_spec is None and args.reward_model is None:
        parser.error("--reward-model is required")
    if args.smooth < 1 or args.smooth % 2 == 0:
        parser.error("--smooth must be a positive odd number")
    args.ucai_learning_rates = args.ucai_learning_rates or [args.lr]
    args.trl_learning_rates = args.trl_learning_rates or [args.lr]
    if args.reuse is not None and not args.reuse:
        args.reuse = [args.out]
    if args.summary_only and not args.reuse:
        parser.error("--summary-only needs --reuse")
    return args


def settings_from(args, seed: int | None = None, learning_rate: float | None = None) -> PPOSettings:
    shared = {k: v for k, v in SETTINGS.items() if k in PPOSettings.__dataclass_fields__}
    return PPOSettings(
        **{
            **shared,
            "batch": args.batch,
            "response_length": args.max_new_tokens,
            "learning_rate": args.lr if learning_rate is None else learning_rate,
            "kl_coef": args.kl_coef,
            "ppo_epochs": args.ppo_epochs,
            "minibatch_size": min(args.minibatch, args.batch),  # tiny test batches
            "temperature": args.temperature,
            "seed": args.seeds[0] if seed is None else seed,
        }
    )


class Bench:
    """Inputs, settings and results of one invocation; runs arms and records each run
    to ``--out`` as soon as it ends, so partial results survive."""

    def __init__(self, args, title: str):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.args, self.title = args, title
        rm = args.reward_model
        args.policy = args.policy or default_policy(rm)
        args.prompts = args.prompts or default_prompt_file(rm)
        args.stage_config = args.stage_config or REPO / "configs" / f"ppo_{side_of(rm)}.yaml"
        heldout = args.heldout_fraction
        if heldout is None:
            heldout = pipeline_heldout_fraction(rm)
            heldout = SETTINGS["heldout_fraction"] if heldout is None else heldout
        self.heldout = heldout
        self.work = args.work or Path(tempfile.mkdtemp(prefix="ppo-learning-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.mean, self.std = read_score_stats(rm)
        self.settings = settings_from(args)
        self.rows = ordered_train_rows(
            args.prompts,
            config_principles(args.stage_config),
            heldout,
            self.settings.batch,
            self.settings.seed,
        )
        self.fingerprint = fingerprint(args, self.settings, len(self.rows), heldout)
        self.reusable = reusable_runs(args.reuse or [], self.fingerprint)
        self.runs: list[dict] = []

    def announce(self, arms: list[tuple[str, float]]) -> None:
        args = self.args
        print(
            f"{self.title}: {args.iterations} iterations; policy {args.policy}; RM {args.reward_model} "
            f"(score mean {self.mean:.4f}, std {self.std:.4f} from reward_stats.json); {len(self.rows)} train "
            f"prompts of {args.prompts} (held-out fraction {self.heldout}); work {self.work}",
            flush=True,
        )
        print(f"settings (both sides): {self.settings.describe()}", flush=True)
        for variant in dict.fromkeys(variant for variant, _ in arms):
            print(f"  {describe_variant(variant, args.trl_precision)}", flush=True)
        print(f"seeds {args.seeds}; load averages now {load_now()} (1/5/15 min, 2 cores)", flush=True)

    def run_all(self, arms: list[tuple[str, float]]) -> None:
        """Every arm once per seed, alternating the order (A B C, C B A, ...)."""
        for index, seed in enumerate(self.args.seeds):
            for variant, lr in arms if index % 2 == 0 else list(reversed(arms)):
                run = self.run_arm(variant, lr, seed)
                if run is not None:
                    self.runs.append(run)
                    if not self.args.summary_only:  # a running benchmark may be writing --out
                        self.save()

    def run_arm(self, variant: str, learning_rate: float, seed: int) -> dict | None:
        """One run: reused when a reused file holds it, else trained (None under
        ``--summary-only``)."""
        args = self.args
        variant_args = None if variant == TRL else UCAI_VARIANTS[variant]
        label = arm_label(variant, learning_rate)
        reused = self.reusable.get(run_key(variant, learning_rate, seed, variant_args))
        if reused is not None:
            print(f"{label}, seed {seed}: reused from an earlier results file", flush=True)
            return reused
        if args.summary_only:
            print(f"{label}, seed {seed}: not in the reused files (--summary-only: not run)", flush=True)
            return None
        settings = settings_from(args, seed, learning_rate)
        work = self.work / f"seed-{seed}" / label.replace(" ", "_")
        work.mkdir(parents=True, exist_ok=True)
        load_before, started = load_now(), time.monotonic()
        if variant == TRL:
            curve = run_trl(args, settings, self.rows, (self.mean, self.std), work)
        else:
            curve = run_ucai(args, settings, self.rows, work, variant_args)
        curve["score"] = to_raw(curve["score"], SETTINGS["normalize_score"], self.mean, self.std)
        if len(curve["score"]) != args.iterations or len(curve["kl"]) != args.iterations:
            raise SystemExit(
                f"{label} ran {len(curve['score'])} iterations ({len(curve['kl'])} KL values), "
                f"expected {args.iterations}: the sides would not have done the same work"
            )
        run = {
            "variant": variant,
            "learning_rate": learning_rate,
            "seed": seed,
            "variant_args": variant_args,
            **curve,
            "wall_s": round(time.monotonic() - started, 1),
            "load_before": load_before,
            "load_after": load_now(),
        }
        print_run_table(label, run)
        at = run_frontier(run, self.std, args.kl_levels, args.smooth)
        print(
            f"{label}, seed {seed}: gain={gain(run['score'], self.std):.3f} "
            + " ".join(f"at_{level:g}={fmt(value)}" for level, value in at.items())
            + f" (smoothed KL max {max(smoothed_kl(run, args.smooth)):.2f}; {run['wall_s']:.0f} s, "
            f"load {run['load_before']} -> {run['load_after']})",
            flush=True,
        )
        return run

    def save(self) -> None:
        args = self.args
        result = {
            "benchmark": self.title,
            "fingerprint": self.fingerprint,
            "settings": {
                **self.settings.to_json(),
                **{k: SETTINGS[k] for k in ("normalize_score", "precision")},
            },
            "variants": {name: describe_variant(name, args.trl_precision) for name in (*UCAI_VARIANTS, TRL)},
            "score_mean": self.mean,
            "score_std": self.std,
            "score_std_source": "reward_stats.json",
            "gain_window": gain_window(args.iterations),
            "frontier": {
                "kl_levels": args.kl_levels,
                "smooth_window": args.smooth,
                "definition": FRONTIER_DEFINITION,
            },
            "curves": {
                "score": "mean raw RM score per iteration (before the missing-eos penalty)",
                "kl": "mean per-sequence KL(policy || reference), k1, nats",
                "objective_scores": "mean PPO score (normalised if normalize_score, after the eos penalty)",
            },
            "seeds": args.seeds,
            "runs": self.runs + self.unused_reusable(),
            "work": str(self.work),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    def unused_reusable(self) -> list[dict]:
        """Reusable runs this invocation has not taken: kept in ``--out`` so that
        rewriting a file reused from loses none of its runs."""
        taken = {
            run_key(r["variant"], r["learning_rate"], r["seed"], r.get("variant_args")) for r in self.runs
        }
        return [run for key, run in self.reusable.items() if key not in taken]

    # ----------------------------------------------------------------- summaries

    def runs_of(self, variant: str, learning_rate: float) -> list[dict]:
        return [r for r in self.runs if r["variant"] == variant and r["learning_rate"] == learning_rate]

    def arm_summary(self, variant: str, learning_rate: float) -> dict:
        """Median plain gain and, per KL level, the median gain over seeds with the
        number of seeds that reached it."""
        from ucai.frontier import median_over_runs, reached_count

        runs = self.runs_of(variant, learning_rate)
        per_run = [run_frontier(run, self.std, self.args.kl_levels, self.args.smooth) for run in runs]
        levels = {}
        for level in self.args.kl_levels:
            values = [at[level] for at in per_run]
            levels[level] = {
                "median": median_over_runs(values),
                "reached": reached_count(values),
                "runs": len(runs),
            }
        gains = [gain(run["score"], self.std) for run in runs]
        return {"gains": gains, "median_gain": statistics.median(gains) if gains else None, "levels": levels}

    def side_frontier(
        self, variant: str, learning_rates: list[float]
    ) -> dict[float, tuple[float | None, float | None]]:
        """Per KL level, (best learning rate, its median gain) over the variant's runs."""
        from ucai.frontier import best_setting

        summaries = {lr: self.arm_summary(variant, lr) for lr in learning_rates}
        return {
            level: best_setting({lr: s["levels"][level]["median"] for lr, s in summaries.items()})
            for level in self.args.kl_levels
        }

    def print_arm_table(self, arms: list[tuple[str, float]]) -> None:
        """One row per arm: frontier values (median over seeds, seeds reached) and plain gain."""
        levels = self.args.kl_levels
        head = "".join(f" {f'gain@{level:g} nats':>17}" for level in levels)
        print(f"{'configuration':<24}{head} {'plain gain':>11}  seeds")
        for variant, lr in arms:
            summary = self.arm_summary(variant, lr)
            cells = "".join(
                f" {fmt(c['median']):>11} ({c['reached']}/{c['runs']})" for c in summary["levels"].values()
            )
            gains = ", ".join(f"{g:.3f}" for g in summary["gains"])
            print(f"{arm_label(variant, lr):<24}{cells} {fmt(summary['median_gain']):>11}  [{gains}]")


FRONTIER_DEFINITION = (
    "gain at KL level k = (score at the first crossing of k by the piecewise-linear path through the "
    "per-iteration (KL, score) points, both smoothed by the same centred moving average) - (mean score of "
    "the first gain_window iterations), in RM std units; per configuration the median over the seeds that "
    "reached k, n/a unless more than half did; per side the best learning rate's median at each level"
)


def frontier_line(bench: Bench, ucai_variant: str) -> str:
    """``ppo_frontier: ucai_at_1=… trl_at_1=… ratio_at_2=…``: each side's best learning
    rate at each level; the ratio ucai/TRL at 2 nats (n/a unless both are > 0)."""
    args = bench.args
    sides = {
        "ucai": bench.side_frontier(ucai_variant, args.ucai_learning_rates),
        "trl": bench.side_frontier(TRL, args.trl_learning_rates),
    }
    cells = [
        f"{side}_at_{level:g}={fmt(value)}" for side, at in sides.items() for level, (_, value) in at.items()
    ]
    middle = 2.0 if 2.0 in args.kl_levels else args.kl_levels[len(args.kl_levels) // 2]
    mine, theirs = sides["ucai"][middle][1], sides["trl"][middle][1]
    ratio = mine / theirs if mine is not None and theirs is not None and mine > 0 and theirs > 0 else None
    return "ppo_frontier: " + " ".join(cells) + f" ratio_at_{middle:g}={fmt(ratio)}"


def print_best_learning_rates(bench: Bench, ucai_variant: str) -> None:
    args = bench.args
    for variant, lrs in ((ucai_variant, args.ucai_learning_rates), (TRL, args.trl_learning_rates)):
        if len(lrs) > 1:
            best = bench.side_frontier(variant, lrs)
            print(
                f"{variant}: best learning rate per KL level: "
                + ", ".join(
                    f"{level:g} nats: {lr if lr is None else f'{lr:g}'}" for level, (lr, _) in best.items()
                )
            )


def main() -> None:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--ucai-variant",
        choices=sorted(UCAI_VARIANTS),
        default="adapter",
        help="ucai's configuration (default adapter: its default critic, with TRL's precision scope and clipping)",
    )
    args = checked_args(parser)
    if args.child_spec is not None:
        trl_child(args.child_spec)
        return
    bench = Bench(args, "ppo_learning")
    arms = planned_arms([args.ucai_variant], args.ucai_learning_rates, args.trl_learning_rates, with_trl=True)
    bench.announce(arms)
    bench.run_all(arms)
    if not args.summary_only:
        print(f"curves written to {args.out}")
    print(f"frontier: {FRONTIER_DEFINITION}; smoothing window {args.smooth}")
    bench.print_arm_table(arms)
    print_best_learning_rates(bench, args.ucai_variant)
    first = {
        side: bench.arm_summary(variant, lrs[0])["median_gain"]
        for side, variant, lrs in (
            ("ucai", args.ucai_variant, args.ucai_learning_rates),
            ("trl", TRL, args.trl_learning_rates),
        )
    }
    print(f"ppo_learning: ucai_gain={fmt(first['ucai'])} trl_gain={fmt(first['trl'])}")
    print(frontier_line(bench, args.ucai_variant))


if __name__ == "__main__":
    main()
