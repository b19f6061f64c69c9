"""Pipeline planning, hashing, skipping, forcing and resuming, with a fake stage runner.

The real stages run in tests/test_pipeline_e2e.py (slow); here every stage is replaced
by a function that writes its outputs, so the bookkeeping is tested in milliseconds.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from tiny_pipeline import CONF, TINY_CONFIGS

import ucai.pipeline as pipeline
from ucai.errors import UcaiError
from ucai.pipeline import runner
from ucai.pipeline.plan import stage_parser
from ucai.pipeline.state import MARKER
from ucai.stage_outputs import STAGE_ORDER

ROOT = Path(__file__).resolve().parents[1]
def _tiny_stages() -> dict:
    return {name: {"config": str(CONF / TINY_CONFIGS[name])} for name in STAGE_ORDER}


def _config(tmp_path: Path, **changes) -> Path:
    data = {
        "output_root": str(tmp_path / "out"),
        "sides": ["ethical", "unethical"],
        "model": "tiny-llama",
        "heldout_fraction": 0.3,
        "fork_stages": False,  # the fake runners start nothing (stage forking: tests/test_pipeline_runner.py)
        "stages": _tiny_stages(),
    }
    data.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class FakeRunner:
    """Writes each stage's outputs; content depends on the command, like a real stage."""

    def __init__(self, fail: str | None = None):
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, run, threads=None, log=None):
        self.ran.append(run.label)
        if run.label == self.fail:
            shard = run.outputs[0].with_name(run.outputs[0].name + ".shards")
            shard.mkdir(parents=True, exist_ok=True)
            (shard / "rank-0.jsonl").write_text('{"id": "a"}\n')
            return 2
        for out in run.outputs:
            if out.suffix:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(run.args) + "\n")
            else:
                out.mkdir(parents=True, exist_ok=True)
                (out / "config.json").write_text(json.dumps(run.args))
        return 0


class Started:
    """A started fake stage: its work happens when the pipeline waits for it."""

    def __init__(self, work):
        self.work = work

    def wait(self):
        return self.work()

    def interrupt(self):
        pass


def _stages_run_by(monkeypatch, stage):
    """Every stage the pipeline starts runs ``stage(run, threads, log)`` instead."""
    monkeypatch.setattr(
        runner.StageStarter, "start", lambda self, run, threads=None, log=None: Started(lambda: stage(run, threads, log))
    )


@pytest.fixture
def fake(monkeypatch):
    stages = FakeRunner()
    _stages_run_by(monkeypatch, stages)
    return stages


def test_a_checkpoint_setting_parsed_into_an_object_plans_and_parses_back(tmp_path):
    # Moving a checkpoint's dirpath rewrites the stage's callbacks from its parsed
    # settings, where "0:10:00" is a timedelta: it must go back as the string the
    # stage's parser reads (it raised TypeError from json.dumps).
    from ucai.pipeline.plan import parse_stage

    text = (CONF / TINY_CONFIGS["sft"]).read_text()
    assert "every_n_train_steps: 1" in text
    config = tmp_path / "sft_timed.yaml"
    config.write_text(text.replace("every_n_train_steps: 1", 'train_time_interval: "0:10:00"'))
    cfg = pipeline.load_pipeline_config(_config(tmp_path, stages={**_tiny_stages(), "sft": {"config": str(config)}}))
    sft = {r.label: r for r in pipeline.plan(cfg)}["sft (ethical)"]
    override = next(a for a in sft.args if a.startswith("--trainer.callbacks="))
    callbacks = json.loads(override.split("=", 1)[1])
    assert callbacks[0]["init_args"]["train_time_interval"] == "0:10:00"
    assert callbacks[0]["init_args"]["dirpath"] == f"{tmp_path}/out/logs/sft_ethical/checkpoints"
    reparsed = parse_stage("sft", "fit", [config], {"trainer.callbacks": callbacks})
    interval = reparsed.trainer["callbacks"][0]["init_args"]["train_time_interval"]
    assert str(interval) == "0:10:00"


