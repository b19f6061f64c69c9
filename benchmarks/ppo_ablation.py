"""PPO ablation: which of ucai's choices moves its reward–KL frontier, one factor at a time.

The runs are `benchmarks/ppo_learning.py`'s (same RM, policy, prompts in the same
order, settings, curves and frontier definition; see its docstring). The starting point
is ucai's default critic under TRL 1.12's precision scope and clipping (``adapter``: the
critic a second LoRA adapter on the policy's base with a head initialised from the RM's,
rescaled to the normalised scores; sampling, rollout forward and RM scoring in fp32,
the PPO update under bf16 autocast, no gradient clipping), and each variant changes one
factor:

* ``head`` — the critic is a zero-initialised scalar head on the policy's last hidden
  state (ucai's default before issue 22) instead of the RM-initialised adapter;
* ``bf16-rollout`` — ``rollout_precision: trainer``: sampling, the rollout forward and
  RM scoring under bf16 autocast too (frozen linears held in bf16);
* ``bf16-sampling`` — ``sampling_precision: bf16``: sampling alone from a bf16 copy of
  the policy with the adapter merged (`ucai.sampling_copy`), the rollout forward, RM
  scoring and update as in the starting point;
* ``clip-1`` — ``max_grad_norm: 1`` instead of no clipping: ucai's shipped stage
  configs (`configs/ppo_<side>.yaml`).

TRL runs alongside as the reference, or its curves are reused from an earlier results
file made with the same inputs and settings (``--reuse``, reading ``--out`` or the
files named), so it need not be rerun for every ucai variant; ``--no-trl`` leaves it
out. Any run already in a reused file is taken from it, so an interrupted ablation
resumes where it stopped.

Run (from the repository root; about 7 minutes a run on one core of an idle 2-core CPU):

    nice -n 10 .venv/bin/python benchmarks/ppo_ablation.py \\
        --reward-model lightning_logs/experiment_cpu/models/ethical/rm_model --seeds 0 1 2

It prints each run's curve, then a table of every configuration's frontier values (the
score gain in RM std units at each KL level, median over the seeds that reached it,
with how many did) and plain gain (median over seeds, each seed's in brackets); every
figure comes from a run. The last line is
``ppo_ablation: adapter_at_2=… head_at_2=… … trl_at_2=…`` (gain at 2 nats, the best
learning rate of each configuration).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ppo_learning, when run as a script

from ppo_learning import (  # noqa: E402
    FRONTIER_DEFINITION,
    TRL,
    UCAI_VARIANTS,
    Bench,
    build_parser,
    checked_args,
    fmt,
    frontier_line,
    planned_arms,
    trl_child,
)

ABLATION = ["adapter", "head", "bf16-rollout", "bf16-sampling", "clip-1"]


def parse_args():
    parser = build_parser(__doc__.splitlines()[0])
    parser.set_defaults(out=Path(__file__).resolve().parent / "results" / "ppo_ablation.json")
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(UCAI_VARIANTS),
        default=ABLATION,
        help="ucai configurations to run (the first is the ppo_frontier line's ucai; none: TRL alone, "
        "e.g. in a second process beside the ucai runs, merged later with --reuse)",
    )
    parser.add_argument("--no-trl", action="store_true", help="run no TRL reference")
    return checked_args(parser)


def ablation_line(bench: Bench, variants: list[str], with_trl: bool) -> str:
    """``ppo_ablation: <variant>_at_2=…``: each configuration's best learning rate's
    median gain at 2 nats (the middle level when 2 is not among them)."""
    args = bench.args
    levels = args.kl_levels
    middle = 2.0 if 2.0 in levels else levels[len(levels) // 2]
    named = [(variant, args.ucai_learning_rates) for variant in variants]
    named += [(TRL, args.trl_learning_rates)] if with_trl else []
    cells = [
        f"{variant}_at_{middle:g}={fmt(bench.side_frontier(variant, lrs)[middle][1])}"
        for variant, lrs in named
    ]
    return "ppo_ablation: " + " ".join(cells)


def main() -> None:
    args = parse_args()
    if args.child_spec is not None:
        trl_child(args.child_spec)
        return
    with_trl = not args.no_trl
    if not args.variants and not with_trl:
        raise SystemExit("ppo_ablation: nothing to run (no --variants and --no-trl)")
    bench = Bench(args, "ppo_ablation")
    arms = planned_arms(args.variants, args.ucai_learning_rates, args.trl_learning_rates, with_trl)
    bench.announce(arms)
    bench.run_all(arms)
    if not args.summary_only:
        print(f"curves written to {args.out}")
    print(f"frontier: {FRONTIER_DEFINITION}; smoothing window {args.smooth}")
    bench.print_arm_table(arms)
    if with_trl and args.variants:
        print(frontier_line(bench, args.variants[0]))
    print(ablation_line(bench, args.variants, with_trl))


if __name__ == "__main__":
    main()
