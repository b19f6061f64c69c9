"""``ucai pipeline``: the whole Constitutional AI pipeline, for one or both constitutions,
then the evaluation.

    ucai pipeline --config configs/pipeline/demo.yaml
    ucai pipeline --config configs/pipeline/demo.yaml --force sft     # rerun sft and later
    ucai pipeline --config configs/pipeline/demo.yaml --dry-run       # what would run, and how

Stages, in order: categorise (once), then critique_revision → sft → preferences →
reward → ppo, each for every side before the next stage starts, then eval (once).
With ``preference_pretraining:`` (or ``--pmp PATH``), reward_pretrain runs once before
the reward stages, on human comparisons, and both reward models start from it (the
unethical one with its head negated).
Stage by stage rather than side by side so that both sides' preferences exist before
either reward stage: each side's reward stage also scores the OTHER side's pairs
(``data.init_args.cross_path``; the reward models of a constitution and its inverse
should disagree: ``cross_accuracy`` < 0.5 in ``reward_stats.json``). The pipeline
passes each stage the paths of its inputs and outputs under ``output_root``
(`ucai.stage_outputs`), and TensorBoard runs go to ``<root>/logs/<stage>_<side>/``.

The modules: `config` reads the YAML, `plan` turns it into stage runs (each stage's
arguments parsed up front), `state` decides what is up to date, `runner` starts the
processes. An interrupted stage with an unchanged hash resumes: predict stages keep
their shard files and skip finished prompts, evaluation keeps its answer cache, fit
stages start again (their outputs are written atomically at the end). A stage whose
hash changed starts from clean outputs. The hash does not cover ucai's own code: after
changing code, use ``--force STAGE``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable

from ucai.errors import UcaiError
from ucai.part_times import fmt_seconds
from ucai.pipeline import runner, state
from ucai.pipeline.config import PipelineConfig, load_pipeline_config
from ucai.pipeline.console import Console
from ucai.pipeline.plan import StageRun, plan
from ucai.stage_outputs import RL_STAGES, STAGE_ORDER


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ucai pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="pipeline YAML (e.g. configs/pipeline/demo.yaml)")
    parser.add_argument("--force", choices=[*STAGE_ORDER, "all"], help="rerun this stage and every later one")
    parser.add_argument("--stop-after", choices=STAGE_ORDER, help="stop once this stage has run for every side")
    parser.add_argument(
        "--rl",
        nargs="+",
        choices=RL_STAGES,
        help="the RL algorithms to train, overriding the config's `rl:` (the first is the report's rl model)",
    )
    parser.add_argument(
        "--pmp",
        metavar="PATH",
        help="preference-model pre-training on this hh-rlhf-format file (local, or hf://datasets/OWNER/NAME/FILE), "
        "overriding the config's preference_pretraining.path; both reward stages then start from it",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ucai pipeline``; returns the exit status."""
    began = time.perf_counter()  # the closing line's time includes the fork server and the plan
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code or 0)
    cfg = load_pipeline_config(args.config, rl=args.rl, preference_pretraining=args.pmp)
    # Started first: a fork server imports the stages' libraries (Lightning's parser
    # among them), and the plan is made in a process forked from it.
    starter = None if args.dry_run else stage_starter(cfg)
    everything = starter.call(plan, cfg) if starter else plan(cfg)
    stop_at = STAGE_ORDER.index(args.stop_after) if args.stop_after else len(STAGE_ORDER)
    runs = [run for run in everything if run.enabled and STAGE_ORDER.index(run.stage) <= stop_at]
    console = Console(cfg, runs, began)
    console.opening(starter.how if starter else None)
    force_from = 0 if args.force == "all" else (STAGE_ORDER.index(args.force) if args.force else None)

    def forced(stage: str) -> bool:
        return force_from is not None and STAGE_ORDER.index(stage) >= force_from

    if args.dry_run:
        console.commands(would_skip(runs, everything, forced))
        return 0
    for stage, group in itertools.groupby(runs, key=lambda run: run.stage):
        pending = prepare_group(list(group), everything, cfg, forced(stage), console)
        if pending:
            failed = run_group(pending, starter, cfg, console)
            if failed:
                return failed
    console.closing()
    return 0


def check_inputs(run: StageRun, everything: list[StageRun], made_before_it: set = frozenset()) -> None:
    """Raise `UcaiError` for an input of ``run`` that is missing (and not among
    ``made_before_it``), naming the stage that makes it, if any."""
    for path in run.inputs:
        if path not in made_before_it and state.input_fingerprint(path) == "missing":
            maker = next((other for other in everything if path in other.outputs), None)
            hint = f"; it is made by the {maker.label} stage ({maker.configs[0]})" if maker else ""
            raise UcaiError(f"{run.label}: input {path} not found{hint}")