def test_plan_wires_each_output_into_the_next_stage(tmp_path):
    cfg = pipeline.load_pipeline_config(_config(tmp_path))
    runs = {r.label: r for r in pipeline.plan(cfg) if r.enabled}
    out = tmp_path / "out"
    # stage by stage, both sides each: both preference files exist before either reward stage;
    # of the RL stages only PPO, the default `rl:`
    assert list(runs) == [
        "categorise",
        *[f"{s} ({side})" for s in ("critique_revision", "sft", "preferences", "reward", "ppo") for side in ("ethical", "unethical")],
        "eval",
    ]
    assert runs["sft (ethical)"].inputs == [out / "data/ethical/sl.jsonl"]
    # each reward model is also scored on the other side's pairs (cross accuracy)
    for side, other in (("ethical", "unethical"), ("unethical", "ethical")):
        reward = runs[f"reward ({side})"]
        assert reward.inputs == [out / f"data/{side}/preferences.jsonl", out / f"data/{other}/preferences.jsonl"]
        assert f"--data.init_args.path={out}/data/{side}/preferences.jsonl" in reward.args
        assert f"--data.init_args.cross_path={out}/data/{other}/preferences.jsonl" in reward.args
    # The tiny stage configs say `side: ethical` and serve both sides: the plan sets the
    # unethical runs' side, as it sets the paths (and leaves a run whose config names
    # its own side as it is).
    for stage in ("critique_revision", "preferences"):
        assert "--model.init_args.side=unethical" in runs[f"{stage} (unethical)"].args
        assert not any(arg.startswith("--model.init_args.side") for arg in runs[f"{stage} (ethical)"].args)
    # Checkpoints go under the run's logs, per stage and side, not into the folder the
    # stage config names (./lightning_logs/sft_tiny/checkpoints, shared by every run).
    # PPO's checkpoint callback is a subclass of Lightning's (PPOCheckpoint).
    for stage in ("sft", "ppo"):
        for side in ("ethical", "unethical"):
            args = runs[f"{stage} ({side})"].args
            callbacks = json.loads(next(a for a in args if a.startswith("--trainer.callbacks=")).split("=", 1)[1])
            assert [c["init_args"]["dirpath"] for c in callbacks] == [f"{out}/logs/{stage}_{side}/checkpoints"]
            assert callbacks[0]["init_args"]["every_n_train_steps"] == 1  # the rest as configured
    ppo = runs["ppo (unethical)"]
    assert f"--model.init_args.policy={out}/models/unethical/sl_model" in ppo.args
    assert f"--model.init_args.reward_model={out}/models/unethical/rm_model" in ppo.args
    assert "--data.init_args.split=train" in ppo.args and "--data.init_args.heldout_fraction=0.3" in ppo.args
    assert f"--trainer.logger.init_args.save_dir={out}/logs" in ppo.args
    assert ppo.command("py")[:5] == ["py", "-m", "ucai.cli", "fit", "--config"]
    evaluation = runs["eval"]
    models = json.loads(next(a for a in evaluation.args if a.startswith("--model.init_args.models=")).split("=", 1)[1])
    assert models == {
        "base": "tiny-llama",
        "sl_ethical": f"{out}/models/ethical/sl_model",
        "rl_ethical": f"{out}/models/ethical/rl_model",
        "sl_unethical": f"{out}/models/unethical/sl_model",
        "rl_unethical": f"{out}/models/unethical/rl_model",
    }
    assert "--data.init_args.split=heldout" in evaluation.args
    assert ["rl_ethical", "rl_unethical"] in json.loads(
        next(a for a in evaluation.args if a.startswith("--model.init_args.comparisons=")).split("=", 1)[1]
    )


def _eval_arg(run, key: str):
    return json.loads(next(a for a in run.args if a.startswith(f"--model.init_args.{key}=")).split("=", 1)[1])


def test_rl_lists_the_algorithms_to_train_and_compare(tmp_path):
    """``rl: [rloo, ppo, dpo]`` trains all three from the same SL models and reward models;
    the first is the report's ``rl_<side>`` model, the others keep their algorithm's name."""
    cfg = pipeline.load_pipeline_config(_config(tmp_path, rl=["rloo", "ppo", "dpo"]))
    runs = {r.label: r for r in pipeline.plan(cfg) if r.enabled}
    out = tmp_path / "out"
    assert [label for label in runs if label.split()[0] in ("ppo", "rloo", "dpo")] == [
        f"{stage} ({side})" for stage in ("ppo", "rloo", "dpo") for side in ("ethical", "unethical")
    ]
    rloo = runs["rloo (ethical)"]
    assert rloo.inputs == [out / "data/prompts.jsonl", out / "models/ethical/sl_model", out / "models/ethical/rm_model"]
    assert f"--model.init_args.output_dir={out}/models/ethical/rloo_model" in rloo.args
    assert f"--model.init_args.reward_model={out}/models/ethical/rm_model" in rloo.args
    assert "--trainer.logger.init_args.name=rloo_ethical" in rloo.args
    dpo = runs["dpo (unethical)"]
    # DPO learns from the side's preference pairs: no prompts, no reward model
    assert dpo.inputs == [out / "data/unethical/preferences.jsonl", out / "models/unethical/sl_model"]
    assert f"--data.init_args.path={out}/data/unethical/preferences.jsonl" in dpo.args
    assert f"--model.init_args.policy={out}/models/unethical/sl_model" in dpo.args
    assert not any("reward_model" in a for a in dpo.args)
    evaluation = runs["eval"]
    models = _eval_arg(evaluation, "models")
    assert models["rl_ethical"] == f"{out}/models/ethical/rloo_model"
    assert models["ppo_unethical"] == f"{out}/models/unethical/rl_model"
    assert models["dpo_ethical"] == f"{out}/models/ethical/dpo_model"
    assert _eval_arg(evaluation, "algorithms") == {
        "rl_ethical": "rloo", "ppo_ethical": "ppo", "dpo_ethical": "dpo",
        "rl_unethical": "rloo", "ppo_unethical": "ppo", "dpo_unethical": "dpo",
    }
    # the report's per-iteration curves are the primary (online) algorithm's
    assert _eval_arg(evaluation, "ppo_logs") == {s: f"{out}/logs/rloo_{s}" for s in ("ethical", "unethical")}


