"""The fast engine's fp32 decode matmuls on packed weights against plain ``F.linear``.

    python benchmarks/fp32_packing.py --threads 1 --rows 8 16 32 64 96

In fp32 the fast engine (`ucai.fused_projection.FusedProjection`, ``pack_float32``)
runs a decode step's projections as four fused matmuls on weights packed into
oneDNN's blocked layout, a second copy beside the model's own. The peer, HF
``generate``, runs the layer's seven projections as plain ``F.linear`` (MKL's sgemm);
it has no packing option, so plain ``F.linear`` is its best here. Both sides do the
same work: a decode step's projections of 30 distinct layers of SmolLM2's shapes
(hidden 576, MLP 1536, 3 key/value heads of 64; random weights, so that each step
streams every layer's weights as a real step does), ``--steps`` steps at each row count.
Each side runs in its own subprocess (its peak RSS its own), ``--repeats`` times in
alternating order; medians are compared, and the FLOPs each side counts from the weights
of the matmuls it runs are checked equal (and equal to SmolLM2's step). One line
per row count; the last line is the ``--headline-rows`` count (the batch of
``benchmarks/generation.py``): ``fp32_packing: speed_ratio=X memory_ratio=Y`` (packed
over plain; the memory ratio counts the packed copy). The end-to-end comparison with
``generate`` is ``benchmarks/generation.py --dtype float32``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import check_same_work_of, peak_rss_mb, run_alternating  # noqa: E402

HIDDEN, MLP, KEY_VALUE = 576, 1536, 192
LAYERS = 30
# q, k, v, o, gate, up, down as (out, in)
SHAPES = [(HIDDEN, HIDDEN), (KEY_VALUE, HIDDEN), (KEY_VALUE, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
          (HIDDEN, MLP)]
SIDES = ("packed", "plain")  # ucai's, the peer's


def step_flops(rows: int) -> int:
    """Multiply-adds x 2 of one decode step's projections over every layer."""
    return 2 * rows * LAYERS * sum(out * inp for out, inp in SHAPES)


def worker(side: str, rows: int, steps: int, threads: int) -> dict:
    """Time ``steps`` decode steps' projections on one side; returns seconds, FLOPs, peak RSS."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    layers = [[torch.randn(out, inp, generator=generator) for out, inp in SHAPES] for _ in range(LAYERS)]
    hidden, inner = torch.randn(rows, HIDDEN), torch.randn(rows, MLP)
    if side == "packed":
        # The engine keeps the model's own weights and adds the fused, packed copy.
        packed, flops = [], 0
        for ws in layers:  # a layer at a time, as the engine packs: one fused fp32 copy alive at once
            fused = (torch.cat(ws[0:3]), ws[3], torch.cat(ws[4:6]), ws[6])  # qkv, o, gate-up, down
            flops += sum(2 * rows * w.shape[0] * w.shape[1] for w in fused)  # packed weights are opaque
            packed.append([torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in fused])

        def step() -> None:
            for weights in packed:
                for index, weight in enumerate(weights):
                    torch.ops.mkldnn._linear_pointwise(inner if index == 3 else hidden, weight, None, "none", [], "")
    else:
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for weights in layers for w in weights)

        def step() -> None:
            for weights in layers:
                for weight in weights[:6]:
                    F.linear(hidden, weight)
                F.linear(inner, weights[6])

    for _ in range(3):  # warm-up: oneDNN and MKL pick and build their kernels on the first calls
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "flops": flops * steps, "peak_rss_mb": peak_rss_mb()}


def run_side(side: str, rows: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--rows", str(rows), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"fp32_packing: the {side} worker failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    parser.add_argument("--headline-rows", type=int, default=16, help="the row count of the last line")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows[0], args.steps, args.threads)))
        return
    rows_list = sorted(set(args.rows) | {args.headline_rows})
    print(f"fp32 decode projections, {LAYERS} layers of SmolLM2's shapes, {args.steps} steps a run, "
          f"{args.threads} thread(s), {args.repeats} alternating runs a side")
    headline = ""
    for rows in rows_list:
        runs = run_alternating(SIDES, args.repeats, lambda side, _repeat, rows=rows: run_side(side, rows, args))
        check_same_work_of(runs, "flops", "FLOPs")
        if runs["plain"][0]["flops"] != step_flops(rows) * args.steps:
            raise SystemExit(f"fp32_packing: {runs['plain'][0]['flops']} FLOPs at {rows} rows, not SmolLM2's step")
        step_ms = {side: statistics.median(r["seconds"] for r in runs[side]) / args.steps * 1e3 for side in SIDES}
        rss = {side: statistics.median(r["peak_rss_mb"] for r in runs[side]) for side in SIDES}
        speed, memory = step_ms["plain"] / step_ms["packed"], rss["packed"] / rss["plain"]
        print(f"rows {rows:>4}: packed {step_ms['packed']:7.1f} ms a step ({rss['packed']:.0f} MB), "
              f"plain {step_ms['plain']:7.1f} ms ({rss['plain']:.0f} MB): speed_ratio={speed:.2f} "
              f"memory_ratio={memory:.2f}", flush=True)
        if rows == args.headline_rows:
            headline = f"fp32_packing: speed_ratio={speed:.2f} memory_ratio={memory:.2f}"
    print(headline)


if __name__ == "__main__":
    main()
