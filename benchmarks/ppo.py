"""One PPO iteration: ucai's PPOModule against TRL 1.12's PPOTrainer, as ratios.

    nice python benchmarks/ppo.py                 # ~10-20 min on 2 CPU cores
    nice python benchmarks/ppo.py --iterations 2  # quicker, noisier

Both sides train the same SmolLM2-135M-Instruct policy with LoRA r=8 (alpha 16) on
q_proj/v_proj, against the same reward model (SmolLM2-135M with a random scalar head,
saved once to a temporary folder), on the same rendered prompts, with rollout batch 8,
responses of at most 48 tokens (stop at eos, missing-eos penalty 1), temperature 0.7,
one PPO epoch over one minibatch, KL coefficient 0.05, learning rate 1e-5.

* ucai: `PPOModule` under a Lightning Trainer, ``bf16-mixed`` (bf16 autocast); the
  reference is the policy with its adapter disabled and the value function is a head
  on the policy's hidden state.
* TRL: ``trl.experimental.ppo.PPOTrainer`` with ``ref_model=None`` (peft: adapter
  disabled) and the value model loaded from the reward-model folder (a full trainable
  copy, as in TRL's examples). Run at its defaults on CPU (fp32) and with bf16
  autocast (``ACCELERATE_MIXED_PRECISION=bf16``, the only way TRL 1.12 gets bf16 with
  transformers 5); the headline ratio is against the faster of the two.

Each configuration runs in its own subprocess (peak RSS = ``ru_maxrss`` of that
process), warms up for one iteration, then times ``--iterations`` iterations; the
median is reported. The last line is ``ppo: speed_ratio=X memory_ratio=Y`` (ucai over
TRL's best; memory lower is better).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ppo_common, when run as a script

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


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


# --------------------------------------------------------------------------- ucai side


def run_ucai(rm: Path, n_iter: int, work: Path) -> dict:
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
        precision="bf16-mixed",
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
    from transformers import TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    prompts = default_prompts(SETTINGS.batch * n_iter)
    trainer = trl_ppo_trainer(POLICY, rm, prompts, SETTINGS, n_iter, work, callbacks=(Timer(),))
    trainer.train()
    return {"iteration_s": times}


# --------------------------------------------------------------------------- driver


def child(args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix=f"ppo-bench-{args.child}-"))
    runner = run_ucai if args.child == "ucai" else run_trl
    result = runner(Path(args.rm), args.warmup + args.iterations, work)
    result["peak_rss_gb"] = peak_rss_gb()
    print_result(result)


def spawn(name: str, side: str, rm: Path, args, env_extra: dict | None = None) -> dict:
    command = [
        sys.executable, __file__, "--child", side, "--rm", str(rm),
        "--iterations", str(args.iterations), "--warmup", str(args.warmup),
    ]
    result = run_child(name, command, env_extra)
    measured = result["iteration_s"][args.warmup :]
    result["median_s"] = statistics.median(measured)
    result["episodes_per_s"] = SETTINGS.batch / result["median_s"]
    extra = ""
    if "response_length" in result:
        extra = f"  mean response {statistics.mean(result['response_length'][args.warmup:]):.1f} tokens"
    print(
        f"{name:<22} {result['episodes_per_s']:6.3f} episodes/s  (median {result['median_s']:.2f} s/iteration "
        f"over {len(measured)}: {', '.join(f'{t:.2f}' for t in measured)})  peak RSS {result['peak_rss_gb']:.2f} GB{extra}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument(
        "--trl-modes", default="fp32,bf16", help="TRL settings to run: fp32 (its CPU default), bf16 (autocast)"
    )
    parser.add_argument("--child", choices=["ucai", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--rm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="ppo-bench-rm-") as tmp:
        rm = Path(tmp) / "rm_model"
        rm.mkdir()
        build_reward_model(rm)
        print(f"PPO iteration: {POLICY}, {SETTINGS.describe()}", flush=True)
        ucai = spawn("ucai (bf16-mixed)", "ucai", rm, args)
        peers = []
        modes = args.trl_modes.split(",")
        if "fp32" in modes:
            peers.append(spawn("trl 1.12 (defaults, fp32)", "trl", rm, args))
        if "bf16" in modes:
            peers.append(spawn("trl 1.12 (bf16 autocast)", "trl", rm, args, {"ACCELERATE_MIXED_PRECISION": "bf16"}))
    best = max(peers, key=lambda r: r["episodes_per_s"])
    speed = ucai["episodes_per_s"] / best["episodes_per_s"]
    memory = ucai["peak_rss_gb"] / best["peak_rss_gb"]
    print(f"ppo: speed_ratio={speed:.2f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
