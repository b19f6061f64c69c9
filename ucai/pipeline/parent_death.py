"""Processes that must not outlive the pipeline: Linux's parent-death signal.

A stage, and the fork server its stages are forked from, ask the kernel to kill them
when their parent dies (``PR_SET_PDEATHSIG``), so that a pipeline killed with SIGKILL
leaves nothing running that could go on writing into its folder. The "parent" is the
thread that started the process: a process must be started by a thread that lives as
long as the process should.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
# Set by the pipeline, for the fork server it starts, to the pipeline's pid
# (`ucai.pipeline.runner.start_fork_server`, `die_with_the_pipeline`).
FORK_SERVER_PARENT_ENV = "UCAI_FORK_SERVER_PARENT"


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """If this process's parent dies (even by SIGKILL), the kernel kills this process
    too. Linux only; elsewhere nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_the_pipeline() -> None:  # pragma: no cover - runs in the fork server
    """In the fork server, started by a pipeline that named itself in
    `FORK_SERVER_PARENT_ENV`: die with that pipeline at once.

    Without it the fork server notices the pipeline's death only when its "alive" pipe
    closes, then exits through a normal interpreter shutdown (over a second with torch
    and Lightning loaded); its stage, whose parent-death signal waits for the fork
    server's exit, runs on orphaned meanwhile and can finish writing its output. A
    pipeline that died before the signal was armed is no longer this process's parent:
    then exit now. Other code's fork servers (no variable) are left alone.
    """
    parent = os.environ.pop(FORK_SERVER_PARENT_ENV, None)
    if parent is None:
        return
    die_with_parent()
    if os.getppid() != int(parent):
        os._exit(1)
