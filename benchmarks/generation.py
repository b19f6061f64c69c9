"""Generation throughput: ucai's `generate` (fast decode engine) vs batched HF ``generate``,
and the decode step against the machine's floor.

    .venv/bin/python benchmarks/generation.py [--model smollm2-135m] [--batch 16] [--new-tokens 128]

The work is the same on every side: the same weights (SmolLM2-135M-Instruct in
bfloat16 by default), the same ``--batch`` red-team prompts rendered with the same chat
template and left-padded into one batch, greedy decoding, and exactly ``--new-tokens``
new tokens per row: no stop token ends a row early, so every side runs the same number
of decoding steps over the same rows (HF's static cache changes the numerics enough
that its greedy answers, and so their lengths, differ from the others' when rows stop
at eos). The script stops if the completion tokens differ by more than 5%, and says
whether the ids are identical (the ``decode_loop`` engine is token-identical to HF's
default; the default ``fast`` engine is faithful instead, see below).

Sides, each in its own subprocess (so that peak RSS, ``ru_maxrss``, is its own), each
loading the model, warming up once and timing one run; the sides run ``--repeats``
times in alternating order (A B C A B C ...) and medians are reported:

* ``ucai`` — the engine `ucai.stages.generation.generate` picks by default (``auto``:
  the fast decode engine for this model), given the tokenised batch;
* ``ucai-pytorch-ops`` — the same engine with ``UCAI_NATIVE_KERNELS=0``: its layers'
  work between the matmuls as PyTorch ops instead of the fused C++ kernels
  (`ucai.native_decode`), on its own lines, to show what the kernels buy;
* ``hf-dynamic`` — ``model.generate`` batched, transformers' default dynamic cache;
* ``hf-static`` — ``model.generate`` batched with ``cache_implementation="static"``,
  the peer's best setting on this CPU (``torch.compile`` on top is slower here and
  takes over a minute to compile; see ../shared/BENCHMARKS.md).

Tokens/s counts the completion tokens over the wall time of the batch (prefill
included). ucai's decode step (the batch's time less a one-token run's, over the
remaining steps) is compared with the floor this script measures in the same run,
in its own subprocess at the same thread count: the larger of the weight bytes a step
reads over the machine's streaming-read bandwidth (the best of several full reads of a
1 GiB buffer) and the step's FLOPs (every matmul at this batch, attention at the mean
cache length) over the peak matmul rate in the benchmark's dtype (square matmuls):
``floor_ratio = step time / floor``. Fidelity (`ucai.generation_fidelity`): mean and
max |Δ log-prob| against the model's forward, for ucai's engine and for HF ``generate``.

One line per side, then the last line

    generation: speed_ratio=X memory_ratio=Y

(ucai over the faster HF setting: speed higher is better, memory lower is better).
On a machine shared with other jobs pass ``--threads 1``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

from harness import (  # noqa: E402
    check_same_work_of,
    peak_rss_mb,
    ratios_against_best,
    run_alternating,
    run_worker,
    set_threads,
    token_rates,
)

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ucai", "ucai-pytorch-ops", "hf-dynamic", "hf-static")
# ucai's sides -> the environment their worker runs with
UCAI_SIDES = {"ucai": {}, "ucai-pytorch-ops": {"UCAI_NATIVE_KERNELS": "0"}}
WORKERS = (*SIDES, "floor", "fidelity")


def _prompts(tokenizer, count: int) -> list[str]:
    from ucai.chat import render_chat
    from ucai.data.prompts import read_prompts

    records = read_prompts(ROOT / "data" / "red_team_prompts.jsonl")
    step = max(1, len(records) // count)  # spread over the file: every principle, varied lengths
    chosen = records[::step][:count]
    return [render_chat(tokenizer, [{"role": "user", "content": r.prompt}], "You are a helpful assistant.") for r in chosen]


def worker(args) -> dict:
    import torch

    from ucai import generation_engine
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

    if args.worker in UCAI_SIDES:
        engine = select_engine(settings.engine, model)

        @torch.no_grad()
        def run(run_settings=settings):
            return engine.generate(
                model, encoded["input_ids"], encoded["attention_mask"], run_settings, [], tokenizer.pad_token_id
            )

    else:
        extra = {"cache_implementation": "static"} if args.worker == "hf-static" else {}

        @torch.no_grad()
        def run():
            return model.generate(
                **encoded, **settings.to_kwargs(), eos_token_id=[], pad_token_id=tokenizer.pad_token_id, **extra
            )

    # Warm-up (and, for the static cache, its allocation), counting the decode steps
    # that ran the native kernels: they apply only in bf16 on a CPU with native bf16.
    native_steps = []
    layers_call = generation_engine.NativeLayers.__call__
    generation_engine.NativeLayers.__call__ = lambda self, *a, **k: native_steps.append(1) or layers_call(self, *a, **k)
    try:
        run()
    finally:
        generation_engine.NativeLayers.__call__ = layers_call
    start = time.perf_counter()
    sequences = run()
    elapsed = time.perf_counter() - start
    completions = sequences[:, prompt_length:]
    kept = completions.tolist()
    step_seconds = None
    if args.worker in UCAI_SIDES and args.new_tokens > 1:
        # The prefill and first token alone: the rest of the batch's time is decode steps.
        start = time.perf_counter()
        run(GenerationSettings(max_new_tokens=1, do_sample=False))
        step_seconds = (elapsed - (time.perf_counter() - start)) / (args.new_tokens - 1)
    return {
        "step_seconds": step_seconds,
        "engine": engine.name if args.worker in UCAI_SIDES else "hf",
        "native_kernels": bool(native_steps) if args.worker in UCAI_SIDES else None,
        "seconds": elapsed,
        "completion_tokens": int(completions.numel()),
        "steps": int(completions.shape[1]),
        "prompt_tokens": int(prompt_length),
        "ids_sha": hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16],
        "peak_rss_mb": peak_rss_mb(),
    }


def floor_worker(args) -> dict:
    """The machine's limits at this thread count and the model's per-step work."""
    import torch

    from ucai.models import load_causal_lm

    def best_seconds(fn, repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def read_bandwidths() -> dict[str, float]:
        """Bytes/s of full reads of a 1 GiB buffer (far beyond every cache), by method."""
        buffer = torch.ones(512 * 1024 * 1024, dtype=torch.bfloat16)
        one_row = torch.ones(1, 4096, dtype=torch.bfloat16)
        reads = {
            "sum fp32 view": lambda: buffer.view(torch.float32).sum(),
            "max int16 view": lambda: buffer.view(torch.int16).max(),
            "sum int64 view": lambda: buffer.view(torch.int64).sum(),
            # What a matmul kernel streams: one row times the buffer as a weight matrix.
            "bf16 gemv": lambda: torch.nn.functional.linear(one_row, buffer.view(-1, 4096)),
        }
        return {name: buffer.numel() * 2 / best_seconds(fn, 5) for name, fn in reads.items()}

    bandwidths = read_bandwidths()
    dtype = getattr(torch, args.dtype)
    peaks = {}
    # Square matmuls from 512 up, as ``@`` and as ``F.linear`` (the model's call; on a
    # CPU without native bf16 the two take different paths: ``@`` a reference loop at
    # ~1 GFLOP/s, ``F.linear`` oneDNN at ~20), stopping at 4096 or once a call takes
    # over a second, where the rate has long settled.
    n = 512
    while n <= 4096:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = min(
            best_seconds(lambda a=a, b=b: a @ b, 3),
            best_seconds(lambda a=a, b=b: torch.nn.functional.linear(a, b), 3),
        )
        peaks[n] = 2 * n**3 / seconds
        if seconds > 1.0:
            break
        n *= 2

    model = load_causal_lm(args.model, dtype=dtype)
    config = model.config
    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    embedding = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings().weight
    # A step reads every weight once, except the input embedding (B rows of it), which
    # the output projection reads whole when the two are tied.
    weight_bytes = sum(p.numel() * p.element_size() for p in unique if p is not embedding or p is lm_head)
    matmul_params = sum(p.numel() for p in unique if p.dim() == 2 and p is not embedding) + (
        lm_head.numel() if lm_head is embedding else 0
    )
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    context = args.prompt_tokens + args.new_tokens / 2  # mean cache length over the steps
    flops = 2 * args.batch * matmul_params + 4 * args.batch * config.num_hidden_layers * heads * dim * context
    bandwidth, peak = max(bandwidths.values()), max(peaks.values())
    return {
        "bandwidth": bandwidth,
        "bandwidth_by": max(bandwidths, key=bandwidths.get),
        "peak_flops": peak,
        "weight_bytes": weight_bytes,
        "step_flops": flops,
        "floor_seconds": max(weight_bytes / bandwidth, flops / peak),
        "bound": "memory" if weight_bytes / bandwidth >= flops / peak else "compute",
    }


def fidelity_worker(args) -> dict:
    """Mean / max |Δ log-prob| against the model's forward: ucai's default engine and HF."""
    import torch

    from ucai.generation_engine import HFGenerate, select_engine
    from ucai.generation_fidelity import measure_engines
    from ucai.models import load_causal_lm, load_tokenizer
    from ucai.stages.generation import GenerationSettings

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=dtype).eval()
    tokenizer.padding_side = "left"
    encoded = tokenizer(_prompts(tokenizer, args.batch), return_tensors="pt", padding=True, add_special_tokens=False)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, do_sample=False)
    engines = {"ucai": select_engine("auto", model), "hf": HFGenerate()}
    results = measure_engines(
        list(engines.values()), model, encoded["input_ids"], encoded["attention_mask"], settings, [], tokenizer.pad_token_id
    )
    return {
        name: {"mean": result.mean_abs, "max": result.max_abs, "tokens": result.tokens, "engine": engine.name}
        for (name, engine), result in zip(engines.items(), results, strict=True)
    }


def run_side(side: str, args) -> dict:
    options = [
        "--model", args.model, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
        "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
    ]
    return run_worker(__file__, side, options, env={**os.environ, **UCAI_SIDES.get(side, {})})


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
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        set_threads(args.threads)
        work = {"floor": floor_worker, "fidelity": fidelity_worker}.get(args.worker, worker)
        print(json.dumps(work(args)))
        return

    print(
        f"model={args.model} dtype={args.dtype} batch={args.batch} max_new_tokens={args.new_tokens} greedy "
        f"repeats={args.repeats} threads={args.threads or 'default'}",
        flush=True,
    )
    runs = run_alternating(SIDES, args.repeats, lambda side, _: run_side(side, args))
    check_same_work_of(runs, "completion_tokens", "completion tokens")
    identical = identical_ids(runs)
    args.prompt_tokens = runs["ucai"][0]["prompt_tokens"]
    floor = run_side("floor", args)
    fidelity = run_side("fidelity", args)
    summary = token_rates(runs)
    for side in SIDES:
        first = runs[side][0]
        print(
            f"{side:16s} {summary[side]['tokens_per_s']:7.1f} tokens/s "
            f"(runs: {', '.join(f'{x:.1f}' for x in summary[side]['rates'])}) "
            f"peak RSS {summary[side]['peak_rss_mb']:6.0f} MB; {first['completion_tokens']} completion tokens "
            f"in {first['steps']} steps"
            + (
                f" (engine: {first['engine']}, native kernels {'on' if first['native_kernels'] else 'off'})"
                if side in UCAI_SIDES
                else ""
            )
        )
    print(
        "token-identical to ucai's greedy ids: "
        + ", ".join(f"{side} {'yes' if same else 'no'}" for side, same in identical.items())
    )
    for name, measured in fidelity.items():
        print(
            f"fidelity {name} ({measured['engine']}): mean |Δ logprob| {measured['mean']:.2e}, "
            f"max {measured['max']:.2e} over {measured['tokens']} tokens"
        )
    step = statistics.median(r["step_seconds"] for r in runs["ucai"])
    ops_step = statistics.median(r["step_seconds"] for r in runs["ucai-pytorch-ops"])
    print(
        f"floor: {floor['weight_bytes'] / 1e6:.0f} MB of weights / {floor['bandwidth'] / 1e9:.1f} GB/s read "
        f"({floor['bandwidth_by']}) = {floor['weight_bytes'] / floor['bandwidth'] * 1e3:.2f} ms; "
        f"{floor['step_flops'] / 1e9:.2f} GFLOP / {floor['peak_flops'] / 1e12:.2f} TFLOP/s {args.dtype} matmul = "
        f"{floor['step_flops'] / floor['peak_flops'] * 1e3:.2f} ms; floor {floor['floor_seconds'] * 1e3:.2f} ms "
        f"({floor['bound']}-bound)"
    )
    print(
        f"ucai-pytorch-ops decode step {ops_step * 1e3:.1f} ms: floor_ratio={ops_step / floor['floor_seconds']:.2f} "
        "(the fast engine without its native kernels)"
    )
    print(f"ucai decode step {step * 1e3:.1f} ms: floor_ratio={step / floor['floor_seconds']:.2f}")
    best, speed, memory = ratios_against_best(summary, "ucai", ("hf-dynamic", "hf-static"))
    default = summary["ucai"]["tokens_per_s"] / summary["hf-dynamic"]["tokens_per_s"]
    print(f"ucai vs hf-dynamic (transformers' default cache): speed_ratio={default:.2f}")
    _, ops_speed, ops_memory = ratios_against_best(summary, "ucai-pytorch-ops", ("hf-dynamic", "hf-static"))
    print(f"ucai without native kernels vs peer's best: speed_ratio={ops_speed:.2f} memory_ratio={ops_memory:.2f}")
    print(f"peer's best: {best}")
    print(f"generation: speed_ratio={speed:.2f} memory_ratio={memory:.2f}")


if __name__ == "__main__":
    main()
