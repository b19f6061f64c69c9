"""Generation throughput: ucai's batched generation vs one-prompt-at-a-time ``model.generate``.

    .venv/bin/python benchmarks/generation.py [--model smollm2-135m] [--batch 16] [--new-tokens 32]

Both sides use the same weights (SmolLM2-135M-Instruct, bfloat16 by default: the
baseline's best setting on this CPU, 12 vs 8 tokens/s in float32), the same 16
red-team prompts rendered with the same chat template, greedy decoding and exactly
``--new-tokens`` new tokens per prompt (``min_new_tokens`` = ``max_new_tokens``, so eos
cannot end one side early). ucai runs the stages' `generate` (left-padded batch of 16,
KV cache); the baseline calls ``model.generate`` on one prompt at a time, as a plain
script would. Each side runs in its own subprocess so that peak RSS
(``ru_maxrss``) is its own; each warms up once, then the median of ``--runs`` timed
runs is reported. On a shared, busy machine pass ``--threads 1``: two OpenMP threads
competing with other processes spin-wait and slow both sides by an order of magnitude. The last line is

    generation: speed_ratio=X memory_ratio=Y

(ucai over the baseline: speed higher is better, memory lower is better).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prompts(tokenizer, count: int) -> list[str]:
    from ucai.chat import render_chat
    from ucai.data.prompts import read_prompts

    records = read_prompts(ROOT / "data" / "red_team_prompts.jsonl")
    step = max(1, len(records) // count)  # spread over the file: every principle, varied lengths
    chosen = records[::step][:count]
    return [render_chat(tokenizer, [{"role": "user", "content": r.prompt}], "You are a helpful assistant.") for r in chosen]


def _load(model_name: str, dtype_name: str):
    import torch

    from ucai.models import load_causal_lm, load_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    return load_tokenizer(model_name), load_causal_lm(model_name, dtype=dtype).eval()


def _summary(rates: list[float], cpu_rates: list[float]) -> dict:
    # Wall-clock rate is the headline; tokens per CPU-second is printed beside it because
    # on a machine shared with other jobs the wall clock mostly measures the scheduler.
    return {
        "tokens_per_s": statistics.median(rates),
        "runs": rates,
        "tokens_per_cpu_s": statistics.median(cpu_rates),
    }


def worker_ucai(args) -> dict:
    from ucai.stages.generation import GenerationSettings, generate

    @dataclass(frozen=True)
    class FixedLength(GenerationSettings):
        """Greedy with eos suppressed until ``max_new_tokens``, so both sides emit as many tokens."""

        def to_kwargs(self):
            return {**super().to_kwargs(), "min_new_tokens": self.max_new_tokens}

    tokenizer, model = _load(args.model, args.dtype)
    prompts = _prompts(tokenizer, args.batch)
    settings = FixedLength(max_new_tokens=args.new_tokens, do_sample=False)
    generate(model, tokenizer, prompts, settings)  # warm-up
    rates, cpu_rates = [], []
    for _ in range(args.runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = generate(model, tokenizer, prompts, settings)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        assert result.completion_tokens == len(prompts) * args.new_tokens, result.completion_tokens
        rates.append(result.completion_tokens / elapsed)
        cpu_rates.append(result.completion_tokens / cpu)
    return _summary(rates, cpu_rates)


def worker_baseline(args) -> dict:
    import torch

    tokenizer, model = _load(args.model, args.dtype)
    prompts = _prompts(tokenizer, args.batch)
    kwargs = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )

    @torch.no_grad()
    def one(prompt: str) -> int:
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**encoded, **kwargs)
        return out.shape[1] - encoded["input_ids"].shape[1]

    one(prompts[0])  # warm-up
    rates, cpu_rates = [], []
    for _ in range(args.runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        tokens = sum(one(p) for p in prompts)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        assert tokens == len(prompts) * args.new_tokens, tokens
        rates.append(tokens / elapsed)
        cpu_rates.append(tokens / cpu)
    return _summary(rates, cpu_rates)


def run_side(side: str, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", side, "--model", args.model, "--batch", str(args.batch),
        "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--dtype", args.dtype,
        "--threads", str(args.threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{side} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    parser.add_argument("--worker", choices=["ucai", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        out = worker_ucai(args) if args.worker == "ucai" else worker_baseline(args)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps(out))
        return

    print(
        f"model={args.model} dtype={args.dtype} prompts={args.batch} new_tokens={args.new_tokens} "
        f"runs={args.runs} threads={args.threads or 'default'}"
    )
    results = {side: run_side(side, args) for side in ("ucai", "baseline")}
    for side, label in (("ucai", f"ucai generate, batch {args.batch}"), ("baseline", "model.generate, one at a time")):
        r = results[side]
        runs = ", ".join(f"{x:.1f}" for x in r["runs"])
        print(
            f"{label:34s} {r['tokens_per_s']:8.1f} tokens/s (runs: {runs}; "
            f"{r['tokens_per_cpu_s']:.1f} per CPU-second)  peak RSS {r['peak_rss_mb']:7.0f} MB"
        )
    speed = results["ucai"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    memory = results["ucai"]["peak_rss_mb"] / results["baseline"]["peak_rss_mb"]
    cpu_speed = results["ucai"]["tokens_per_cpu_s"] / results["baseline"]["tokens_per_cpu_s"]
    print(f"tokens per CPU-second ratio: {cpu_speed:.2f}")
    print(f"generation: speed_ratio={speed:.2f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
