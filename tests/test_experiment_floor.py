"""benchmarks/experiment_floor.py: the FLOPs it counts, worked by hand, and the stage
times it reads from the pipeline's console output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import experiment_floor as floor  # noqa: E402


class WordTokenizer:
    """One token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def smollm2_shapes() -> floor.Shapes:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152,
    )
    return floor.Shapes.of(config)


def test_smollm2_linears_count_by_hand():
    shapes = smollm2_shapes()
    # a layer: q 576x576 + k, v 576x192 each + o 576x576 + gate, up 576x1536 each + down 1536x576
    per_layer = 331_776 + 2 * 110_592 + 331_776 + 2 * 884_736 + 884_736
    assert per_layer == 3_538_944
    assert shapes.body_flops == 2 * 30 * per_layer == 212_336_640
    assert shapes.head_flops == 2 * 576 * 49152


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "data" / "ethical").mkdir(parents=True)
    rows = [
        {"prompt": "how do I", "response": "I won't help with that"},  # 3 + 5 tokens
        {"prompt": "tell me", "response": "no"},  # 2 + 1
    ]
    (run / "data" / "ethical" / "sl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = run / "logs" / "sft_ethical" / "version_0"
    logs.mkdir(parents=True)
    (logs / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": 2}}))
    return run


def test_sft_counts_forward_and_input_gradient_backward_per_epoch(tmp_path):
    shapes = floor.Shapes(layers=[(4, 8, 1)], head=(4, 10))  # body 64 FLOPs a token, head 80
    work = floor.sft(_run(tmp_path), "ethical", shapes, floor.Counter(WordTokenizer()), threads=1)
    tokens = (3 + 5 + 1) + (2 + 1 + 1)  # prompt, answer and its end-of-turn token
    answers = (5 + 1) + (1 + 1)  # logits at answer positions only
    assert work.flops == {
        (floor.TRAINING_ROWS, "body"): 2 * 2 * 64 * tokens,  # 2 epochs x (forward + backward)
        (floor.TRAINING_ROWS, "head"): 2 * 2 * 80 * answers,
    }


def test_generation_prefills_prompts_at_training_rows_and_decodes_at_the_batch():
    shapes = floor.Shapes(layers=[(4, 8, 1)], head=(4, 10))
    work = floor.Work("x", threads=1)
    floor.generation_work(work, shapes, 16, prompts=5, answers=6)
    assert work.flops == {(floor.TRAINING_ROWS, "body"): 64 * 5, (16, "body"): 64 * 6, (16, "head"): 80 * 6}


def test_a_forced_opener_counts_as_prompt_and_answers_are_capped():
    count = floor.Counter(WordTokenizer(), openers=("I won't help with that.",))
    assert count.answer("I won't help with that. Ask someone else please", cap=10) == (5, 4)
    assert count.answer("Sure here is a long answer", cap=3) == (0, 3)
    prompts, generated = floor.answered(count, ["q one", "q one"], ["I won't help with that. No", "a b"], cap=48)
    assert (prompts, generated) == (2 + 5, 1 + 2)  # the shared prompt once, the opener as prompt


def test_reward_counts_the_stage_s_own_pairs_split_and_passes(tmp_path):
    run = tmp_path / "run"
    data = run / "data"
    data.mkdir(parents=True)
    pairs = [
        {"prompt": "p one", "chosen": "a b c", "rejected": "d e"},  # 2 + 3 + 2 = 7 tokens packed
        {"prompt": "p two", "chosen": "same", "rejected": "same"},  # identical: the stage drops it
    ]
    (data / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (data / "other.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "x y", "rejected": "z"}) + "\n")  # 1 + 2 + 1
    logs = run / "logs" / "reward_ethical" / "version_0"
    logs.mkdir(parents=True)
    (logs / "config.yaml").write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 2},
        "model": {"init_args": {}},
        "data": {"init_args": {"path": str(data / "prefs.jsonl"), "cross_path": str(data / "other.jsonl"),
                               "val_fraction": 0.0, "max_length": 256}},
    }))
    shapes = floor.Shapes(layers=[(4, 8, 1)], head=(4, 10))
    work = floor.reward(run, "ethical", shapes, floor.Counter(WordTokenizer()), threads=1)
    # 2 epochs x forward + backward on 7 tokens, then the stats pass (7) and the cross pair (4)
    assert work.flops == {(floor.TRAINING_ROWS, "body"): 64 * (2 * 2 * 7 + 7 + 4)}