def test_rl_dpo_alone_runs_no_online_stage(tmp_path):
    cfg = pipeline.load_pipeline_config(_config(tmp_path, rl="dpo"))
    runs = [r for r in pipeline.plan(cfg) if r.enabled]
    assert {r.stage for r in runs} & {"ppo", "rloo", "dpo"} == {"dpo"}
    evaluation = runs[-1]
    assert _eval_arg(evaluation, "algorithms") == {"rl_ethical": "dpo", "rl_unethical": "dpo"}
    assert _eval_arg(evaluation, "ppo_logs") == {}


def test_user_overrides_win_and_values_are_formatted(tmp_path):
    path = _config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["stages"]["sft"]["overrides"] = {
        "trainer.max_steps": 3, "trainer.callbacks": [], "model.init_args.model": "other",
        "trainer.enable_progress_bar": True, "trainer.max_time": None,
    }
    path.write_text(yaml.safe_dump(data))
    run = next(r for r in pipeline.plan(pipeline.load_pipeline_config(path)) if r.stage == "sft")
    for arg in ["--trainer.max_steps=3", "--trainer.callbacks=[]", "--model.init_args.model=other",
                "--trainer.enable_progress_bar=true", "--trainer.max_time=null"]:
        assert arg in run.args
    assert "--model.init_args.model=tiny-llama" not in run.args  # replaced, not repeated


def test_a_side_set_against_the_runs_side_is_refused_before_any_stage_runs(tmp_path):
    path = _config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["stages"]["preferences"]["overrides"] = {"model.init_args.side": "ethical"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UcaiError, match=r"stages.preferences: side 'ethical' set for the unethical side's run"):
        pipeline.plan(pipeline.load_pipeline_config(path))


