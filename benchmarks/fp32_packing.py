"""Whether pre-packing fp32 decode weights for oneDNN pays on this CPU, by row count.

    python benchmarks/fp32_packing.py --threads 1 --rows 8 16 32 64 96

The fast engine (`ucai.fused_projection.FusedProjection`, ``pack_float32``) runs a
decode step's fp32 projections as four fused matmuls on weights packed into oneDNN's
blocked layout; without packing it runs the layer's seven projections as plain
``F.linear`` (MKL's sgemm), since fusing alone buys nothing in fp32. This times both
for 30 layers of SmolLM2's shapes (hidden 576, MLP 1536, 3 key/value heads of 64) on
random weights: the best of ``--passes`` alternating passes each. Not a comparison
with a peer (not in `make bench`): it records the trade-off behind a default. Last
line: ``fp32_packing: worst_ratio=… best_ratio=…`` (packed ÷ plain time; below 1 the
packing is faster).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

HIDDEN, MLP, KEY_VALUE = 576, 1536, 192
LAYERS = 30


def layer_weights(generator: torch.Generator) -> list[torch.Tensor]:
    """q, k, v, o, gate, up, down as (out, in) fp32 weights."""
    shapes = [(HIDDEN, HIDDEN), (KEY_VALUE, HIDDEN), (KEY_VALUE, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
              (HIDDEN, MLP)]
    return [torch.randn(out, inp, generator=generator) for out, inp in shapes]


def timed(step) -> float:
    """Seconds of ``step`` run once per layer."""
    start = time.perf_counter()
    for _ in range(LAYERS):
        step()
    return time.perf_counter() - start


def compare(rows: int, separate: list[torch.Tensor], passes: int) -> tuple[float, float]:
    """(plain, packed) seconds for LAYERS layers at ``rows`` rows, the best of ``passes``
    alternating passes each (so that a slow moment of the machine hits both)."""
    fused = [torch.cat(separate[0:3]), separate[3], torch.cat(separate[4:6]), separate[6]]  # qkv, o, gate-up, down
    hidden, inner = torch.randn(rows, HIDDEN), torch.randn(rows, MLP)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in fused]

    def plain() -> None:
        for weight in separate[:6]:
            F.linear(hidden, weight)
        F.linear(inner, separate[6])

    def packed_step() -> None:
        for index, weight in enumerate(packed):
            torch.ops.mkldnn._linear_pointwise(inner if index == 3 else hidden, weight, None, "none", [], "")

    for step in (plain, packed_step, plain, packed_step):  # warm-up: oneDNN builds its kernels on first calls
        timed(step)
    best_plain = best_packed = float("inf")
    for _ in range(passes):
        best_plain = min(best_plain, timed(plain))
        best_packed = min(best_packed, timed(packed_step))
    return best_plain, best_packed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 96])
    parser.add_argument("--passes", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    separate = layer_weights(torch.Generator().manual_seed(0))
    ratios = []
    for rows in args.rows:
        plain, packed = compare(rows, separate, args.passes)
        ratios.append(packed / plain)
        print(f"rows {rows:>4}, {args.threads} thread(s): plain {plain * 1e3:7.1f} ms, packed {packed * 1e3:7.1f} ms "
              f"for {LAYERS} layers, packed/plain {packed / plain:.2f}", flush=True)
    print(f"fp32_packing: worst_ratio={max(ratios):.2f} best_ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