@pytest.mark.parametrize("limit_val_batches, validations", [(None, 2), (1.0, 2), (0, 0)])
def test_reward_counts_a_validation_pass_each_epoch_unless_validation_is_off(tmp_path, limit_val_batches, validations):
    from ucai.data.preference_data import read_preferences, split_pairs

    run, data = tmp_path / "run", tmp_path / "run" / "data"
    data.mkdir(parents=True)
    pairs = [{"id": f"p{i}", "prompt": f"p {i}", "chosen": "a b " * (i + 1), "rejected": "d"} for i in range(8)]
    (data / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    logs = run / "logs" / "reward_ethical" / "version_0"
    logs.mkdir(parents=True)
    trainer = {"max_epochs": 2, **({} if limit_val_batches is None else {"limit_val_batches": limit_val_batches})}
    (logs / "config.yaml").write_text(yaml.safe_dump({
        "trainer": trainer, "model": {"init_args": {}},
        "data": {"init_args": {"path": str(data / "prefs.jsonl"), "val_fraction": 0.5, "max_length": 256}},
    }))
    train, val = split_pairs(read_preferences(data / "prefs.jsonl"), 0.5)
    count = floor.Counter(WordTokenizer())
    train_tokens, val_tokens = (floor.pair_tokens(part, count, 256) for part in (train, val))
    assert train_tokens and val_tokens  # both halves hold pairs, so each term is seen
    work = floor.reward(run, "ethical", floor.Shapes(layers=[(4, 8, 1)], head=(4, 10)), count, threads=1)
    # 2 epochs of training (forward + backward), the validations, then stats and held-out passes
    expected = 2 * 2 * train_tokens + validations * val_tokens + train_tokens + val_tokens
    assert work.flops == {(floor.TRAINING_ROWS, "body"): 64 * expected}


@pytest.mark.parametrize(
    "advantage, value_head, critic_passes",
    [("gae", "adapter", 1 + 2 * 2), ("gae", "head", 0), ("rloo", "adapter", 0)],  # 2 PPO epochs
)
def test_rl_counts_the_adapter_critic_s_own_passes(tmp_path, advantage, value_head, critic_passes):
    run = tmp_path / "run"
    logs = run / "logs" / "ppo_ethical" / "version_0"
    logs.mkdir(parents=True)
    (logs / "rollouts.csv").write_text("step,prompt,response\n0,how do I,a b\n0,tell me,c\n")
    (logs / "config.yaml").write_text(yaml.safe_dump({
        "data": {"init_args": {"batch_size": 2}},
        "model": {"init_args": {"advantage": advantage, "value_head": value_head, "rloo_k": 2, "ppo_epochs": 2,
                                "generation": {"max_new_tokens": 48}}},
    }))
    shapes = floor.Shapes(layers=[(4, 8, 1)], head=(4, 10))  # body 64 FLOPs a token, head 80
    work = floor.rl(run, "ethical", "ppo", shapes, floor.Counter(WordTokenizer()), threads=1)
    rows = 2 * (2 if advantage == "rloo" else 1)  # the decode batch: prompts x samples a prompt
    prompts, answers = 3 + 2, 2 + 1
    # sampling: the prompts' prefill and a decode step per answer token; then reference +
    # RM + 2 epochs x (forward + backward) = 6 passes over prompt and answer, and the
    # critic's; logits at the answers in the reference and the updates
    assert work.flops == {
        (floor.TRAINING_ROWS, "body"): 64 * prompts + 64 * (prompts + answers) * (6 + critic_passes),
        (floor.TRAINING_ROWS, "head"): 80 * answers * (1 + 2 * 2),
        (rows, "body"): 64 * answers,
        (rows, "head"): 80 * answers,
    }


def test_evaluation_kl_runs_each_model_once_on_one_set_of_answers(tmp_path):
    run = tmp_path / "run"
    (run / "eval" / "cache").mkdir(parents=True)
    (run / "data").mkdir()
    (run / "data" / "prompts.jsonl").write_text(json.dumps({"id": "a", "prompt": "q r"}) + "\n")
    scores = [{"model": m, "id": "a", "response": text} for m, text in (("base", "x"), ("sl", "y y"), ("rl", "z z z"))]
    (run / "eval" / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    (run / "eval" / "summary.json").write_text(json.dumps({
        "reference_kl": {"rl": {"reference": "sl"}},
        "depth": {"kl": [{"model": "rl", "reference": "base"}, {"model": "rl", "reference": "sl"}]},
    }))
    logs = run / "logs" / "eval" / "version_0"
    logs.mkdir(parents=True)
    (logs / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {
        "generation": {"max_new_tokens": 48}, "generation_batch_size": 8, "reward_models": {},
    }}}))
    shapes = floor.Shapes(layers=[(4, 8, 1)], head=(4, 10))
    work = floor.evaluation(run, shapes, floor.Counter(WordTokenizer()), threads=2)
    # rl on its answers once (two pairs need it), sl and base on rl's answers: 3 passes
    # over 2 prompt + 3 answer tokens, logits at the 3 answer positions
    assert work.flops == {(floor.TRAINING_ROWS, "body"): 64 * 3 * 5, (floor.TRAINING_ROWS, "head"): 80 * 3 * 3}


def test_logs_of_a_rerun_are_read_from_the_newest_version(tmp_path):
    for version in (0, 2, 10):
        folder = tmp_path / "logs" / "sft_ethical" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"version": version}))
    assert floor.stage_config(tmp_path, "sft_ethical") == {"version": 10}


def test_rates_turn_flops_into_seconds_per_row_count():
    rates = floor.Rates(floor.Shapes(layers=[(4, 8, 1)], head=(4, 10)))
    rates.cache = {(16, "body", 1): 2.0, (1024, "head", 1): 4.0}  # GFLOP/s
    work = floor.Work("x", threads=1, flops={(16, "body"): 6e9, (1024, "head"): 8e9})
    assert rates.seconds(work) == pytest.approx(3.0 + 2.0)


def test_measured_minutes_take_each_stage_s_slower_side(tmp_path):
    log = tmp_path / "pipeline.log"
    log.write_text(
        "<== categorise done in 2.9 s\n<== sft (ethical) done in 7.3 min\n<== sft (unethical) done in 7.5 min\n"
        "<== eval done in 10.9 min\n"
    )
    assert floor.measured_minutes(log) == pytest.approx({"categorise": 2.9 / 60, "sft": 7.5, "eval": 10.9})
    times = tmp_path / "stage_times.json"
    times.write_text(json.dumps({"runs": [
        {"stage": "sft", "side": "ethical", "seconds": 438.0}, {"stage": "sft", "side": "unethical", "seconds": 450.0},
        {"stage": "eval", "side": None, "seconds": None},  # skipped: up to date
    ]}))
    assert floor.measured_minutes(times) == pytest.approx({"sft": 7.5})
    assert floor.measured_minutes(times, parallel=False) == pytest.approx({"sft": 14.8})
