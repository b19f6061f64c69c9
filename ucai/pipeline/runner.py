"""Running stages: each in a process of its own, one after the other or the sides of a
stage side by side.

A stage's process returns its memory when it ends, and a crash stays inside it. A fresh
interpreter spends seconds importing Lightning, transformers and peft before a stage
does anything, so on a CPU machine the pipeline starts the standard library's fork
server with those imports preloaded (``multiprocessing`` "forkserver") and each stage is
forked from it, ready to run: `ucai.stage_cli.main` with the stage's arguments, exactly
what ``python -m ucai.cli`` runs. What the fork server cannot give is kept here: each
stage asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``), and so
does the fork server (`ucai.pipeline.parent_death`), so a pipeline killed with SIGKILL
takes the fork server and its stages with it at once.

Stages start fresh interpreters instead (`fork_server_unavailable` says why) off Linux,
with another interpreter than the pipeline's, and with a GPU build of torch: the fork
server's imports touch CUDA (bitsandbytes asks for the device), and a forked process
cannot use CUDA once its parent has. ``fork_stages: false`` asks for fresh interpreters.

The plan parses every stage's arguments with Lightning's parser, whose import is most
of a pipeline's start; where there is a fork server, which imports Lightning anyway,
the plan is made in a process forked from it (`StageStarter.call`), so the pipeline
itself never imports Lightning.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol, TypeVar

from ucai.errors import UcaiError, user_error
from ucai.pipeline.parent_death import FORK_SERVER_PARENT_ENV, die_with_parent
from ucai.pipeline.plan import StageRun
from ucai.stage_catalog import STAGE_MODULES
from ucai.stage_progress import PROGRESS_FILE_ENV, progress_file, read_progress

# What a stage imports before it starts working; the fork server imports it once.
PRELOAD_MODULES = (
    "ucai.pipeline.fork_server_setup",
    "torch",
    "lightning.pytorch",
    "transformers",
    "transformers.models.llama.modeling_llama",  # the offline default model's code
    "peft",
    "ucai.stage_cli",
    "ucai.lightning_cli",
    *STAGE_MODULES,
)
_Result = TypeVar("_Result")


class StageProcess(Protocol):
    """A started stage: wait for its exit status, or interrupt it."""

    def wait(self) -> int:
        """Block until the stage ends; its exit status (negative: killed by that signal)."""

    def interrupt(self) -> None:
        """Send the stage SIGINT (Ctrl-C), as the terminal would."""


def fork_server_unavailable(python: str) -> str | None:
    """Why stages cannot be forked from a fork server here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return f"the parent-death signal is Linux's (this is {sys.platform})"
    if os.path.abspath(python) != os.path.abspath(sys.executable):
        return f"the stages run with another interpreter ({python})"
    import torch

    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return "torch is a GPU build (a forked process cannot use CUDA once its parent has)"
    return None


