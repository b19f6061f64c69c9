"""Generation throughput: ucai's `generate` (decode-loop engine) vs batched HF ``generate``.

    .venv/bin/python benchmarks/generation.py [--model smollm2-135m] [--batch 16] [--new-tokens 128]

The work is the same on every side: the same weights (SmolLM2-135M-Instruct in
bfloat16 by default), the same ``--batch`` red-team prompts rendered with the same chat
template and left-padded into one batch, greedy decoding, and exactly ``--new-tokens``
new tokens per row: no stop token ends a row early, so every side runs the same number
of decoding steps over the same rows (HF's static cache changes the numerics enough
that its greedy answers, and so their lengths, differ from the others' when rows stop
at eos). The script stops if the completion tokens differ by more than 5%, and says
whether the ids are identical (ucai's decode loop is token-identical to HF's default).

Sides, each in its own subprocess (so that peak RSS, ``ru_maxrss``, is its own), each
loading the model, warming up once and timing one run; the sides run ``--repeats``
times in alternating order (A B C A B C ...) and medians are reported:

* ``ucai`` — the engine `ucai.stages.generation.generate` picks by default (``auto``:
  the decode loop for this model), given the tokenised batch;
* ``hf-dynamic`` — ``model.generate`` batched, transformers' default dynamic cache;
* ``hf-static`` — ``model.generate`` batched with ``cache_implementation="static"``,
  the peer's best setting on this CPU (``torch.compile`` on top is slower here and
  takes over a minute to compile; see ../shared/BENCHMARKS.md).

Tokens/s counts the completion tokens over the wall time of the batch (prefill
included). One line per side, then the last line

    generation: speed_ratio=X memory_ratio=Y

(ucai over the faster HF setting: speed higher is better, memory lower is better).
On a machine shared with other jobs pass ``--threads 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

from harness import check_same_work, peak_rss_mb, run_alternating  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ucai", "hf-dynamic", "hf-static")


def _prompts(tokenizer, count: int) -> list[str]:
    from ucai.chat import render_chat
    from ucai.data.prompts import read_prompts

    records = read_prompts(ROOT / "data" / "red_team_prompts.jsonl")
    step = max(1, len(records) // count)  # spread over the file: every principle, varied lengths
    chosen = records[::step][:count]
    return [render_chat(tokenizer, [{"role": "user", "content": r.prompt}], "You are a helpful assistant.") for r in chosen]


def worker(args) -> dict:
    import torch

    from ucai.generation_engine import select_engine
    from ucai.models import load_causal_lm, load_tokenizer
    from ucai.stages.generation import GenerationSettings

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=dtype).eval()
    prompts = _prompts(tokenizer, args.batch)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, do_sample=False)
    model.generation_config.eos_token_id = None  # no stop token: every row runs to the end
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_length = encoded["input_ids"].shape[1]

    if args.worker == "ucai":
        engine = select_engine(settings.engine, model)

        @torch.no_grad()
        def run():
            return engine.generate(
                model, encoded["input_ids"], encoded["attention_mask"], settings, [], tokenizer.pad_token_id
            )

    else:
        extra = {"cache_implementation": "static"} if args.worker == "hf-static" else {}

        @torch.no_grad()
        def run():
            return model.generate(
                **encoded, **settings.to_kwargs(), eos_token_id=[], pad_token_id=tokenizer.pad_token_id, **extra
            )

    run()  # warm-up (and, for the static cache, its allocation)
    start = time.perf_counter()
    sequences = run()
    elapsed = time.perf_counter() - start
    completions = sequences[:, prompt_length:]
    kept = completions.tolist()
    return {
        "engine": engine.name if args.worker == "ucai" else "hf",
        "seconds": elapsed,
        "completion_tokens": int(completions.numel()),
        "steps": int(completions.shape[1]),
        "ids_sha": hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16],
        "peak_rss_mb": peak_rss_mb(),
    }


def run_side(side: str, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", side, "--model", args.model, "--batch", str(args.batch),
        "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--threads", str(args.threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{side} side failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def identical_ids(runs: dict[str, list[dict]]) -> dict[str, bool]:
    """Per side, whether every one of its runs produced exactly ucai's first run's ids."""
    reference = runs["ucai"][0]["ids_sha"]
    return {side: all(r["ids_sha"] == reference for r in results) for side, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, in alternating order")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args)))
        return

    print(
        f"model={args.model} dtype={args.dtype} batch={args.batch} max_new_tokens={args.new_tokens} greedy "
        f"repeats={args.repeats} threads={args.threads or 'default'}",
        flush=True,
    )
    runs = run_alternating(SIDES, args.repeats, lambda side, _: run_side(side, args))
    check_same_work(
        {f"{side} run {i + 1}": r["completion_tokens"] for side, results in runs.items() for i, r in enumerate(results)},
        "completion tokens",
    )
    identical = identical_ids(runs)
    summary = {}
    for side in SIDES:
        rates = [r["completion_tokens"] / r["seconds"] for r in runs[side]]
        summary[side] = {
            "tokens_per_s": statistics.median(rates),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[side]),
        }
        first = runs[side][0]
        print(
            f"{side:10s} {summary[side]['tokens_per_s']:7.1f} tokens/s (runs: {', '.join(f'{x:.1f}' for x in rates)}) "
            f"peak RSS {summary[side]['peak_rss_mb']:6.0f} MB; {first['completion_tokens']} completion tokens "
            f"in {first['steps']} steps" + (f" (engine: {first['engine']})" if side == "ucai" else "")
        )
    print(
        "token-identical to ucai's greedy ids: "
        + ", ".join(f"{side} {'yes' if same else 'no'}" for side, same in identical.items())
    )
    best = max(("hf-dynamic", "hf-static"), key=lambda side: summary[side]["tokens_per_s"])
    speed = summary["ucai"]["tokens_per_s"] / summary[best]["tokens_per_s"]
    memory = summary["ucai"]["peak_rss_mb"] / summary[best]["peak_rss_mb"]
    default = summary["ucai"]["tokens_per_s"] / summary["hf-dynamic"]["tokens_per_s"]
    print(f"ucai vs hf-dynamic (transformers' default cache): speed_ratio={default:.2f}")
    print(f"peer's best: {best}")
    print(f"generation: speed_ratio={speed:.2f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
