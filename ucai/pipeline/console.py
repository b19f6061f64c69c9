"""What ``ucai pipeline`` prints: each run numbered, its command, how long it took, and
at the end the artefacts and the evaluation's headline."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

from ucai.data.io import atomic_output
from ucai.part_times import fmt_seconds
from ucai.pipeline.config import PipelineConfig
from ucai.pipeline.plan import StageRun
from ucai.pipeline.runner import console_log
from ucai.report import headline

TIMES_FILE = "stage_times.json"


class Console:
    """What the pipeline tells its user: each run numbered, what it does and how long it took."""

    def __init__(self, cfg: PipelineConfig, runs: list[StageRun], began: float | None = None):
        """``began``: the invocation's `time.perf_counter` at its start (now if None)."""
        self.cfg = cfg
        self.runs = runs
        self.numbers = {id(run): number for number, run in enumerate(runs, start=1)}
        self.began = time.perf_counter() if began is None else began
        self.finished: list[tuple[StageRun, float | None]] = []  # seconds; None: skipped
        self.starts: list[tuple[StageRun, str]] = []
        self.resumed: set[int] = set()  # id() of runs that resumed an interrupted one
        # The previous invocation's record, read before this one rewrites it.
        self.earlier_times = _earlier_times(cfg.output_root / TIMES_FILE)

    def header(self, run: StageRun) -> str:
        return f"[{self.numbers[id(run)]}/{len(self.runs)}] {run.label}"

    def commands(self, skipped: set[int] = frozenset()) -> None:
        """Each run's command, or that it is up to date (``skipped``: their id())."""
        for run in self.runs:
            if id(run) in skipped:
                print(f"{self.header(run)}: up to date, would be skipped ({run.outputs[0]})")
            else:
                print(f"{self.header(run)}: {_quote(run.command(self.cfg.python))}")

    def opening(self, how_stages_start: str | None) -> None:
        cfg = self.cfg
        print(f"ucai pipeline: {len(self.runs)} stage runs, sides {', '.join(cfg.sides)}, model {cfg.model}, "
              f"output {cfg.output_root}", flush=True)
        if how_stages_start:
            print(f"ucai pipeline: {how_stages_start}", flush=True)
        fallen = [run.label for run in self.runs if run.bf16_fallback]
        if fallen:
            print(f"ucai pipeline: no native bfloat16 here (a CPU without AVX-512/AMX, a GPU before Ampere): "
                  f"{len(fallen)} stage runs configured for bf16 run in 32-true, several times faster here "
                  "(bf16_fallback: false keeps bf16)", flush=True)

    def skipped(self, run: StageRun) -> None:
        print(f"{self.header(run)}: up to date, skipped ({run.outputs[0]})", flush=True)
        self.finished.append((run, None))
        self.write_times()

    def starting(self, run: StageRun, resuming: bool) -> None:
        if resuming:
            self.resumed.add(id(run))
        line = f"\n==> {self.header(run)}{' (resuming)' if resuming else ''}\n    {_quote(run.command(self.cfg.python))}"
        self.starts.append((run, line))

    def print_starts(self, side_logs: Path | None) -> None:
        """The start lines of the runs about to start; with ``side_logs`` each names the
        file its console goes to."""
        for run, line in self.starts:
            where = f"\n    console: {console_log(side_logs, run)}" if side_logs is not None else ""
            print(line + where, flush=True)
        self.starts = []

    def progress(self, seconds: float, lines: list[tuple[StageRun, str | None]]) -> None:
        """Where the runs going side by side stand (their consoles are in log files)."""
        where = " | ".join(f"{run.side or run.label}: {line or 'starting'}" for run, line in lines)
        print(f"    ... {fmt_seconds(seconds)}: {where}", flush=True)

    def done(self, run: StageRun, seconds: float) -> None:
        print(f"<== {run.label} done in {fmt_seconds(seconds)}", flush=True)
        self.finished.append((run, seconds))
        self.write_times()

    def write_times(self) -> None:
        """``<output_root>/stage_times.json``: this invocation's stage runs so far, each
        with the wall seconds of the invocation that last ran it (``skipped``: up to
        date this time, its seconds kept from the earlier run's record; ``resumed``:
        the seconds cover only the part after the resume), rewritten atomically after
        each run so an interrupted pipeline keeps what finished."""
        path = self.cfg.output_root / TIMES_FILE
        earlier = self.earlier_times
        runs = []
        for run, seconds in self.finished:
            key = (run.stage, run.side)
            if seconds is None:
                kept = earlier.get(key, {})
                runs.append({"stage": run.stage, "side": run.side, "seconds": kept.get("seconds"),
                             "skipped": True, "resumed": kept.get("resumed", False)})
            else:
                runs.append({"stage": run.stage, "side": run.side, "seconds": round(seconds, 1),
                             "skipped": False, "resumed": id(run) in self.resumed})
        with atomic_output(path) as handle:
            json.dump({"parallel_sides": self.cfg.parallel_sides, "runs": runs}, handle, indent=2)

    def closing(self) -> None:
        root = self.cfg.output_root
        print(f"\nucai pipeline finished in {fmt_seconds(time.perf_counter() - self.began)}. Artefacts:")
        for run, seconds in self.finished:
            took = fmt_seconds(seconds) if seconds is not None else "skipped"
            print(f"  {run.label:<28} {took:>10}  {', '.join(str(p) for p in run.outputs)}")
        print(f"  {'TensorBoard logs':<28} {'':>10}  {root / 'logs'}")
        for line in headline(root / "eval"):
            print(line)
        if (root / "eval" / "report.md").is_file():
            print(f"\nreport: {root / 'eval' / 'report.md'}")


def _earlier_times(path: Path) -> dict[tuple[str, str | None], dict]:
    """(stage, side) -> its entry in an earlier ``stage_times.json`` (none if unreadable)."""
    try:
        runs = json.loads(path.read_text())["runs"]
        return {(r["stage"], r["side"]): r for r in runs}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _quote(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)
