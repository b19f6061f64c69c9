"""The preferences stage's generation: ucai vs batched HF ``generate`` on its real workload.

    .venv/bin/python benchmarks/stage_generation.py [--prompts 48] [--repeats 3] [--threads 0]

The work is what `make experiment`'s preferences stage generates (configs/pipeline/
experiment_cpu.yaml): for each shipped, tagged prompt of the train split and for both
sides, the RLCD pair — one row under the side's principle and one under its opposite,
each rendered with that principle's system prompt (`principle_system_prompt`) and its
forced opener — in batches of 24 prompts (48 rows), sampling at temperature 0.7, top-p
0.95, repetition penalty 1.1, SmolLM2-135M-Instruct in bfloat16. Every row runs exactly
``--new-tokens`` (48) tokens: no stop token ends a row, so both sides do the same work
whatever they sample (checked: completion tokens within 5%).

Sides, each in its own subprocess (peak RSS its own), alternating A B C C B A ...:

* ``ucai`` — `ucai.stages.generation.generate` with the default engine (``auto``: the
  fast decode engine, which prefills each batch's shared system prompts once), rows
  seeded per prompt, batches bucketed by principle and length as the stage's data
  module orders them (`ucai.data.prompt_datamodule.bucketed`);
* ``hf-dynamic`` / ``hf-static`` — ``model.generate`` on the same batches (the same
  bucketing: sorting prompts is open to any user), transformers' dynamic cache or
  ``cache_implementation="static"``; the faster is the peer's best.

Each side loads the model, warms up on one batch, then times the whole workload.
Last line:

    stage_generation: speed_ratio=X memory_ratio=Y

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
SIDES = ("ucai", "hf-dynamic", "hf-static")
BATCH_PROMPTS = 24  # the experiment's preferences batch (48 rows: each prompt's pair)
SYSTEM_PROMPT = "You are a helpful assistant."


def workload(tokenizer, count: int) -> list[tuple[list[str], list[str]]]:
    """The stage's generate calls: [(B rendered rows, their seed keys)], both sides."""
    from ucai.chat import render_chat
    from ucai.constitution import load_constitution, opener_of
    from ucai.data.prompt_datamodule import bucketed, is_heldout
    from ucai.data.prompts import read_prompts
    from ucai.stages.preferences import draw_principle, principle_system_prompt

    constitution = load_constitution()  # the shipped default, as the experiment uses
    records = [
        r for r in read_prompts(ROOT / "data" / "red_team_prompts.jsonl")
        if not is_heldout(r.id, 0.22) and r.principle in constitution.pair_ids
    ]
    step = max(1, len(records) // count)
    rows = bucketed([r.to_row() for r in records[::step][:count]])
    calls = []
    for side in ("ethical", "unethical"):
        for start in range(0, len(rows), BATCH_PROMPTS):
            batch = rows[start : start + BATCH_PROMPTS]
            principles = [draw_principle(constitution, side, str(r["id"]), 0, r["principle"]) for r in batch]
            sides = principles + [constitution.opposite(p) for p in principles]
            rendered = [
                render_chat(tokenizer, [{"role": "user", "content": r["prompt"]}], principle_system_prompt(SYSTEM_PROMPT, p))
                + opener_of(p)
                for r, p in zip(batch + batch, sides, strict=True)
            ]
            keys = [f"{side}/{r['id']}/1" for r in batch] + [f"{side}/{r['id']}/2" for r in batch]
            calls.append((rendered, keys))
    return calls


def worker(args) -> dict:
    import torch

    from ucai.models import load_causal_lm, load_tokenizer
    from ucai.next_token import row_seed
    from ucai.padding import tokenizer_sides
    from ucai.stages.generation import GenerationSettings, generate

    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # no stop token: every row runs to the end
    settings = GenerationSettings(
        max_new_tokens=args.new_tokens, do_sample=True, temperature=0.7, top_p=0.95, repetition_penalty=1.1
    )
    calls = workload(tokenizer, args.prompts)

    if args.worker == "ucai":
        def run_call(rendered, keys) -> int:
            seeds = [row_seed(0, key) for key in keys]
            result = generate(model, tokenizer, rendered, settings, seeds=seeds, stop_ids=[])
            return int(result.sequences.shape[0] * (result.sequences.shape[1] - result.prompt_length))

    else:
        extra = {"cache_implementation": "static"} if args.worker == "hf-static" else {}

        def run_call(rendered, keys) -> int:
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
    options = ["--model", args.model, "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
               "--threads", str(args.threads)]
    return run_worker(__file__, side, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=48, help="train-split tagged prompts (261 is the whole stage)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, in alternating order")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        set_threads(args.threads)
        print(json.dumps(worker(args)))
        return

    print(
        f"model={args.model} bfloat16 prompts={args.prompts} (x2 sides x2 rows) batch={BATCH_PROMPTS} prompts "
        f"max_new_tokens={args.new_tokens} sampling repeats={args.repeats} threads={args.threads or 'default'}",
        flush=True,
    )
    runs = run_alternating(SIDES, args.repeats, lambda side, _: run_side(side, args))
    check_same_work_of(runs, "completion_tokens", "completion tokens")
    summary = token_rates(runs)
    for side in SIDES:
        print(calls_line(side, summary, runs[side][0], width=10))
    best, speed, memory = ratios_against_best(summary, "ucai", ("hf-dynamic", "hf-static"))
    print(f"peer's best: {best}")
    print(f"stage_generation: speed_ratio={speed:.2f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
