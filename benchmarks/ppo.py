"""One PPO iteration: ucai's PPOModule against TRL 1.12's PPOTrainer, like for like.

    python benchmarks/ppo.py                          # ~20 min on 2 CPU cores
    python benchmarks/ppo.py --iterations 1 --repeats 1   # a quick look, not a result

Both sides train the same SmolLM2-135M-Instruct policy with LoRA r=8 (alpha 16) on
q_proj/v_proj, against the same reward model (SmolLM2-135M with a random scalar head,
saved once to a temporary folder), on the same rendered prompts in the same order (TRL's
shuffled loader is replaced by one in order), with rollout batch 8, responses of at most
48 tokens (stop at eos, missing-eos penalty 1), temperature 0.7, one PPO epoch over one
minibatch, KL coefficient 0.05, learning rate 1e-5.

The value function is where the two designs differ:

* TRL trains a separate critic: a full copy of the reward model (135M trainable
  parameters with their own forwards, backward and AdamW state), as in its examples;
* ucai's default (``value_head: adapter``) gives the value function its own LoRA
  adapter on the policy's backbone (its own forward and backward through the model) and
  a head started from the reward model's head, which is the same job as TRL's critic;
  ``value_head: head`` is a scalar head on the policy's hidden state (no second pass,
  but it gains less per nat of KL: `benchmarks/ppo_ablation.py`).

And so is precision: ucai's ``bf16-mixed`` autocasts generation and the reference, value
and reward forwards; TRL 1.12 on CPU runs fp32 at its defaults and gets bf16 autocast
only from ``ACCELERATE_MIXED_PRECISION=bf16``, which covers its training forward.

Configurations, each in its own subprocess (peak RSS = ``ru_maxrss``), ``--repeats``
times in alternating order; each warms up for ``--warmup`` iterations and times
``--iterations``; medians over all timed iterations of a configuration are compared.
The response lengths of both sides are recorded (TRL's through its
``truncate_response``), and the script stops if a configuration's mean response length
differs from ucai's default by more than 5%. Lines:

* ucai ``value_head: head`` vs TRL default: the cheapest critic against TRL as shipped;
* ucai ``value_head: adapter`` under ``32-true`` vs TRL in fp32: no autocast anywhere;
* ucai ``value_head: adapter`` (bf16-mixed, bf16 rollouts) vs TRL with bf16 autocast:
  ucai autocasts its rollouts too, TRL only its update;
* ucai ``value_head: adapter`` with ``rollout_precision: fp32`` (ucai's shipped PPO
  configs: fp32 sampling, rollout forward and scoring, bf16 autocast update) vs TRL with
  bf16 autocast: the same precision scope;
* last, ``ppo: speed_ratio=X memory_ratio=Y``: that fp32-rollout configuration against
  TRL with its critic at TRL's faster precision, the like-for-like comparison.
  ``--configs`` runs a subset (the last line needs that ucai configuration and both TRL
  ones).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ppo_common, when run as a script

from harness import check_same_work, peak_rss_mb, run_alternating  # noqa: E402
from ppo_common import (  # noqa: E402
    DEFAULT_POLICY,
    PPOSettings,
    build_reward_model,
    default_prompts,
    print_result,
    run_child,
    trl_ppo_trainer,
)

POLICY = DEFAULT_POLICY
SETTINGS = PPOSettings(
    batch=8,
    response_length=48,
    ppo_epochs=1,
    minibatch_size=8,
    kl_coef=0.05,
    learning_rate=1e-5,
    temperature=0.7,
    missing_eos_penalty=1.0,
    lora_r=8,
    lora_alpha=16,
    lora_targets=("q_proj", "v_proj"),
)


# name -> (side, ucai value head, ucai precision, ucai rollout precision, extra environment)
CONFIGS = {
    "ucai value head (bf16-mixed)": ("ucai", "head", "bf16-mixed", "trainer", {}),
    "ucai value adapter (bf16-mixed)": ("ucai", "adapter", "bf16-mixed", "trainer", {}),
    "ucai value adapter (fp32 rollouts)": ("ucai", "adapter", "bf16-mixed", "fp32", {}),
    "ucai value adapter (32-true)": ("ucai", "adapter", "32-true", "trainer", {}),
    "trl defaults (fp32)": ("trl", None, None, None, {}),
    "trl bf16 autocast": ("trl", None, None, None, {"ACCELERATE_MIXED_PRECISION": "bf16"}),
}
TRL_CONFIGS = ("trl defaults (fp32)", "trl bf16 autocast")
# The last line: ucai's shipped PPO settings (fp32 rollouts, bf16 autocast update), the
# same precision scope as TRL with ACCELERATE_MIXED_PRECISION=bf16.
LIKE_FOR_LIKE = "ucai value adapter (fp32 rollouts)"


# --------------------------------------------------------------------------- ucai side


def run_ucai(rm: Path, n_iter: int, work: Path, value_head: str, precision: str, rollout_precision: str) -> dict:
    import lightning as L

    from ucai.data.io import write_jsonl
    from ucai.data.prompt_datamodule import PromptDataModule
    from ucai.stages.generation import GenerationSettings
    from ucai.stages.ppo import PPOModule

    path = work / "prompts.jsonl"
    batch = SETTINGS.batch
    write_jsonl(path, [{"id": f"p{i}", "prompt": p} for i, p in enumerate(default_prompts(batch * n_iter))])
    module = PPOModule(
        policy=POLICY,
        reward_model=str(rm),
        lora=SETTINGS.lora_settings(),
        value_head=value_head,
        rollout_precision=rollout_precision,
        frozen_linear_bf16=rollout_precision == "trainer",  # fp32 rollouts need fp32 frozen weights
        ppo_epochs=SETTINGS.ppo_epochs,
        minibatch_size=SETTINGS.minibatch_size,
        kl_coef=SETTINGS.kl_coef,
        learning_rate=SETTINGS.learning_rate,
        missing_eos_penalty=SETTINGS.missing_eos_penalty,
        generation=GenerationSettings(
            max_new_tokens=SETTINGS.response_length, temperature=SETTINGS.temperature, top_p=1.0, top_k=0
        ),
        system_prompt=SETTINGS.system_prompt,
        output_dir=str(work / "rl_model"),
        export=False,
    )
    times: list[float] = []
    lengths: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            lengths.append(pl_module.last_stats["response/length"])

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=n_iter * SETTINGS.updates_per_iteration,  # Lightning counts optimiser steps
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
        callbacks=[Timer()],
    )
    data = PromptDataModule(path=str(path), batch_size=batch, shuffle=False, heldout_fraction=0.0)
    trainer.fit(module, datamodule=data)
    return {"iteration_s": times, "response_length": lengths}


# --------------------------------------------------------------------------- TRL side


def run_trl(rm: Path, n_iter: int, work: Path) -> dict:
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from transformers import TrainerCallback

    times: list[float] = []
    lengths: list[float] = []
    truncate = trl_ppo.truncate_response

    def recording_truncate(stop_token_id, pad_token_id, responses):
        """TRL's own truncation, recording each batch's mean response length (eos included)."""
        truncated = truncate(stop_token_id, pad_token_id, responses)
        lengths.append(float(trl_ppo.first_true_indices(truncated == pad_token_id).float().mean()))
        return truncated

    trl_ppo.truncate_response = recording_truncate

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    prompts = default_prompts(SETTINGS.batch * n_iter)
    trainer = trl_ppo_trainer(POLICY, rm, prompts, SETTINGS, n_iter, work, callbacks=(Timer(),), in_order=True)
    trainer.train()
    return {"iteration_s": times, "response_length": lengths}


# --------------------------------------------------------------------------- driver


def child(args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    side, value_head, precision, rollout_precision, _ = CONFIGS[args.child]
    work = Path(tempfile.mkdtemp(prefix=f"ppo-bench-{side}-"))
    n_iter = args.warmup + args.iterations
    if side == "ucai":
        result = run_ucai(Path(args.rm), n_iter, work, value_head, precision, rollout_precision)
    else:
        result = run_trl(Path(args.rm), n_iter, work)
    if len(result["iteration_s"]) != n_iter or len(result["response_length"]) != n_iter:
        raise SystemExit(f"{args.child}: timed {len(result['iteration_s'])} iterations, expected {n_iter}")
    result = {key: values[args.warmup :] for key, values in result.items()}
    result["peak_rss_mb"] = peak_rss_mb()
    print_result(result)


def spawn(name: str, repeat: int, rm: Path, args) -> dict:
    command = [
        sys.executable, __file__, "--child", name, "--rm", str(rm),
        "--iterations", str(args.iterations), "--warmup", str(args.warmup),
    ]
    result = run_child(name, command, CONFIGS[name][4])
    print(
        f"[{repeat + 1}/{args.repeats}] {name:34s} {SETTINGS.batch / statistics.median(result['iteration_s']):6.3f} "
        f"episodes/s (s/iteration: {', '.join(f'{t:.2f}' for t in result['iteration_s'])})  peak RSS "
        f"{result['peak_rss_mb']:6.0f} MB  mean response {statistics.mean(result['response_length']):.1f} tokens",
        flush=True,
    )
    return result


def summarise(trials: list[dict]) -> dict:
    """Median episodes/s over every timed iteration of every run, median peak RSS and
    the mean response length."""
    seconds = [t for trial in trials for t in trial["iteration_s"]]
    return {
        "episodes_per_s": SETTINGS.batch / statistics.median(seconds),
        "peak_rss_mb": statistics.median(trial["peak_rss_mb"] for trial in trials),
        "response_length": statistics.mean(x for trial in trials for x in trial["response_length"]),
    }


def ratios(a: dict, b: dict) -> str:
    return (
        f"speed_ratio={a['episodes_per_s'] / b['episodes_per_s']:.2f} "
        f"memory_ratio={a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, in alternating order")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=list(CONFIGS),
        default=list(CONFIGS),
        help="configurations to run (default all; the last line needs its ucai one and both TRL ones)",
    )
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="ppo-bench-rm-") as tmp:
        rm = Path(tmp) / "rm_model"
        rm.mkdir()
        build_reward_model(rm)
        print(f"PPO iteration: {POLICY}, {SETTINGS.describe()}, prompts in the same order on both sides", flush=True)
        trials = run_alternating(args.configs, args.repeats, lambda name, r: spawn(name, r, rm, args))
    summary = {name: summarise(runs) for name, runs in trials.items()}
    check_same_work({name: s["response_length"] for name, s in summary.items()}, "tokens of mean response length")
    for name, s in summary.items():
        print(
            f"{name:34s} median {s['episodes_per_s']:6.3f} episodes/s  peak RSS {s['peak_rss_mb']:6.0f} MB  "
            f"mean response {s['response_length']:.1f} tokens"
        )
    lines = [
        ("ucai value head (bf16-mixed)", "trl defaults (fp32)", "ucai value_head: head vs TRL defaults (critic, fp32), different designs"),
        ("ucai value adapter (32-true)", "trl defaults (fp32)", "ucai value adapter 32-true vs TRL fp32, no autocast on either side"),
        ("ucai value adapter (bf16-mixed)", "trl bf16 autocast",
         "ucai value adapter with bf16 rollouts vs TRL bf16 autocast (ucai autocasts its rollouts too, TRL does not)"),
        (LIKE_FOR_LIKE, "trl bf16 autocast", "ucai value adapter with fp32 rollouts vs TRL bf16 autocast, the same scope"),
    ]
    for mine, theirs, text in lines:
        if mine in summary and theirs in summary:
            print(f"{text}: {ratios(summary[mine], summary[theirs])}")
    if LIKE_FOR_LIKE not in summary or not all(name in summary for name in TRL_CONFIGS):
        print(f"no ppo: line: it needs {LIKE_FOR_LIKE!r} and both TRL configurations")
        return
    best_name = max(TRL_CONFIGS, key=lambda n: summary[n]["episodes_per_s"])
    print(f"peer's best: {best_name}")
    print(f"ppo: {ratios(summary[LIKE_FOR_LIKE], summary[best_name])}")


if __name__ == "__main__":
    main()