def start_fork_server() -> multiprocessing.context.BaseContext:
    """Start the fork server, which imports `PRELOAD_MODULES` while this process goes on
    (the first stage waits for it)."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD_MODULES))
    # The server dies with the thread that starts it (`ucai.pipeline.parent_death`): the
    # pipeline's `main`, which lives as long as the pipeline does.
    os.environ[FORK_SERVER_PARENT_ENV] = str(os.getpid())
    try:
        forkserver.ensure_running()
    finally:
        del os.environ[FORK_SERVER_PARENT_ENV]
    return context


def stage_environment(threads: int | None, log: Path | None) -> dict[str, str]:
    """The variables a stage runs with, forked or spawned: its OpenMP threads where the
    pipeline sets them (else the pipeline's own settings stand), and the file for its
    progress line where its console goes to ``log`` (no progress bar is drawn there);
    "" for none, so that a stage does not inherit one meant for another."""
    env = {PROGRESS_FILE_ENV: str(progress_file(log)) if log is not None else ""}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _apply(changes: dict[str, str], environment) -> None:
    """Set ``changes`` in ``environment``, removing the ones set to ""."""
    for name, value in changes.items():
        if value:
            environment[name] = value
        else:
            environment.pop(name, None)


class SpawnedStage:
    """A stage in a fresh interpreter: ``python -m ucai.cli <mode> <args>``."""

    def __init__(self, command: list[str], threads: int | None, log: Path | None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        _apply(stage_environment(threads, log), env)
        preexec = die_with_parent if sys.platform.startswith("linux") else None
        with open(log, "w", encoding="utf-8") if log is not None else contextlib.nullcontext() as sink:
            self.process = subprocess.Popen(
                command, env=env, preexec_fn=preexec, stdout=sink, stderr=subprocess.STDOUT if sink else None
            )

    def wait(self) -> int:
        return self.process.wait()

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)


class ForkedStage:
    """A stage forked from the fork server, running `ucai.stage_cli.main` on its arguments."""

    def __init__(self, context, argv: list[str], threads: int | None, log: Path | None):
        self.process = context.Process(
            target=_stage_child, args=(argv, threads, log, sys.argv[0], os.getpid()), name="ucai-stage"
        )
        self.process.start()

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGINT)


def release_fork_server_alive_pipe() -> None:  # pragma: no cover - runs in the child
    """Close this forked process's copy of the fork server's "alive" pipe.

    multiprocessing hands every process forked by the fork server the write end of a
    pipe, and the fork server exits only once every holder has closed it. The stage's
    parent is the fork server, so its parent-death signal fires only when the fork
    server exits. A fork server that the pipeline started dies with the pipeline by
    its own signal (`ucai.pipeline.parent_death.die_with_the_pipeline`); one that
    multiprocessing restarted on its own has no such signal, and then, holding the
    pipe, a stage would keep the fork server alive after the pipeline was killed, and
    the fork server would keep the stage running: each waiting on the other. Closed
    here, the pipeline is the pipe's last holder, and its death ends the fork server
    either way. (Stages fork no processes of their own through the fork server, so
    nothing in the stage needs the pipe.)
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.close(fd)
    server._forkserver_alive_fd = None


def _stage_child(argv: list[str], threads: int | None, log: Path | None, argv0: str, pipeline: int) -> None:  # pragma: no cover - child
    """The forked stage: the console, threads and exit status that a fresh ``python -m
    ucai.cli`` with ``PYTHONUNBUFFERED=1`` and ``OMP_NUM_THREADS`` would have."""
    die_with_parent()
    release_fork_server_alive_pipe()
    try:
        os.kill(pipeline, 0)  # died before the signal was armed: nothing would kill this stage
    except ProcessLookupError:
        os._exit(1)
    if log is not None:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    _apply(stage_environment(threads, log), os.environ)  # as a spawned stage's
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    # Lightning relaunches a script from sys.argv for multi-process strategies.
    sys.argv = [argv0, *argv]
    from ucai.stage_cli import main

    code = main(argv)
    logging.shutdown()  # multiprocessing ends its children without running atexit handlers
    sys.exit(code)


def _call_child(sender, function, args: tuple) -> None:  # pragma: no cover - runs in the child
    """`StageStarter.call` in the forked process: send back (True, result) or (False,
    the error): a user's mistake (`UcaiError`, also one wrapped in another error) as
    one, anything else as its traceback printed here and a RuntimeError naming it."""
    from ucai.stage_cli import prepare_console

    die_with_parent()
    release_fork_server_alive_pipe()
    # Ctrl-C reaches the whole process group; the pipeline stops on it and ends this
    # process, which would otherwise print a second traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    prepare_console()  # ucai's log lines as the pipeline prints them
    try:
        reply = (True, function(*args))
    except Exception as error:
        cause = user_error(error)
        if cause is None:  # a bug: its traceback is the useful part
            traceback.print_exc()
        reply = (False, UcaiError(str(cause)) if cause is not None else _failure(function, error))
    try:
        sender.send(reply)
    except OSError:  # the pipeline has stopped reading (interrupted)
        pass
    except Exception as error:  # a result that cannot be pickled
        sender.send((False, _failure(function, error)))
    sender.close()
    logging.shutdown()


def _failure(function, error: BaseException) -> RuntimeError:
    return RuntimeError(f"{function.__name__} failed in the fork server's process: {error!r}")


class StageStarter:
    """Starts every stage of a pipeline the same way: forked, or in a fresh interpreter."""

    def __init__(self, python: str, how: str | None = None, fork_context=None):
        """``how``: a line for the user on how stages start (None: nothing to say)."""
        self.python = python
        self.how = how
        self.fork_context = fork_context

    def call(self, function: Callable[..., _Result], *args) -> _Result:
        """``function(*args)`` with the stages' libraries imported: in a process forked
        from the fork server (its result and arguments pickled), else in this one."""
        if self.fork_context is None:
            return function(*args)
        receiver, sender = self.fork_context.Pipe(duplex=False)
        child = self.fork_context.Process(target=_call_child, args=(sender, function, args), name="ucai-plan")
        child.start()
        sender.close()
        try:
            succeeded, value = receiver.recv()
        except EOFError:  # it died without a reply (killed, or out of memory)
            child.join()
            raise RuntimeError(
                f"{function.__name__} in the fork server's process ended with exit status {child.exitcode}"
            ) from None
        except BaseException:  # Ctrl-C: stop now, not once the call is done
            child.kill()
            child.join()
            raise
        finally:
            receiver.close()
        child.join()
        if not succeeded:
            raise value
        return value

    def start(self, run: StageRun, threads: int | None = None, log: Path | None = None) -> StageProcess:
        """Start ``run``. ``threads``: its torch CPU threads (None: torch's default);
        ``log``: a file for its console (None: this console)."""
        if self.fork_context is not None:
            return ForkedStage(self.fork_context, [run.mode, *run.stage_args()], threads, log)
        return SpawnedStage(run.command(self.python), threads, log)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def console_log(logs: Path, run: StageRun) -> Path:
    return logs / "console" / (f"{run.stage}_{run.side}.log" if run.side else f"{run.stage}.log")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "".join(path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def run_in_order(runs: list[StageRun], starter: StageStarter) -> list[tuple[int, float]]:
    """Run stages one after the other on this console, stopping at the first failure;
    (exit status, seconds) of each that ran."""
    results = []
    for run in runs:
        begin = time.perf_counter()
        process = starter.start(run)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.interrupt()
            process.wait()
            raise
        results.append((code, time.perf_counter() - begin))
        if code != 0:
            break
    return results


# How often the pipeline prints where the sides of a stage run side by side stand.
PROGRESS_EVERY = 60.0

Progress = Callable[[float, list[tuple[StageRun, str | None]]], None]


def run_side_by_side(
    runs: list[StageRun], starter: StageStarter, logs: Path, report: Progress | None = None
) -> list[tuple[int, float]]:
    """Run the sides of one stage at the same time, the CPUs split between them.

    On a small CPU machine this is faster than one after the other: a stage's import,
    model loading, tokenising and the per-token Python work of decoding use one core,
    and a small model's matmuls gain little from a second thread. Each stage's console
    output goes to ``logs/console/<stage>_<side>.log``. The CPUs are split, not shared:
    OpenMP threads of two stages spinning against each other on the same cores cost
    more than they give (benchmarks in the README). Every `PROGRESS_EVERY` seconds
    until all have ended, ``report(seconds, [(run, its progress line or None), ...])``
    (`ucai.stage_progress`).
    """
    threads = max(1, available_cpus() // len(runs))
    (logs / "console").mkdir(parents=True, exist_ok=True)
    progress = [progress_file(console_log(logs, run)) for run in runs]
    for path in progress:  # an earlier invocation's last line
        path.unlink(missing_ok=True)
    begin = time.perf_counter()
    processes = [starter.start(run, threads, console_log(logs, run)) for run in runs]

    def finish(process: StageProcess) -> tuple[int, float]:
        code = process.wait()
        return code, time.perf_counter() - begin

    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = [pool.submit(finish, process) for process in processes]
        try:
            while wait(futures, timeout=PROGRESS_EVERY).not_done:
                if report is not None:
                    lines = [(run, "ended" if future.done() else read_progress(path))
                             for run, future, path in zip(runs, futures, progress, strict=True)]
                    report(time.perf_counter() - begin, lines)
            return [future.result() for future in futures]
        except BaseException:  # Ctrl-C, or the console gone (a closed pipe): stop the stages
            for process in processes:
                process.interrupt()
            raise
