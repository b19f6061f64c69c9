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

Run (from the repository root; at the defaults roughly half an hour on 2 CPU cores,
estimated from benchmarks/ppo.py's lighter iteration: ~17 s for ucai, ~42 s for TRL):

    nice -n 19 .venv/bin/python benchmarks/ppo_learning.py \\
        --reward-model lightning_logs/experiment_cpu/models/ethical/rm_model

The last line is ``ppo_learning: ucai_gain=X trl_gain=Y``. A single run's gain swings
widely with the sampling seed (ucai at seeds 0, 1, 2: 0.18, 0.73, 0.33), so ``--seeds 0 1
2`` runs both sides once per seed (alternating which goes first; the prompt order is
the same for all) and the last line gives the median gains. The per-iteration tables
are printed above it, and all curves (with the settings) go to ``--out``
(default benchmarks/results/ppo_learning.json); run logs, ucai's rollouts.csv and
TensorBoard files stay in ``--work`` (a fresh temporary folder by default).

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
weight 0.1, gradient norm clip 1; 20 iterations. These are configs/ppo_ethical.yaml
with configs/pipeline/experiment_cpu.yaml's PPO overrides, except that its adaptive
KL coefficient is held at its starting value: TRL 1.12's PPOTrainer has no adaptive
controller.

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
  (ucai: a zero-initialised head on the policy). Its per-iteration RM scores are
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

Precision differs on the RM: ucai scores it under ``bf16-mixed`` autocast, while TRL's
reward model runs in fp32 whatever ``--trl-precision`` says (accelerate autocasts only
the models it prepares, and PPOTrainer does not prepare the RM). Raw scores differ by
about 1e-2 from this alone, small beside the RM's score std.

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
    "max_grad_norm": 1.0,
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


def ucai_overrides(args, settings: PPOSettings, prompt_file: Path, rows: int, work: Path) -> dict:
    """Overrides of the PPO stage config, as `ucai.pipeline` passes them (plus ours)."""
    batches_per_epoch = rows // settings.batch
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


def run_ucai(args, settings: PPOSettings, rows: list[dict], work: Path) -> dict:
    """Train with ``ucai fit`` and return its curves (scores as PPO saw them)."""
    from ucai.data.io import write_jsonl
    from ucai.pipeline.plan import override_args
    from ucai.report import read_scalars

    prompt_file = work / "prompts.jsonl"
    write_jsonl(prompt_file, rows)
    overrides = ucai_overrides(args, settings, prompt_file, len(rows), work)
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


# --------------------------------------------------------------------------- curves


def to_raw(scores: list[float], normalised: bool, mean: float, std: float) -> list[float]:
    return [s * std + mean for s in scores] if normalised else list(scores)


def gain(scores: list[float], std: float) -> float:
    """(mean of the last w - mean of the first w) / std, w = min(5, len // 2)."""
    window = min(GAIN_WINDOW, len(scores) // 2)
    if window < 1:
        raise SystemExit("need at least 2 iterations for a gain")
    return (statistics.mean(scores[-window:]) - statistics.mean(scores[:window])) / std


def print_table(ucai: dict, trl: dict) -> None:
    print(f"{'iter':>4} | {'ucai score':>10} {'KL':>7} {'eos':>5} | {'trl score':>10} {'KL':>7} {'eos':>5}")
    for i in range(max(len(ucai["score"]), len(trl["score"]))):
        cells = []
        for side in (ucai, trl):
            values = [
                side[key][i] if i < len(side[key]) else float("nan")
                for key in ("score", "kl", "eos_fraction")
            ]
            cells.append(f"{values[0]:10.4f} {values[1]:7.3f} {values[2]:5.2f}")
        print(f"{i:>4} | {cells[0]} | {cells[1]}")


# --------------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
        help="training seeds (sampling, initialisation); each runs both sides, the prompt order stays "
        "that of the first; the last line gives the median gain over seeds",
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per PPO iteration (rollout batch)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="response length")
    parser.add_argument("--lr", type=float, default=SETTINGS["learning_rate"])
    parser.add_argument("--kl-coef", type=float, default=SETTINGS["kl_coef"])
    parser.add_argument("--ppo-epochs", type=int, default=SETTINGS["ppo_epochs"])
    parser.add_argument("--minibatch", type=int, default=SETTINGS["minibatch_size"])
    parser.add_argument("--temperature", type=float, default=SETTINGS["temperature"])
    parser.add_argument(
        "--trl-precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16: autocast, as ucai's bf16-mixed; fp32: TRL's CPU default",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ppo_learning.json")
    parser.add_argument(
        "--work", type=Path, help="run folder (logs, rollouts); default: a new temporary folder"
    )
    parser.add_argument("--child-spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_spec is None and args.reward_model is None:
        parser.error("--reward-model is required")
    return args


def settings_from(args, seed: int | None = None) -> PPOSettings:
    shared = {k: v for k, v in SETTINGS.items() if k in PPOSettings.__dataclass_fields__}
    return PPOSettings(
        **{
            **shared,
            "batch": args.batch,
            "response_length": args.max_new_tokens,
            "learning_rate": args.lr,
            "kl_coef": args.kl_coef,
            "ppo_epochs": args.ppo_epochs,
            "minibatch_size": min(args.minibatch, args.batch),  # tiny test batches
            "temperature": args.temperature,
            "seed": args.seeds[0] if seed is None else seed,
        }
    )


def main() -> None:
    args = parse_args()
    if args.child_spec is not None:
        trl_child(args.child_spec)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings = settings_from(args)
    rm = args.reward_model
    args.policy = args.policy or default_policy(rm)
    args.prompts = args.prompts or default_prompt_file(rm)
    args.stage_config = args.stage_config or REPO / "configs" / f"ppo_{side_of(rm)}.yaml"
    heldout = args.heldout_fraction
    if heldout is None:
        heldout = pipeline_heldout_fraction(rm)
        heldout = SETTINGS["heldout_fraction"] if heldout is None else heldout
    work = args.work or Path(tempfile.mkdtemp(prefix="ppo-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    mean, std = read_score_stats(rm)
    rows = ordered_train_rows(
        args.prompts, config_principles(args.stage_config), heldout, settings.batch, settings.seed
    )
    print(
        f"PPO learning: {args.iterations} iterations; policy {args.policy}; RM {rm} (score mean {mean:.4f}, "
        f"std {std:.4f} from reward_stats.json); {len(rows)} train prompts of {args.prompts} "
        f"(held-out fraction {heldout}); work {work}",
        flush=True,
    )
    print(f"settings: {settings.describe()}", flush=True)

    normalised = SETTINGS["normalize_score"]
    runs = []  # one {"seed", "ucai", "trl"} per seed; ucai and trl alternate which goes first
    for index, seed in enumerate(args.seeds):
        seed_settings = settings_from(args, seed)
        seed_work = work / f"seed-{seed}" if len(args.seeds) > 1 else work
        seed_work.mkdir(parents=True, exist_ok=True)
        order = ("ucai", "trl") if index % 2 == 0 else ("trl", "ucai")
        curves = {}
        for side in order:
            if side == "ucai":
                curves["ucai"] = run_ucai(args, seed_settings, rows, seed_work)
            else:
                curves["trl"] = run_trl(args, seed_settings, rows, (mean, std), seed_work)
        for name, curve in curves.items():
            curve["score"] = to_raw(curve["score"], normalised, mean, std)
            if len(curve["score"]) != args.iterations:
                raise SystemExit(f"{name} ran {len(curve['score'])} iterations, expected {args.iterations}")
            curve["gain"] = gain(curve["score"], std)
        print(
            f"seed {seed}: mean RM score (raw units, before the missing-eos penalty), KL per sequence, "
            "eos fraction per iteration"
        )
        print_table(curves["ucai"], curves["trl"])
        print(f"seed {seed}: ucai_gain={curves['ucai']['gain']:.3f} trl_gain={curves['trl']['gain']:.3f}", flush=True)
        runs.append({"seed": seed, "ucai": curves["ucai"], "trl": curves["trl"]})
    gains = {side: [run[side]["gain"] for run in runs] for side in ("ucai", "trl")}
    medians = {side: statistics.median(values) for side, values in gains.items()}

    result = {
        "benchmark": "ppo_learning",
        "reward_model": str(rm),
        "policy": args.policy,
        "prompts": args.prompts,
        "heldout_fraction": heldout,
        "train_prompts": len(rows),
        "iterations": args.iterations,
        "settings": {
            **settings.to_json(),
            **{k: SETTINGS[k] for k in ("normalize_score", "precision")},
            "trl_precision": args.trl_precision,
        },
        "score_mean": mean,
        "score_std": std,
        "score_std_source": "reward_stats.json",
        "gain_window": min(GAIN_WINDOW, args.iterations // 2),
        "curves": {
            "score": "mean raw RM score per iteration (before the missing-eos penalty)",
            "kl": "mean per-sequence KL(policy || reference), k1",
            "objective_scores": "mean PPO score (normalised if normalize_score, after the eos penalty)",
        },
        "seeds": args.seeds,
        "gains": gains,
        "median_gain": medians,
        "runs": runs,
        "work": str(work),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"curves written to {args.out}")
    if len(args.seeds) > 1:
        for side in ("ucai", "trl"):
            print(f"{side} gains over seeds {args.seeds}: {', '.join(f'{g:.3f}' for g in gains[side])}")
    print(f"ppo_learning: ucai_gain={medians['ucai']:.3f} trl_gain={medians['trl']:.3f}")


if __name__ == "__main__":
    main()
