"""Stages forked from the pipeline's fork server (`ucai.pipeline.runner`): the same
outputs as a fresh interpreter, the stage's exit status and error, and no fork where it
is unsafe, and the fork server's death with the pipeline. That no stage outlives a
pipeline killed with SIGKILL is checked by `test_reliability.py`'s SIGKILL test, which
kills the pipeline process alone."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ucai.pipeline import runner

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "tests/conf/pipeline_tiny.yaml"
PIPELINE_MAIN = (
    "import sys; from ucai.pipeline import main; code = main(sys.argv[1:]); "
    "print('lightning imported by the pipeline:', 'lightning' in sys.modules); sys.exit(code)"
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stages are forked on Linux only")
# A GPU build of torch never forks (a forked process cannot use CUDA once its parent has).
cpu_torch_only = pytest.mark.skipif(
    torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None,
    reason="stages are forked only with a CPU-only torch build; this torch is a GPU build",
)


def _folder(tmp_path: Path, name: str, fork: bool, overrides: dict[str, dict] | None = None) -> tuple[Path, Path]:
    """A scratch folder with the shipped prompts already categorised, and a tiny
    pipeline config from critique-revision on, with these overrides by stage."""
    folder = tmp_path / name
    (folder / "out/data").mkdir(parents=True)
    shutil.copy(ROOT / "data/red_team_prompts.jsonl", folder / "out/data/prompts.jsonl")
    config = yaml.safe_load(PIPELINE.read_text())
    config["fork_stages"] = fork
    config["stages"]["categorise"]["enabled"] = False
    for stage, values in (overrides or {}).items():
        config["stages"][stage]["overrides"].update(values)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return folder, path


def _start(folder: Path, config: Path, stop_after: str) -> subprocess.Popen:
    """The pipeline in a new session, with torch's default threads, as `make demo` runs."""
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen(
        [sys.executable, "-c", PIPELINE_MAIN, "--config", str(config), "--stop-after", stop_after],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**environment, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


@cpu_torch_only
def test_a_forked_stage_writes_what_a_fresh_interpreter_writes_and_a_failing_one_reports_its_error(tmp_path):
    """Critique-revision forked from the fork server and in a fresh interpreter: the
    same rows. The forked run then goes on to SFT, which fails: its alias is parsed
    fine up front and found unknown only when the stage starts. Both checks share one
    pipeline start, since each start imports Lightning (~12 s here). (Killing a
    pipeline with its forked stage: `test_reliability.py`'s SIGKILL test.)"""
    bad_sft = {"sft": {"model.init_args.model": "smollm9"}}
    runs = {}
    for fork, stop_after, want_code in ((True, "sft", 2), (False, "critique_revision", 0)):
        folder, config = _folder(tmp_path, f"fork-{fork}", fork, bad_sft if fork else None)
        process = _start(folder, config, stop_after)
        out, _ = process.communicate(timeout=600)
        assert process.returncode == want_code, out[-3000:]
        runs[fork] = (folder, out)
    forked, fresh = runs[True], runs[False]
    assert "stages are forked from a server process" in forked[1]
    assert "stages are forked" not in fresh[1]
    # With a fork server the plan is made in a process forked from it (Lightning's
    # import is most of a pipeline's start); without one, here.
    assert "lightning imported by the pipeline: False" in forked[1]
    assert "lightning imported by the pipeline: True" in fresh[1]
    # Sampled generation under the stage's seed: the same rows, byte for byte.
    sl = "out/data/ethical/sl.jsonl"
    assert (forked[0] / sl).read_bytes() == (fresh[0] / sl).read_bytes()
    assert (forked[0] / sl).read_text().count("\n") == 8
    # The failing forked stage: its own error as one line (a user's bad input is not a
    # crash), its exit status, and no output.
    assert "ucai: error: unknown model alias 'smollm9'" in forked[1] and "Traceback" not in forked[1]
    assert "sft (ethical) failed with exit status 2" in forked[1]
    assert not (forked[0] / "out/models/ethical/sl_model").exists()


# A pipeline that starts a fork server as `runner.start_fork_server` does: the server's
# first import is `ucai.pipeline.fork_server_setup`, with the pipeline's pid in the
# variable named by argv[1].
_FAKE_PIPELINE = """
import os, subprocess, sys, time
os.environ[sys.argv[1]] = str(os.getpid())
server = "import ucai.pipeline.fork_server_setup, time; print('imported', flush=True); time.sleep(120)"
print(subprocess.Popen([sys.executable, "-c", server]).pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Running or sleeping: not gone, and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_fork_server_dies_with_the_pipeline_that_started_it():
    """A pipeline killed with SIGKILL takes its fork server with it at once. Otherwise
    the server exits only when it notices its closed pipe, through an interpreter
    shutdown of over a second, and its stage, which dies with the server, runs on
    meanwhile (and may finish writing its output)."""
    from ucai.pipeline.parent_death import FORK_SERVER_PARENT_ENV

    pipeline = subprocess.Popen(
        [sys.executable, "-c", _FAKE_PIPELINE, FORK_SERVER_PARENT_ENV],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    server = int(pipeline.stdout.readline())
    try:
        assert pipeline.stdout.readline() == "imported\n"  # the server's line, on the same pipe
        os.kill(pipeline.pid, signal.SIGKILL)
        pipeline.wait()
        deadline = time.monotonic() + 10
        while _alive(server):
            assert time.monotonic() < deadline, "the fork server outlived the pipeline that started it"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)


def test_the_fork_server_arms_its_signal_only_when_named_and_exits_if_its_pipeline_is_gone(monkeypatch):
    """`die_with_the_pipeline`'s branches, in this process with the signal and the exit
    replaced: no variable, nothing; the pipeline as parent, the signal; a pipeline
    already gone (another parent), the signal and then exit 1. The variable is
    consumed, so nothing forked from the server inherits it."""
    from ucai.pipeline import parent_death

    armed, exits = [], []
    monkeypatch.setattr(parent_death, "die_with_parent", lambda: armed.append(True))
    monkeypatch.setattr(parent_death.os, "_exit", exits.append)
    monkeypatch.delenv(parent_death.FORK_SERVER_PARENT_ENV, raising=False)
    parent_death.die_with_the_pipeline()
    assert (armed, exits) == ([], [])
    for parent, want_exits in ((os.getppid(), []), (os.getppid() + 1, [1])):
        armed.clear()
        monkeypatch.setenv(parent_death.FORK_SERVER_PARENT_ENV, str(parent))
        parent_death.die_with_the_pipeline()
        assert (armed, exits) == ([True], want_exits)
        assert parent_death.FORK_SERVER_PARENT_ENV not in os.environ


def test_no_fork_with_another_interpreter_or_a_gpu_torch(monkeypatch):
    assert "another interpreter" in runner.fork_server_unavailable("/usr/bin/python-other")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "GPU build" in runner.fork_server_unavailable(sys.executable)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert runner.fork_server_unavailable(sys.executable) is None


def _a_wrapped_user_error() -> None:
    """A user's mistake inside another error, as jsonargparse wraps one."""
    from ucai.errors import UcaiError

    try:
        raise UcaiError("stage (side): no such file")
    except UcaiError as error:
        raise ValueError("while parsing") from error


def _forked_context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ucai.pipeline.runner", "ucai.models"])  # what the calls unpickle
    return context


def test_a_call_in_the_fork_server_returns_its_result_or_raises_its_error():
    """`StageStarter.call`: the result comes back; a `UcaiError`, also one wrapped in
    another error, is raised here as one (a line for the user); any other error as a
    RuntimeError naming it."""
    import operator

    from ucai.errors import UcaiError
    from ucai.models import resolve_model

    starter = runner.StageStarter(sys.executable, "forked", _forked_context())
    assert starter.call(operator.mul, 6, 7) == 42
    with pytest.raises(UcaiError, match="^unknown model alias 'smollm9'"):
        starter.call(resolve_model, "smollm9")
    with pytest.raises(UcaiError, match="^stage \\(side\\): no such file$"):
        starter.call(_a_wrapped_user_error)
    with pytest.raises(RuntimeError, match=r"^truediv failed in the fork server's process: ZeroDivisionError"):
        starter.call(operator.truediv, 1, 0)
    assert runner.StageStarter(sys.executable).call(operator.mul, 6, 7) == 42  # no fork server: here


def test_ctrl_c_during_a_call_in_the_fork_server_stops_it_at_once():
    """Interrupted while it waits, the pipeline ends the forked call instead of
    waiting for it (multiprocessing would join it at exit)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    starter = runner.StageStarter(sys.executable, "forked", _forked_context())
    starter.call(time.sleep, 0)  # the fork server is up

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            starter.call(time.sleep, 60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 10
    assert not [p for p in multiprocessing.active_children() if p.name == "ucai-plan"]


def test_a_stage_with_its_console_in_a_log_is_told_where_to_write_its_progress(tmp_path, monkeypatch, capfd):
    """The same variables for forked and spawned stages (`runner.stage_environment`):
    with a log, the progress file beside it and the threads given; without, no progress
    file even where the pipeline's environment names one, and its threads left alone."""
    from ucai.stage_progress import PROGRESS_FILE_ENV

    log = tmp_path / "sft_ethical.log"
    assert runner.stage_environment(2, log) == {
        PROGRESS_FILE_ENV: str(tmp_path / "sft_ethical.progress"), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"
    }
    assert runner.stage_environment(None, None) == {PROGRESS_FILE_ENV: ""}
    # A spawned stage sees them (and a forked one applies the same to os.environ).
    monkeypatch.setenv(PROGRESS_FILE_ENV, "inherited.progress")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    show = [sys.executable, "-c", f"import os; print(os.environ.get({PROGRESS_FILE_ENV!r}), os.environ['OMP_NUM_THREADS'])"]
    assert runner.SpawnedStage(show, 2, log).wait() == 0
    assert log.read_text() == f"{tmp_path / 'sft_ethical.progress'} 2\n"
    capfd.readouterr()
    assert runner.SpawnedStage(show, None, None).wait() == 0  # on this console
    assert capfd.readouterr().out == "None 7\n"


def test_sides_running_side_by_side_are_stopped_when_the_pipeline_cannot_go_on(tmp_path, monkeypatch):
    """Ctrl-C, or a progress line that cannot be printed (``ucai pipeline | head`` once
    head has exited): both stages are interrupted, not left running unattended."""

    class Stage:
        def __init__(self):
            self.stopped = threading.Event()

        def wait(self):
            assert self.stopped.wait(10), "never interrupted"
            return 130

        def interrupt(self):
            self.stopped.set()

    class Starter:
        def __init__(self):
            self.stages = []

        def start(self, run, threads=None, log=None):
            self.stages.append(Stage())
            return self.stages[-1]

    def closed_console(seconds, lines):
        raise BrokenPipeError("the console is gone")

    monkeypatch.setattr(runner, "PROGRESS_EVERY", 0.01)
    runs = [type("Run", (), {"stage": "sft", "side": side})() for side in ("ethical", "unethical")]
    starter = Starter()
    with pytest.raises(BrokenPipeError):
        runner.run_side_by_side(runs, starter, tmp_path, closed_console)
    assert [stage.stopped.is_set() for stage in starter.stages] == [True, True]
