"""Starting a pipeline stage's process: a fresh interpreter, or a fork of the pipeline.

Every stage runs in its own process (its memory is returned when it ends, a crash stays
inside it), and a fresh interpreter spends seconds importing Lightning, transformers
and peft before the stage does anything (about 8 s on a 2-core CPU, ``-X importtime``:
Lightning 4.9 s, peft with bitsandbytes 1.5 s). The demo starts 12 stage processes in 7
groups, so that is about a minute of a six-minute run.

Where it is safe, the pipeline imports those libraries once (`preload`) and forks each
stage from itself: the child starts with everything imported (shared copy-on-write
with the parent), runs ``ucai.cli.main`` with the stage's arguments, exactly what
``python -m ucai.cli`` runs, and exits with its status. Forking is safe when
(`prepare_fork` names the first condition that fails):

* the platform is Linux (fork, and ``PR_SET_PDEATHSIG`` so a killed pipeline takes its
  stage with it);
* the stage would run with this interpreter (the pipeline's ``python``);
* torch is a CPU-only build: once a process has touched CUDA (bitsandbytes' import
  asks for the device), a forked child cannot use it;
* the pipeline process has one Python thread, so no Python lock is held across the fork
  (the pipeline only imports; it never runs a torch operation, so no OpenMP team of
  its own is lost; the idle worker pools that OpenBLAS and other native libraries
  start at import are rebuilt by their fork handlers).

Otherwise, and with ``fork_stages: false`` in the pipeline config, each stage starts a
fresh interpreter, ``python -m ucai.cli ...``, as before.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Protocol

# What a stage imports before it starts working; the pipeline imports the same once.
PRELOAD_MODULES = (
    "torch",
    "lightning.pytorch",
    "transformers",
    "transformers.models.llama.modeling_llama",  # the offline default model's code
    "peft",
    "ucai.lightning_cli",
)

_preload_seconds: float | None = None


class StageProcess(Protocol):
    """A started stage: wait for its exit status, or interrupt it."""

    def wait(self) -> int:
        """Block until the stage ends; its exit status (negative: killed by that signal)."""

    def interrupt(self) -> None:
        """Send the stage SIGINT (Ctrl-C), as the terminal would."""


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """If the pipeline is killed (even with SIGKILL) its stage must not run on orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def prepare_fork(python: str) -> str | None:
    """Get this process ready to fork stages: check the conditions of the module
    docstring and `preload`. Returns why stages cannot be forked (None: they can)."""
    if not sys.platform.startswith("linux"):
        return f"forking is used on Linux only (this is {sys.platform})"
    if os.path.abspath(python) != os.path.abspath(sys.executable):
        return f"the stages run with another interpreter ({python})"
    import torch

    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return "torch is a GPU build (a forked process cannot use CUDA once its parent has)"
    preload()
    threads = threading.active_count()
    if threads != 1:
        return f"the pipeline process runs {threads} Python threads"
    return None


def preload() -> float:
    """Import what every stage imports (once); returns the seconds it took."""
    global _preload_seconds
    if _preload_seconds is None:
        begin = time.perf_counter()
        from ucai import cli

        for name in (*PRELOAD_MODULES, *cli.STAGE_MODULES):
            importlib.import_module(name)
        _preload_seconds = time.perf_counter() - begin
    return _preload_seconds


class SpawnedStage:
    """A stage in a fresh interpreter."""

    def __init__(self, command: list[str], threads: int | None, log: Path | None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
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
    """A stage forked from this (preloaded) process, running ``ucai.cli.main(args)``."""

    def __init__(self, args: list[str], threads: int | None, log: Path | None):
        # Whatever this process has buffered would otherwise be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child; its effects are tested
            os._exit(_run_child(args, threads, log))
        self.status: int | None = None

    def wait(self) -> int:
        if self.status is None:
            _, status = os.waitpid(self.pid, 0)
            self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGINT)


def _run_child(args: list[str], threads: int | None, log: Path | None) -> int:  # pragma: no cover - child
    """The forked child: the stage's console, threads and exit status as a fresh
    ``python -m ucai.cli`` with ``PYTHONUNBUFFERED=1`` and ``OMP_NUM_THREADS`` would have."""
    code = 1
    try:
        die_with_parent()
        if log is not None:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=True)
        if threads is not None:
            import torch

            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        sys.argv = [sys.argv[0], *args]
        from ucai.cli import main

        code = main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # as an uncaught exception ends `python -m ucai.cli`: traceback, status 1
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()  # logging.shutdown and the like, as at a normal exit
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    return code


def start(command: list[str], threads: int | None, log: Path | None, fork: bool) -> StageProcess:
    """Start a stage: ``command`` is ``[python, "-m", "ucai.cli", *args]``; with ``fork``
    the process is forked from this one (after `prepare_fork`) and runs ``args``."""
    if fork:
        return ForkedStage(command[3:], threads, log)
    return SpawnedStage(command, threads, log)