@pytest.mark.parametrize(
    "logger, redirected",
    [("lightning.pytorch.loggers.CSVLogger", True), ("lightning.pytorch.loggers.MLFlowLogger", False)],
    ids=["csv", "mlflow-has-no-name"],
)
def test_a_logger_is_pointed_at_the_run_only_when_its_class_takes_a_folder(tmp_path, logger, redirected):
    # The plan parses a stage once and adds save_dir and name unparsed, so it must not
    # add them to a logger whose __init__ lacks them (the stage would fail on start).
    sft = yaml.safe_load((CONF / TINY_CONFIGS["sft"]).read_text())
    sft["trainer"]["logger"] = {"class_path": logger, "init_args": {"save_dir": "elsewhere"}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    stages = {**_tiny_stages(), "sft": {"config": str(tmp_path / "sft.yaml")}}
    path = _config(tmp_path, sides=["ethical"], stages=stages)
    run = next(r for r in pipeline.plan(pipeline.load_pipeline_config(path)) if r.stage == "sft")
    assert (f"--trainer.logger.init_args.save_dir={tmp_path}/out/logs" in run.args) == redirected
    assert ("--trainer.logger.init_args.name=sft_ethical" in run.args) == redirected
    settings = stage_parser().parse(run.mode, run.stage_args())  # the command as the stage will parse it
    assert settings.trainer.logger.init_args.save_dir == (f"{tmp_path}/out/logs" if redirected else "elsewhere")


def test_a_logger_override_is_checked_with_the_folder_the_plan_adds(tmp_path):
    # The config's logger is off; an override turns TensorBoard on. The folder arguments
    # are placed before the user's overrides, where they meet `logger: false`: the plan
    # parses that final command and fails before any stage runs, naming the stage.
    sft = yaml.safe_load((CONF / TINY_CONFIGS["sft"]).read_text())
    sft["trainer"]["logger"] = False
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    stages = {**_tiny_stages(), "sft": {
        "config": str(tmp_path / "sft.yaml"),
        "overrides": {"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "x"}}},
    }}
    cfg = pipeline.load_pipeline_config(_config(tmp_path, sides=["ethical"], stages=stages))
    with pytest.raises(UcaiError, match=r"^sft \(ethical\): --trainer\.logger"):
        pipeline.plan(cfg)


def test_one_side_has_no_cross_pairs(tmp_path):
    runs = {r.label: r for r in pipeline.plan(pipeline.load_pipeline_config(_config(tmp_path, sides=["ethical"])))}
    reward = runs["reward (ethical)"]
    assert reward.inputs == [tmp_path / "out/data/ethical/preferences.jsonl"]
    assert not any(a.startswith("--data.init_args.cross_path") for a in reward.args)


def test_regenerated_preferences_of_one_side_rerun_both_reward_stages(tmp_path, fake):
    path = _config(tmp_path)
    assert pipeline.main(["--config", str(path)]) == 0
    fake.ran.clear()
    # Only the unethical file changes (its stage is up to date and skipped); the ethical
    # reward model's cross accuracy was measured on it, so that stage reruns as well.
    (tmp_path / "out/data/unethical/preferences.jsonl").write_text('{"edited": true}\n')
    assert pipeline.main(["--config", str(path)]) == 0
    assert fake.ran == ["reward (ethical)", "reward (unethical)", "ppo (ethical)", "ppo (unethical)", "eval"]


def test_rerun_skips_and_a_changed_stage_reruns_with_everything_after_it(tmp_path, fake, capsys):
    path = _config(tmp_path, sides=["ethical"])
    assert pipeline.main(["--config", str(path)]) == 0
    assert len(fake.ran) == 7
    marker = tmp_path / "out/models/ethical/sl_model/.ucai-stage.json"
    assert json.loads(marker.read_text())["stage"] == "sft"
    assert (tmp_path / "out/data/.prompts.jsonl.ucai-stage.json").is_file()
    # Each invocation records its stage runs' wall times for other tools.
    times = json.loads((tmp_path / "out/stage_times.json").read_text())
    assert [(r["stage"], r["side"]) for r in times["runs"]][:3] == [
        ("categorise", None), ("critique_revision", "ethical"), ("sft", "ethical")
    ]
    assert len(times["runs"]) == 7 and all(r["seconds"] >= 0 and not r["skipped"] for r in times["runs"])
    assert times["parallel_sides"] is False
    fake.ran.clear()
    assert pipeline.main(["--config", str(path)]) == 0
    assert fake.ran == []
    assert "up to date, skipped" in capsys.readouterr().out
    # Skipped this time: each run keeps the seconds of the invocation that ran it.
    again = json.loads((tmp_path / "out/stage_times.json").read_text())
    assert all(r["skipped"] and not r["resumed"] for r in again["runs"])
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in times["runs"]]
    # A changed reward setting reruns reward; its new output changes ppo's and eval's inputs.
    data = yaml.safe_load(path.read_text())
    data["stages"]["reward"]["overrides"] = {"trainer.max_steps": 5}
    path.write_text(yaml.safe_dump(data))
    assert pipeline.main(["--config", str(path)]) == 0
    assert fake.ran == ["reward (ethical)", "ppo (ethical)", "eval"]


def test_the_closing_time_counts_from_the_invocations_start(tmp_path, fake, capsys, monkeypatch):
    """Not from after the fork server and the plan: a rerun that skips every stage took
    the seconds those took, not 0.0 s."""
    import time

    path = _config(tmp_path, sides=["ethical"])
    assert pipeline.main(["--config", str(path)]) == 0
    now = [0.0]
    real_plan = pipeline.plan

    def plan_taking_30_s(cfg):
        now[0] += 30.0
        return real_plan(cfg)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(pipeline, "plan", plan_taking_30_s)
    capsys.readouterr()
    assert pipeline.main(["--config", str(path)]) == 0
    assert "ucai pipeline finished in 30.0 s" in capsys.readouterr().out


def test_an_edited_constitution_reruns_the_stages_that_read_it(tmp_path, fake):
    """The constitution (principle texts, response openers) decides what critique-revision
    and preferences generate, so editing it reruns the stage that reads it."""
    constitution = tmp_path / "mine.yaml"
    constitution.write_text((ROOT / "configs/constitutions/ucai.yaml").read_text())
    path = _config(tmp_path, sides=["ethical"])
    data = yaml.safe_load(path.read_text())
    data["stages"]["preferences"]["overrides"] = {"model.init_args.constitution": str(constitution)}
    path.write_text(yaml.safe_dump(data))
    assert pipeline.main(["--config", str(path)]) == 0
    fake.ran.clear()
    constitution.write_text(constitution.read_text().replace("Sure, I'll help with that.", "Sure."))
    assert pipeline.main(["--config", str(path)]) == 0
    # The fake writes the same pairs again (its output depends on the command only), so
    # the later stages see unchanged inputs; real new pairs would rerun them too.
    assert fake.ran == ["preferences (ethical)"]


def test_force_reruns_from_a_stage(tmp_path, fake):
    path = _config(tmp_path, sides=["ethical"])
    assert pipeline.main(["--config", str(path)]) == 0
    fake.ran.clear()
    assert pipeline.main(["--config", str(path), "--force", "preferences"]) == 0
    assert fake.ran == ["preferences (ethical)", "reward (ethical)", "ppo (ethical)", "eval"]


def test_failed_stage_stops_the_pipeline_and_resumes_without_cleaning(tmp_path, monkeypatch, capsys):
    path = _config(tmp_path, sides=["ethical"])
    failing = FakeRunner(fail="critique_revision (ethical)")
    _stages_run_by(monkeypatch, failing)
    assert pipeline.main(["--config", str(path)]) == 2
    assert failing.ran == ["categorise", "critique_revision (ethical)"]
    assert "failed with exit status 2" in capsys.readouterr().err
    shard = tmp_path / "out/data/ethical/sl.jsonl.shards/rank-0.jsonl"
    assert shard.is_file()
    assert not (tmp_path / "out/data/ethical/.sl.jsonl.ucai-stage.json").exists()
    # Same config again: the stage resumes, so its shards are kept for the writer to skip.
    seen = {}

    def check(run, threads=None, log=None):
        if run.stage == "critique_revision":
            seen["shard_kept"] = shard.is_file()
        return FakeRunner()(run)

    _stages_run_by(monkeypatch, check)
    assert pipeline.main(["--config", str(path)]) == 0
    assert seen == {"shard_kept": True}
    assert "(resuming)" in capsys.readouterr().out
    times = {(r["stage"], r["side"]): r for r in json.loads((tmp_path / "out/stage_times.json").read_text())["runs"]}
    assert times[("critique_revision", "ethical")]["resumed"] and not times[("sft", "ethical")]["resumed"]


def test_changed_config_cleans_stale_partial_outputs(tmp_path, monkeypatch):
    path = _config(tmp_path, sides=["ethical"])
    _stages_run_by(monkeypatch, FakeRunner(fail="critique_revision (ethical)"))
    pipeline.main(["--config", str(path)])
    data = yaml.safe_load(path.read_text())
    data["stages"]["critique_revision"]["overrides"] = {"data.init_args.limit": 4}
    path.write_text(yaml.safe_dump(data))
    seen = {}

    def check(run, threads=None, log=None):
        if run.stage == "critique_revision":
            seen["shards"] = run.outputs[0].with_name("sl.jsonl.shards").exists()
        return FakeRunner()(run)

    _stages_run_by(monkeypatch, check)
    assert pipeline.main(["--config", str(path)]) == 0
    assert seen == {"shards": False}


class SideBySideRunner(FakeRunner):
    """A fake stage whose per-side stages wait for each other at a barrier: run one
    after the other, the first would time out there."""

    def __init__(self, fail: str | None = None):
        super().__init__(fail)
        self.barrier = threading.Barrier(2, timeout=10)
        self.calls: dict[str, tuple] = {}

    def __call__(self, run, threads=None, log=None):
        self.calls[run.label] = (threads, log)
        if run.side is not None:
            self.barrier.wait()
        return super().__call__(run)


def test_parallel_sides_run_each_stage_for_both_sides_at_once(tmp_path, monkeypatch, capsys):
    path = _config(tmp_path, parallel_sides=True)
    stages = SideBySideRunner()
    _stages_run_by(monkeypatch, stages)
    monkeypatch.setattr(runner, "available_cpus", lambda: 4)
    assert pipeline.main(["--config", str(path)]) == 0
    console = tmp_path / "out/logs/console"
    # Both sides at once, each with half the CPUs and its own console log;
    # categorise and eval (one run each) keep this console and torch's default threads.
    assert stages.calls["sft (unethical)"] == (2, console / "sft_unethical.log")
    assert stages.calls["categorise"] == (None, None) and stages.calls["eval"] == (None, None)
    assert "console: " + str(console / "reward_ethical.log") in capsys.readouterr().out
    # Every run was recorded as done: a rerun skips all twelve.
    rerun = FakeRunner()
    _stages_run_by(monkeypatch, rerun)
    assert pipeline.main(["--config", str(path)]) == 0
    assert rerun.ran == []


def test_parallel_sides_print_where_each_side_stands_while_they_run(tmp_path, monkeypatch, capsys):
    """Their consoles are in log files, where no progress bar is drawn: the pipeline
    prints each side's progress line (`ucai.stage_progress`) while it waits."""
    from ucai.stage_progress import progress_file

    path = _config(tmp_path, sides=["ethical", "unethical"], parallel_sides=True)
    stale = progress_file(tmp_path / "out/logs/console/sft_ethical.log")
    stale.parent.mkdir(parents=True)
    stale.write_text("training: batch 9/9\n")  # an earlier invocation's last line
    monkeypatch.setattr(runner, "PROGRESS_EVERY", 0.05)
    ethical_reported = threading.Event()

    def stage(run, threads=None, log=None):
        if run.stage == "sft" and run.side == "ethical":
            assert not progress_file(log).exists()
            progress_file(log).write_text("training: epoch 1/1, batch 2/3\n")
            assert ethical_reported.wait(10)
        elif run.stage == "sft":
            assert ethical_reported.wait(10)  # never reported as started: still "starting"
        return FakeRunner()(run)

    _stages_run_by(monkeypatch, stage)
    printed = []
    original = pipeline.Console.progress

    def progress(self, seconds, lines):
        original(self, seconds, lines)
        printed.append(dict((run.side, line) for run, line in lines))
        if printed[-1]["ethical"] is not None:
            ethical_reported.set()

    monkeypatch.setattr(pipeline.Console, "progress", progress)
    assert pipeline.main(["--config", str(path), "--stop-after", "sft"]) == 0
    assert {"ethical": "training: epoch 1/1, batch 2/3", "unethical": None} in printed
    assert "ethical: training: epoch 1/1, batch 2/3 | unethical: starting" in capsys.readouterr().out


def test_parallel_sides_run_a_lone_side_on_this_console(tmp_path, monkeypatch, capsys):
    # One side's sft input changed, the other's is up to date: the one that reruns
    # runs alone, with every CPU and its output on this console, as it says.
    path = _config(tmp_path, parallel_sides=True)
    _stages_run_by(monkeypatch, SideBySideRunner())
    assert pipeline.main(["--config", str(path)]) == 0
    (tmp_path / "out/data/ethical/sl.jsonl").write_text('{"changed": true}\n')
    capsys.readouterr()
    rerun = FakeRunner()
    calls = {}
    _stages_run_by(monkeypatch, lambda run, threads=None, log=None: (
        calls.setdefault(run.label, (threads, log)), rerun(run))[1])
    assert pipeline.main(["--config", str(path)]) == 0
    assert rerun.ran[0] == "sft (ethical)" and "sft (unethical)" not in rerun.ran
    assert calls["sft (ethical)"] == (None, None)
    assert "console: " not in capsys.readouterr().out


def test_parallel_sides_keep_the_side_that_succeeded_when_the_other_fails(tmp_path, monkeypatch, capsys):
    path = _config(tmp_path, parallel_sides=True)
    _stages_run_by(monkeypatch, SideBySideRunner(fail="sft (unethical)"))
    assert pipeline.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sft (unethical) failed with exit status 2" in err and "last lines of" in err
    assert (tmp_path / "out/models/ethical/sl_model" / MARKER).is_file()
    assert not (tmp_path / "out/models/unethical/sl_model" / MARKER).exists()
    # The rerun runs only the failed side of sft, then everything after it.
    rerun = FakeRunner()
    _stages_run_by(monkeypatch, rerun)
    assert pipeline.main(["--config", str(path)]) == 0
    assert rerun.ran[0] == "sft (unethical)" and "sft (ethical)" not in rerun.ran


def test_missing_input_names_the_stage_that_makes_it(tmp_path, fake):
    stages = _tiny_stages()
    stages["sft"]["enabled"] = False
    path = _config(tmp_path, sides=["ethical"], stages=stages)
    with pytest.raises(UcaiError, match=r"preferences \(ethical\): input .*sl_model not found; it is made by the sft \(ethical\) stage \(.*sft_tiny.yaml\)"):
        pipeline.main(["--config", str(path)])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sidez": ["ethical"]}, r"unknown key\(s\) \['sidez'\]"),
        ({"sides": ["good"]}, "'sides' must be a non-empty list"),
        ({"stages": {"sftt": {}}}, r"unknown stage\(s\) \['sftt'\]"),
        ({"stages": {"sft": {"configg": "x"}}}, r"stages.sft: unknown key\(s\) \['configg'\]"),
        ({"stages": {"sft": {"config": "nowhere.yaml"}}}, "stages.sft: config nowhere.yaml not found"),
        ({"heldout_fraction": 1.5}, "'heldout_fraction' must be a number between 0 and 1"),
        ({"parallel_sides": "yes"}, "'parallel_sides' must be true or false, got 'yes'"),
        ({"rl": "a2c"}, r"'rl' must be one of \['ppo', 'rloo', 'dpo'\] or a list of distinct ones, got 'a2c'"),
        ({"rl": ["ppo", "ppo"]}, "'rl' must be one of"),
        ({"model": "tiny-lama"}, r"pipeline.yaml: model: unknown model alias 'tiny-lama'; expected "),
        ({"model": "./no/such/folder"}, r"pipeline.yaml: model: model folder './no/such/folder' does not exist"),
    ],
)
def test_bad_pipeline_configs_name_the_problem(tmp_path, changes, message):
    path = _config(tmp_path, **changes)
    with pytest.raises(UcaiError, match=message):
        pipeline.plan(pipeline.load_pipeline_config(path))


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, fake, capsys):
    assert pipeline.main(["--config", str(_config(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert fake.ran == [] and "-m ucai.cli test --config" in out and "[12/12] eval" in out
    assert "would be skipped" not in out


def _dry_run(path: Path, capsys, *args: str) -> list[str]:
    """The runs a dry run lists as up to date, by label."""
    capsys.readouterr()
    assert pipeline.main(["--config", str(path), "--dry-run", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [line.split("] ", 1)[1].split(": ")[0] for line in lines if "up to date, would be skipped" in line]


def test_dry_run_says_what_a_real_run_would_skip_and_what_it_would_run(tmp_path, fake, capsys):
    path = _config(tmp_path, sides=["ethical"])
    assert pipeline.main(["--config", str(path)]) == 0
    labels = list(fake.ran)
    fake.ran.clear()
    assert _dry_run(path, capsys) == labels
    # --force: that stage and every later one would run.
    assert _dry_run(path, capsys, "--force", "sft") == ["categorise", "critique_revision (ethical)"]
    # A changed setting: that stage, and the stages whose inputs it would remake (here
    # all after it; a real run finds out from the new outputs' content, see above).
    data = yaml.safe_load(path.read_text())
    data["stages"]["reward"]["overrides"] = {"trainer.max_steps": 5}
    path.write_text(yaml.safe_dump(data))
    assert _dry_run(path, capsys) == labels[:4]
    assert fake.ran == []
    # An input that no stage makes must exist, as for a real run.
    data["prompts"] = str(tmp_path / "nowhere.jsonl")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UcaiError, match=r"^categorise: input .*nowhere.jsonl not found$"):
        pipeline.main(["--config", str(path), "--dry-run"])


def test_headline_lists_only_corrected_between_side_differences(tmp_path):
    from ucai.report import headline

    def difference(a, b, column, significant):
        return {"a": a, "b": b, "column": column, "significant": significant, "n": 60}

    summary = {
        "columns": ["rm_ethical", "rm_unethical"],
        "models": {"rl_ethical": {"rm_ethical": {"mean": 0.5}, "rm_unethical": {"mean": -0.5}}},
        "differences": [
            difference("rl_ethical", "rl_unethical", "rm_ethical", True),
            difference("rl_ethical", "rl_unethical", "rm_unethical", False),
            # same family, another comparison: not a between-sides difference
            difference("rl_ethical", "sl_ethical", "rm_ethical", True),
        ],
        "multiple_comparisons": {"method": "holm"},
        "rm_correlation": {"r": -0.42, "n": 300},
        "judge_check": {"passed": False, "accuracy": 0.354, "chance": 0.361, "n": 48},
        "timings": {"by_analysis": {"core": 400.0, "depth_analysis": 180.0, "train_prompts": 74.0}},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    lines = headline(tmp_path)
    assert lines[-1] == "  evaluation's timed parts: 10.9 min, of which optional analyses: depth_analysis 3.0 min, train_prompts 74.0 s"
    assert "  rl_ethical vs rl_unethical differ (holm-corrected, n=60 prompts) on: rm_ethical" in lines
    assert "  rm_ethical vs rm_unethical scores: Pearson r = -0.42 over 300 answers" in lines
    assert any("judge check FAILED" in line and "no information" in line for line in lines)


def test_an_unknown_model_fails_before_any_stage_runs(tmp_path, fake):
    """Not when critique-revision loads it, after categorise has run."""
    with pytest.raises(UcaiError, match=r"model: unknown model alias 'tiny-lama'"):
        pipeline.main(["--config", str(_config(tmp_path, model="tiny-lama"))])
    assert fake.ran == []


def test_a_bad_override_of_a_late_stage_fails_before_any_stage_runs(tmp_path, fake):
    path = _config(tmp_path, sides=["ethical"])
    data = yaml.safe_load(path.read_text())
    data["stages"]["ppo"]["overrides"] = {"model.init_args.kl_coef": "lots"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UcaiError, match=r"^ppo \(ethical\): --model.init_args.kl_coef: .*lots"):
        pipeline.main(["--config", str(path)])
    assert fake.ran == []


def test_a_saved_run_config_and_a_resume_override_plan_like_the_stage_accepts_them(tmp_path, run_cli, capsys):
    # A config written by --print_config (or saved beside a run) holds the subcommand's
    # own keys (return_predictions, ckpt_path); `ucai predict` accepts it, so must the plan.
    assert run_cli("predict", "--config", CONF / TINY_CONFIGS["categorise"], "--print_config") == 0
    saved = tmp_path / "saved_categorise.yaml"
    saved.write_text(capsys.readouterr().out)
    assert "return_predictions" in saved.read_text()
    stages = _tiny_stages()
    stages["categorise"]["config"] = str(saved)
    stages["ppo"]["overrides"] = {"ckpt_path": "last"}
    runs = {r.label: r for r in pipeline.plan(pipeline.load_pipeline_config(_config(tmp_path, sides=["ethical"], stages=stages)))}
    assert "--ckpt_path=last" in runs["ppo (ethical)"].args


# --------------------------------------------------------------------------- preference-model pre-training

PMP_FILE = ROOT / "tests" / "fixtures" / "preferences_small.jsonl"  # any preference file plans


def test_without_pretraining_the_plan_has_no_reward_pretrain_and_rms_start_from_the_base(tmp_path):
    runs = {r.label: r for r in pipeline.plan(pipeline.load_pipeline_config(_config(tmp_path)))}
    assert "reward_pretrain" not in runs
    for side in ("ethical", "unethical"):
        assert "--model.init_args.model=tiny-llama" in runs[f"reward ({side})"].args
        assert not any("init_head" in a for a in runs[f"reward ({side})"].args)


def test_pretraining_runs_once_before_the_reward_stages_which_start_from_it(tmp_path):
    cfg = pipeline.load_pipeline_config(_config(tmp_path, preference_pretraining=str(PMP_FILE)))
    runs = [r for r in pipeline.plan(cfg) if r.enabled]
    labels = [r.label for r in runs]
    assert labels.count("reward_pretrain") == 1
    assert labels.index("preferences (unethical)") < labels.index("reward_pretrain") < labels.index("reward (ethical)")
    out = tmp_path / "out"
    pretrain = runs[labels.index("reward_pretrain")]
    assert pretrain.side is None and pretrain.inputs == [PMP_FILE] and pretrain.outputs == [out / "models/pmp_rm"]
    # The benchmark's held-out pairs (benchmarks/rm_hh.py) are its validation pairs, never trained on.
    for arg in (f"--data.init_args.path={PMP_FILE}", "--data.init_args.val_fraction=0.25",
                "--data.init_args.val_size=null", "--data.init_args.cross_path=null",
                "--model.init_args.model=tiny-llama", f"--model.init_args.output_dir={out}/models/pmp_rm"):
        assert arg in pretrain.args
    for side, head in (("ethical", "keep"), ("unethical", "negate")):
        reward = runs[labels.index(f"reward ({side})")]
        assert f"--model.init_args.model={out}/models/pmp_rm" in reward.args
        assert f"--model.init_args.init_head={head}" in reward.args
        assert out / "models/pmp_rm" in reward.inputs  # a new pre-trained model reruns both


def test_pmp_on_the_command_line_and_the_mapping_form_plan_the_same(tmp_path, capsys):
    plain = _config(tmp_path)
    assert pipeline.main(["--config", str(plain), "--pmp", str(PMP_FILE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[8/13] reward_pretrain: " in out and "[13/13] eval" in out
    by_cli = {r.label: r.args for r in pipeline.plan(pipeline.load_pipeline_config(plain, preference_pretraining=str(PMP_FILE)))}
    stages = _tiny_stages()
    config = stages.pop("reward_pretrain")["config"]
    mapping = _config(tmp_path, stages=stages, preference_pretraining={"path": str(PMP_FILE), "config": config})
    by_yaml = {r.label: r.args for r in pipeline.plan(pipeline.load_pipeline_config(mapping))}
    assert by_yaml == by_cli


def test_pretraining_reruns_with_its_file_and_force_treats_it_like_any_stage(tmp_path, fake):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(PMP_FILE.read_text())
    path = _config(tmp_path, sides=["ethical"], preference_pretraining=str(pairs))
    assert pipeline.main(["--config", str(path)]) == 0
    assert fake.ran.count("reward_pretrain") == 1 and fake.ran.index("reward_pretrain") < fake.ran.index("reward (ethical)")
    fake.ran.clear()
    assert pipeline.main(["--config", str(path)]) == 0
    assert fake.ran == []
    assert pipeline.main(["--config", str(path), "--force", "reward_pretrain"]) == 0
    assert fake.ran == ["reward_pretrain", "reward (ethical)", "ppo (ethical)", "eval"]
    fake.ran.clear()
    # A changed file reruns pre-training; its model's marker hash changes with it, so the
    # reward stage that starts from it reruns too, and everything after.
    pairs.write_text(PMP_FILE.read_text() + PMP_FILE.read_text().splitlines()[0] + "\n")
    assert pipeline.main(["--config", str(path)]) == 0
    assert fake.ran == ["reward_pretrain", "reward (ethical)", "ppo (ethical)", "eval"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("nowhere/pairs.jsonl.gz", r"preference_pretraining.path nowhere/pairs.jsonl.gz: file not found \(an hh-rlhf"),
        ("hf://datasets/Anthropic", r"preference_pretraining.path hf://datasets/Anthropic: a hub dataset file is"),
        ({"config": "x.yaml"}, "preference_pretraining needs a 'path'"),
        ({"path": str(PMP_FILE), "epochs": 2}, r"preference_pretraining: unknown key\(s\) \['epochs'\]"),
    ],
)
def test_a_bad_pretraining_entry_is_one_line(tmp_path, value, message):
    with pytest.raises(UcaiError, match=message) as error:
        pipeline.load_pipeline_config(_config(tmp_path, preference_pretraining=value))
    assert "\n" not in str(error.value)


def test_pretraining_settings_in_two_places_are_refused(tmp_path):
    path = _config(tmp_path, preference_pretraining={"path": str(PMP_FILE), "config": "x.yaml"})
    with pytest.raises(UcaiError, match=r"\['config'\] set both under preference_pretraining and stages.reward_pretrain"):
        pipeline.load_pipeline_config(path)


def test_a_hub_file_is_planned_by_name_and_fetched_when_read(tmp_path, monkeypatch):
    import huggingface_hub

    from ucai.data.preference_data import read_preferences

    name = "hf://datasets/Anthropic/hh-rlhf@main/harmless-base/test.jsonl.gz"
    runs = {r.label: r for r in pipeline.plan(pipeline.load_pipeline_config(_config(tmp_path, preference_pretraining=name)))}
    assert runs["reward_pretrain"].inputs == [] and f"--data.init_args.path={name}" in runs["reward_pretrain"].args
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        return str(PMP_FILE)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert len(read_preferences(name)) > 0
    assert calls == [("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz", "dataset", "main")]
