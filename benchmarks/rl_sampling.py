"""RL rollout sampling: ucai's bf16 sampling copy against batched HF ``generate``.

    .venv/bin/python benchmarks/rl_sampling.py [--policy smollm2-135m] [--prompts 8] [--repeats 3]

The work is what `make experiment`'s RLOO stage samples at each iteration
(configs/pipeline/experiment_cpu.yaml): 2 train-split prompts x 4 episodes = 8 rows a
call, rendered with the stage's system prompt, sampled at temperature 0.7 (top-p 1)
from the policy — the SL model (``--policy``) in fp32 with a LoRA adapter (r 8,
alpha 16, q/k/v/o; its B matrices drawn at random with a fixed seed, as after some
training, so that merging it changes the weights). Every row runs exactly
``--new-tokens`` (48): no stop token ends a row, so every side does the same work
whatever it samples (checked: completion tokens within 5%). ``--prompts`` prompts,
``--prompts / 2`` calls.

Sides, each in its own subprocess (peak RSS its own), alternating A B C ... C B A:

* ``ucai`` — ``sampling_precision: bf16``: `ucai.sampling_copy.SamplingCopy` (a bf16
  copy of the model with the adapter merged), refreshed before every call as the stage
  does (timed), sampled by `ucai.stages.generation.generate` (the fast engine);
* ``ucai-policy`` — ``sampling_precision: rollout``, the stage's default: the same
  engine on the fp32 LoRA policy (printed for reference);
* ``hf-policy`` — ``model.generate`` on the fp32 LoRA policy, as TRL's PPO/RLOO
  rollouts sample (the peer at its defaults);
* ``hf-merged`` / ``hf-merged-static`` — ``model.generate`` on the same refreshed bf16
  merged copy (the peer given the same option), transformers' dynamic cache or
  ``cache_implementation="static"``.

The peer's best is the fastest ``hf-*`` side. Each side builds its model (and copy),
warms up on one call, then times every call. Last line:

    rl_sampling: speed_ratio=X memory_ratio=Y

(ucai over the peer's best; speed higher is better, memory lower is better).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

from harness import (  # noqa: E402
    calls_line,
    check_same_work_of,
    ratios_against_best,
    run_alternating,
    run_worker,
    set_threads,
    time_calls,
    token_rates,
)

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ucai", "ucai-policy", "hf-policy", "hf-merged", "hf-merged-static")
PEERS = ("hf-policy", "hf-merged", "hf-merged-static")
EPISODES_PER_PROMPT = 4  # the experiment's rloo_k
PROMPTS_PER_CALL = 2  # its RLOO batch
SYSTEM_PROMPT = "You are a helpful assistant."
ADAPTER = "policy"


def workload(tokenizer, count: int) -> list[tuple[list[str], list[str]]]:
    """The stage's generate calls: [(rendered rows, their seed keys)]."""
    from ucai.chat import render_chat
    from ucai.data.prompt_datamodule import is_heldout
    from ucai.data.prompts import read_prompts

    records = [r for r in read_prompts(ROOT / "data" / "red_team_prompts.jsonl") if not is_heldout(r.id, 0.22)]
    step = max(1, len(records) // count)
    records = records[::step][:count]
    calls = []
    for start in range(0, len(records), PROMPTS_PER_CALL):
        batch = records[start : start + PROMPTS_PER_CALL]
        rendered = [
            render_chat(tokenizer, [{"role": "user", "content": r.prompt}], SYSTEM_PROMPT)
            for r in batch
            for _ in range(EPISODES_PER_PROMPT)
        ]
        keys = [f"{r.id}/{k}" for r in batch for k in range(EPISODES_PER_PROMPT)]
        calls.append((rendered, keys))
    return calls


def lora_policy(name: str):
    import torch
    from peft import get_peft_model

    from ucai.models import LoraSettings, load_causal_lm

    base = load_causal_lm(name, dtype=torch.float32)
    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    policy = get_peft_model(base, lora.to_peft("CAUSAL_LM"), adapter_name=ADAPTER).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in policy.named_parameters():
            if "lora_B" in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return policy


def worker(args) -> dict:
    import torch

    from ucai.models import load_tokenizer
    from ucai.next_token import row_seed
    from ucai.padding import tokenizer_sides
    from ucai.sampling_copy import SamplingCopy
    from ucai.stages.generation import GenerationSettings, generate

    tokenizer = load_tokenizer(args.policy)
    policy = lora_policy(args.policy)
    policy.generation_config.eos_token_id = None  # no stop token: every row runs to the end
    settings = GenerationSettings(max_new_tokens=args.new_tokens, do_sample=True, temperature=0.7, top_p=1.0)
    calls = workload(tokenizer, args.prompts)
    copy = SamplingCopy(policy, ADAPTER, torch.bfloat16) if args.worker in ("ucai", "hf-merged", "hf-merged-static") else None
    if copy is not None:
        copy.model.generation_config.eos_token_id = None

    def model_for_call():
        if copy is None:
            return policy
        copy.refresh()  # before every rollout, as the stage does
        return copy.model

    if args.worker.startswith("ucai"):
        def run_call(rendered, keys) -> int:
            seeds = [row_seed(0, key) for key in keys]
            result = generate(model_for_call(), tokenizer, rendered, settings, seeds=seeds, stop_ids=[])
            return int(result.sequences.shape[0] * (result.sequences.shape[1] - result.prompt_length))

    else:
        extra = {"cache_implementation": "static"} if args.worker == "hf-merged-static" else {}

        def run_call(rendered, keys) -> int:
            model = model_for_call()
            torch.manual_seed(0)
            with tokenizer_sides(tokenizer, "left", "left"):
                encoded = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **encoded, **settings.to_kwargs(), eos_token_id=[], pad_token_id=tokenizer.pad_token_id, **extra
            )
            return int(out.shape[0] * (out.shape[1] - encoded["input_ids"].shape[1]))

    with torch.no_grad():
        return time_calls(calls, run_call)  # one warm-up call, then every call timed


def run_side(side: str, args) -> dict:
    options = ["--policy", args.policy, "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads)]
    return run_worker(__file__, side, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="smollm2-135m", help="the SL model (a folder, alias or hub id)")
    parser.add_argument("--prompts", type=int, default=8, help="train-split prompts, 2 a call, 4 episodes each")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, in alternating order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (the experiment's RLOO: 1)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        set_threads(args.threads)
        print(json.dumps(worker(args)))
        return

    print(
        f"policy={args.policy} fp32 + LoRA r=8 q/k/v/o prompts={args.prompts} x{EPISODES_PER_PROMPT} episodes, "
        f"{PROMPTS_PER_CALL * EPISODES_PER_PROMPT} rows a call, max_new_tokens={args.new_tokens} sampling "
        f"repeats={args.repeats} threads={args.threads or 'default'}",
        flush=True,
    )
    runs = run_alternating(SIDES, args.repeats, lambda side, _: run_side(side, args))
    check_same_work_of(runs, "completion_tokens", "completion tokens")
    summary = token_rates(runs)
    for side in SIDES:
        print(calls_line(side, summary, runs[side][0], width=16))
    _, default_speed, _ = ratios_against_best(summary, "ucai-policy", PEERS)
    print(f"ucai sampling from the policy (sampling_precision: rollout) vs peer's best: speed_ratio={default_speed:.2f}")
    best, speed, memory = ratios_against_best(summary, "ucai", PEERS)
    print(f"peer's best: {best}")
    print(f"rl_sampling: speed_ratio={speed:.2f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
