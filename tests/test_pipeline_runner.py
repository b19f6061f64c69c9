"""Stages forked from the pipeline's fork server (`ucai.pipeline.runner`): the same
outputs as a fresh interpreter, the stage's exit status and error, no orphan when the
pipeline is killed, and no fork where it is unsafe."""

from __future__ import annotations

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


def _folder(tmp_path: Path, name: str, fork: bool, **cr_overrides) -> tuple[Path, Path]:
    """A scratch folder with the shipped prompts already categorised, and a tiny
    pipeline config that runs critique-revision only."""
    folder = tmp_path / name
    (folder / "out/data").mkdir(parents=True)
    shutil.copy(ROOT / "data/red_team_prompts.jsonl", folder / "out/data/prompts.jsonl")
    config = yaml.safe_load(PIPELINE.read_text())
    config["fork_stages"] = fork
    config["stages"]["categorise"]["enabled"] = False
    config["stages"]["critique_revision"]["overrides"].update(cr_overrides)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return folder, path


def _start(folder: Path, config: Path, default_threads: bool = True) -> subprocess.Popen:
    """The pipeline in a new session; ``default_threads``: with torch's default threads,
    as `make demo` runs (else the tests' one thread, for a test about processes alone:
    beside another test worker, OpenMP threads contending for the cores slow it ~6x)."""
    environment = dict(os.environ)
    if default_threads:
        environment = {k: v for k, v in environment.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.Popen(
        [sys.executable, "-c", PIPELINE_MAIN, "--config", str(config), "--stop-after", "critique_revision"],
        cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**environment, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


@cpu_torch_only
def test_a_forked_stage_writes_what_a_fresh_interpreter_writes(tmp_path):
    runs = {}
    for fork in (True, False):
        folder, config = _folder(tmp_path, f"fork-{fork}", fork)
        process = _start(folder, config)
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:]
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


@cpu_torch_only
def test_a_failing_forked_stage_reports_its_exit_status_and_its_error(tmp_path):
    # Parsed fine up front; the stage itself finds the alias unknown when it starts.
    folder, config = _folder(tmp_path, "bad", True, **{"model.init_args.model": "smollm9"})
    process = _start(folder, config)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 2, out[-3000:]
    # The stage's own error, as one line: a user's bad input is not a crash.
    assert "ucai: error: unknown model alias 'smollm9'" in out and "Traceback" not in out
    assert "critique_revision (ethical) failed with exit status 2" in out
    assert not (folder / "out/data/ethical/sl.jsonl").exists()


def _session_processes(session: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _describe(pids) -> list[str]:
    """Each process's command line, for a failure message."""
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except OSError:
            out.append(str(pid))
    return out


@cpu_torch_only
def test_killing_the_pipeline_kills_its_forked_stage(tmp_path):
    # Slow generation (one prompt per batch, long answers) keeps the stage running.
    folder, config = _folder(
        tmp_path, "kill", True, **{"data.init_args.batch_size": 1, "model.init_args.generation.max_new_tokens": 400}
    )
    process = _start(folder, config, default_threads=False)
    shard = folder / "out/data/ethical/sl.jsonl.shards/rank-0.jsonl"
    deadline = time.monotonic() + 300
    while not shard.exists():  # the forked stage is writing rows
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the stage wrote no row"
        time.sleep(0.05)
    # The pipeline, its fork server and the stage (and multiprocessing's resource tracker).
    assert len(_session_processes(process.pid)) >= 3
    os.kill(process.pid, signal.SIGKILL)  # the pipeline only, not its process group
    process.wait()
    deadline = time.monotonic() + 30
    while _session_processes(process.pid):
        assert time.monotonic() < deadline, f"outlived the pipeline: {_describe(_session_processes(process.pid))}"
        time.sleep(0.05)


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