def up_to_date(run: StageRun, current_hash: str) -> bool:
    """Whether ``run`` finished with these inputs and settings and its outputs are whole."""
    return state.read_json(state.marker_path(run)).get("hash") == current_hash and state.outputs_complete(run)


def would_skip(runs: list[StageRun], everything: list[StageRun], forced: Callable[[str], bool]) -> set[int]:
    """id() of the runs a real invocation would skip as up to date, for ``--dry-run``.
    A run whose input another run of this invocation would make is not (its input is
    yet to be written); an input nothing makes must exist, as it must for a real run."""
    remade: set = set()
    skipped = set()
    for run in runs:
        check_inputs(run, everything, remade)
        remade_input = any(path in remade for path in run.inputs)
        if not forced(run.stage) and not remade_input and up_to_date(run, state.stage_hash(run)):
            skipped.add(id(run))
        else:
            remade.update(run.outputs)
    return skipped


def prepare_group(
    group: list[StageRun], everything: list[StageRun], cfg: PipelineConfig, forced: bool, console: Console
) -> list[tuple[StageRun, str]]:
    """The runs of one stage that must run, with their hashes: inputs checked, up-to-date
    runs skipped, interrupted runs resumed, changed runs cleaned."""
    pending = []
    for run in group:
        check_inputs(run, everything)
        current = state.stage_hash(run)
        if not forced and up_to_date(run, current):
            console.skipped(run)
            continue
        previous = state.read_json(state.state_file(cfg.output_root, run))
        resuming = not forced and previous.get("hash") == current and previous.get("status") == "running"
        if not resuming:
            state.clean_outputs(run)
        command = run.command(cfg.python)
        state.write_json_atomic(
            state.state_file(cfg.output_root, run), {"hash": current, "status": "running", "command": command}
        )
        pending.append((run, current))
        console.starting(run, resuming)
    return pending


def stage_starter(cfg: PipelineConfig) -> runner.StageStarter:
    """How this pipeline starts its stages: forked from a fork server (``fork_stages``,
    where one can be used), else fresh interpreters."""
    why_not = runner.fork_server_unavailable(cfg.python) if cfg.fork_stages else None
    if cfg.fork_stages and why_not is None:
        how = "stages are forked from a server process that imports their libraries once " \
              "(fork_stages: false starts each in a fresh interpreter)"
        return runner.StageStarter(cfg.python, how, runner.start_fork_server())
    how = f"each stage starts a fresh interpreter: {why_not}" if why_not else None
    return runner.StageStarter(cfg.python, how)


def run_group(pending: list[tuple[StageRun, str]], starter: runner.StageStarter, cfg: PipelineConfig, console: Console) -> int:
    """Run one stage's pending runs (the sides side by side with ``parallel_sides``, when
    more than one must run) and record the ones that succeed; 0, or the exit status of
    the first failure."""
    runs = [run for run, _ in pending]
    logs = cfg.output_root / "logs"
    side_by_side = cfg.parallel_sides and len(runs) > 1
    console.print_starts(logs if side_by_side else None)
    results = (
        runner.run_side_by_side(runs, starter, logs, console.progress) if side_by_side else runner.run_in_order(runs, starter)
    )
    failed = 0
    for (run, current), (code, elapsed) in zip(pending, results, strict=False):
        if code != 0:
            if side_by_side:
                log = runner.console_log(logs, run)
                sys.stderr.write(f"--- last lines of {log}:\n{runner.log_tail(log)}")
            print(f"ucai pipeline: {run.label} failed with exit status {code} after {fmt_seconds(elapsed)}; "
                  "fix the cause and rerun the same command to resume", file=sys.stderr)
            failed = failed or (code if code > 0 else 1)
        elif not state.outputs_complete(run):
            print(f"ucai pipeline: {run.label} exited 0 but did not write {', '.join(map(str, run.outputs))}", file=sys.stderr)
            failed = failed or 1
        else:
            command = run.command(cfg.python)
            state.write_json_atomic(state.marker_path(run), {
                "hash": current, "stage": run.stage, "side": run.side, "command": command,
                "seconds": round(elapsed, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            state.write_json_atomic(state.state_file(cfg.output_root, run), {"hash": current, "status": "done", "command": command})
            console.done(run, elapsed)
    return failed
