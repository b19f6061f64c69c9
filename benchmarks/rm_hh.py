"""Reward models on held-out human harmlessness comparisons: how often each prefers the
answer people chose.

    python benchmarks/rm_hh.py                                   # the CPU experiment's two RMs
    python benchmarks/rm_hh.py --rm pmp=/work/pmp/pmp_rm --json out.json

The pairs are Anthropic's hh-rlhf harmless-base test split (``--data``, by default
``../shared/data/hh-rlhf/harmless-base-test.jsonl.gz`` beside the project; absent, the
script prints why and exits 0 with "skipped"). Only the pairs held out by the fixed
hash split of pair ids are scored: `ucai.data.preference_data.heldout_pairs` at
fraction 0.25 and the preference data module's default seed, the rule a reward run
with ``data.init_args.val_fraction: 0.25`` uses for its validation pairs, so a reward
model pre-trained on the same file (``configs/reward_pretrain.yaml``) never trained on
them. 2,307 usable pairs hold out 557.

Each reward model (``--rm NAME=FOLDER``, a folder the reward stage wrote) scores both
replies of every pair with `ucai.reward_scoring.RewardScorer`, each text cut to
``--max-length`` tokens keeping its end (the reply), as the scorer does in PPO and
evaluation, under bf16 autocast on CPU as the reward stage's own validation and the
evaluation stage score (``--fp32``: without autocast). Accuracy: the share of pairs whose chosen reply gets the higher reward, a
tie counting one half, with a 95% Wilson interval. An ethical reward model should be
above 0.5, its inverted twin below. The last line reads ``rm_hh: NAME=ACC ... n=N``.

This is an accuracy measurement, not a speed or memory benchmark against a peer: it
prints no ratio (`../shared/BENCHMARKS.md` governs the peer comparisons), and the work
recorded is the pair count and each model's scoring time.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from pathlib import Path

from ucai.data.preference_data import BENCHMARK_FRACTION as HELDOUT_FRACTION

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
EXPERIMENT_RMS = {
    "ethical": "lightning_logs/experiment_cpu/models/ethical/rm_model",
    "unethical": "lightning_logs/experiment_cpu/models/unethical/rm_model",
}


def split_seed() -> int:
    """The preference data module's default seed: the split its ``val_fraction`` draws."""
    from ucai.data.preference_data import PreferenceDataModule

    return inspect.signature(PreferenceDataModule).parameters["seed"].default


def benchmark_pairs(path: Path, fraction: float = HELDOUT_FRACTION):
    """The held-out pairs of ``path`` (`heldout_pairs` at ``fraction``, the default seed)."""
    from ucai.data.preference_data import heldout_pairs, read_preferences

    return heldout_pairs(read_preferences(path), fraction, split_seed())


def pair_rewards(scorer, pairs) -> tuple[list[float], list[float]]:
    """Raw rewards of the chosen and of the rejected reply of each pair.

    The texts are scored longest first, so a batch holds texts of similar length (less
    padding); the rewards come back in the pairs' order. Raw rewards order the replies
    as the normalised ones do (the scorer's std is positive).
    """
    conversations = [p.conversation for p in pairs] * 2
    replies = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    texts = scorer.render(conversations, replies)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    scored = scorer.raw_rewards([conversations[i] for i in order], [replies[i] for i in order]).tolist()
    rewards = [0.0] * len(texts)
    for position, index in enumerate(order):
        rewards[index] = scored[position]
    return rewards[: len(pairs)], rewards[len(pairs) :]


def accuracy(chosen: list[float], rejected: list[float]) -> tuple[float, int]:
    """(share of pairs with the chosen reply ahead, a tie counting 1/2; number of ties)."""
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    ties = sum(c == r for c, r in zip(chosen, rejected, strict=True))
    return (wins + 0.5 * ties) / len(chosen), ties


def measure(name: str, folder: str, pairs, max_length: int, batch_size: int, autocast: bool) -> dict:
    """One reward model's accuracy on ``pairs`` with its interval and wall time."""
    import torch

    from ucai.reward_scoring import RewardScorer
    from ucai.stats import wilson_interval

    start = time.perf_counter()
    scorer = RewardScorer(folder, batch_size=batch_size)
    # The benchmark's budget, whatever the model trained with (both keep the end).
    scorer.stats = dataclasses.replace(scorer.stats, max_length=max_length)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chosen, rejected = pair_rewards(scorer, pairs)
    acc, ties = accuracy(chosen, rejected)
    low, high = wilson_interval(acc, len(pairs))
    seconds = time.perf_counter() - start
    print(f"{name}: accuracy {acc:.3f} [{low:.3f}, {high:.3f}] n={len(pairs)} ties={ties} ({folder}, {seconds:.0f} s)",
          flush=True)
    return {"folder": folder, "accuracy": acc, "ci95": [low, high], "n": len(pairs), "ties": ties,
            "seconds": round(seconds, 1)}


def parse_rm(value: str) -> tuple[str, str]:
    name, sep, folder = value.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {value!r}")
    return name, folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="hh-rlhf file (relative paths: to the project root)")
    parser.add_argument("--rm", type=parse_rm, action="append", metavar="NAME=FOLDER",
                        help="a reward-model folder to measure (repeatable; default: the CPU experiment's two)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text; longer texts keep their end")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward")
    parser.add_argument("--fp32", action="store_true", help="score in float32 (default: bf16 autocast on CPU)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    data = args.data if args.data.is_absolute() else ROOT / args.data
    if not data.exists():
        print(f"rm_hh: skipped ({data} not found: the benchmark data ships in ../shared)")
        return 0
    rms = dict(args.rm or [(name, str(ROOT / folder)) for name, folder in EXPERIMENT_RMS.items()])
    pairs = benchmark_pairs(data)
    print(f"{len(pairs)} held-out pairs of {data} (hash split, fraction {HELDOUT_FRACTION}, seed {split_seed()}); "
          f"texts cut to {args.max_length} tokens keeping the end, {'fp32' if args.fp32 else 'bf16 autocast'}", flush=True)
    from ucai.errors import UcaiError

    try:
        results = {
            name: measure(name, folder, pairs, args.max_length, args.batch_size, autocast=not args.fp32)
            for name, folder in rms.items()
        }
    except UcaiError as error:
        print(f"rm_hh: {error}", file=sys.stderr)
        return 1
    if args.json:
        summary = {"data": str(data), "fraction": HELDOUT_FRACTION, "seed": split_seed(), "n": len(pairs),
                   "max_length": args.max_length, "precision": "fp32" if args.fp32 else "bf16 autocast",
                   "reward_models": results}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print("rm_hh: " + " ".join(f"{name}={r['accuracy']:.3f}" for name, r in results.items()) + f" n={len(pairs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
