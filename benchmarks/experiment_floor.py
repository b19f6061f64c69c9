"""The matmul floor of a finished CPU experiment on this machine, stage by stage.

    python benchmarks/experiment_floor.py --run lightning_logs/experiment_cpu --log experiment.log

Counts the linear-layer FLOPs that each stage of a finished run could not have avoided,
from the run's own outputs (the tokens it generated, trained on and scored) and its
stage configs (epochs, batch sizes), and divides them by the rate this machine's
``torch.nn.functional.linear`` reaches at the model's shapes, at the stage's row count
and thread count, measured in this process. The count is a lower bound on purpose:

* only the linear layers and the output head (attention, norms, sampling, Python: 0);
* prompts as their user text alone (no chat template, no system prompt), each once
  per group that could share it; answers capped at ``max_new_tokens``;
* training as forward plus the input-gradient backward (the base weights are frozen
  under LoRA, so no weight gradient), logits only where a loss needs them;
* nothing for the judge check, the embedding scores or model loading.

No implementation of the same work can run faster on this machine in this precision.
Each stage's measured time (from the run's ``stage_times.json``, or ``--log``: the
pipeline's console output) and its ratio to the floor are printed as well. The two sides of
a stage run at once with half the threads each (``parallel_sides``), so a stage's floor
is its slower side's. The last line: ``experiment_floor: floor_min=F measured_min=M
floor_ratio=M/F``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

from harness import set_threads  # noqa: E402

SIDES = ("ethical", "unethical")
TRAINING_ROWS = 1024  # matmul rows of a training or scoring batch (8 pairs x ~170 tokens)


@dataclass
class Shapes:
    """The model's linear layers as (in, out, count per token) and its output head."""

    layers: list[tuple[int, int, int]]
    head: tuple[int, int]

    @classmethod
    def of(cls, config) -> Shapes:
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        n = config.num_hidden_layers
        return cls(
            layers=[(hidden, q, n), (hidden, kv, 2 * n), (q, hidden, n), (hidden, inter, 2 * n), (inter, hidden, n)],
            head=(hidden, config.vocab_size),
        )

    @property
    def body_flops(self) -> float:
        """Forward FLOPs of the decoder's linears for one token."""
        return sum(2.0 * k * n * count for k, n, count in self.layers)

    @property
    def head_flops(self) -> float:
        return 2.0 * self.head[0] * self.head[1]


@dataclass
class Work:
    """One stage of one side: FLOPs by (rows of the matmul, body or head)."""

    stage: str
    threads: int
    flops: dict[tuple[int, str], float] = field(default_factory=dict)

    def add(self, rows: int, part: str, flops: float) -> None:
        self.flops[(rows, part)] = self.flops.get((rows, part), 0.0) + flops


class Rates:
    """GFLOP/s of ``F.linear`` at the model's shapes, measured once per (rows, part, threads)."""

    def __init__(self, shapes: Shapes):
        self.shapes = shapes
        self.cache: dict[tuple[int, str, int], float] = {}

    def __call__(self, rows: int, part: str, threads: int) -> float:
        key = (rows, part, threads)
        if key not in self.cache:
            set_threads(threads)
            shapes = [(k, n, c) for k, n, c in self.shapes.layers] if part == "body" else [(*self.shapes.head, 1)]
            seconds = flops = 0.0
            for k, n, count in shapes:
                x, w = torch.randn(rows, k), torch.randn(n, k)
                F.linear(x, w)
                repeats = max(3, int(3e9 / (2 * rows * k * n)))
                times = []
                for _ in range(5):  # the best of five: a floor is what the machine can reach
                    start = time.perf_counter()
                    for _ in range(repeats):
                        F.linear(x, w)
                    times.append((time.perf_counter() - start) / repeats)
                seconds += min(times) * count
                flops += 2.0 * rows * k * n * count
            self.cache[key] = flops / seconds / 1e9
        return self.cache[key]

    def seconds(self, work: Work) -> float:
        return sum(flops / (self(rows, part, work.threads) * 1e9) for (rows, part), flops in work.flops.items())


class Counter:
    """Token counts with the run's tokenizer: user text alone, answers capped."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.memo: dict[str, int] = {}

    def __call__(self, text: str, cap: int | None = None) -> int:
        if text not in self.memo:
            self.memo[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return min(self.memo[text], cap) if cap else self.memo[text]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_config(run: Path, name: str) -> dict:
    return yaml.safe_load((run / "logs" / name / "version_0" / "config.yaml").read_text())


def generation_work(work: Work, shapes: Shapes, rows: int, prompts: list[int], answers: list[int]) -> None:
    """Prefill of each prompt (body only) and one step per answer token (body and head) at ``rows``."""
    work.add(TRAINING_ROWS, "body", shapes.body_flops * sum(prompts))
    work.add(rows, "body", shapes.body_flops * sum(answers))
    work.add(rows, "head", shapes.head_flops * sum(answers))


def critique_revision(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, f"critique_revision_{side}")
    cap = cfg["model"]["init_args"]["generation"]["max_new_tokens"]
    rows = read_jsonl(run / "data" / side / "sl.jsonl")
    work = Work("critique_revision", threads)
    generation_work(
        work, shapes, cfg["data"]["init_args"]["batch_size"],
        [count(r["prompt"]) for r in rows], [count(r["response"], cap) for r in rows],
    )
    return work


def sft(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    epochs = stage_config(run, f"sft_{side}")["trainer"]["max_epochs"]
    rows = read_jsonl(run / "data" / side / "sl.jsonl")
    work = Work("sft", threads)
    tokens = sum(count(r["prompt"]) + count(r["response"]) + 1 for r in rows)
    answers = sum(count(r["response"]) + 1 for r in rows)
    work.add(TRAINING_ROWS, "body", epochs * 2 * shapes.body_flops * tokens)  # forward + input-gradient backward
    work.add(TRAINING_ROWS, "head", epochs * 2 * shapes.head_flops * answers)
    return work


def preferences(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, f"preferences_{side}")
    cap = cfg["model"]["init_args"]["generation"]["max_new_tokens"]
    rows = read_jsonl(run / "data" / side / "preferences.jsonl")
    work = Work("preferences", threads)
    generation_work(
        work, shapes, 2 * cfg["data"]["init_args"]["batch_size"],
        [count(r["prompt"]) for r in rows], [count(r["chosen"], cap) + count(r["rejected"], cap) for r in rows],
    )
    return work


def pair_tokens(rows: list[dict], count: Counter) -> float:
    """Tokens of a packed pair row: the prompt once, both answers."""
    return float(sum(count(r["prompt"]) + count(r["chosen"]) + count(r["rejected"]) for r in rows))


def reward(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, f"reward_{side}")
    epochs, val_fraction = cfg["trainer"]["max_epochs"], cfg["data"]["init_args"]["val_fraction"]
    rows = read_jsonl(run / "data" / side / "preferences.jsonl")
    other = SIDES[1 - SIDES.index(side)]
    cross = read_jsonl(run / "data" / other / "preferences.jsonl") if cfg["data"]["init_args"].get("cross_path") else []
    total = pair_tokens(rows, count)
    val = total * val_fraction
    work = Work("reward", threads)
    work.add(TRAINING_ROWS, "body", shapes.body_flops * (
        epochs * 2 * (total - val)  # training: forward + input-gradient backward
        + epochs * val  # validation each epoch
        + total  # stats on the training pairs and held-out accuracy on the validation pairs
        + pair_tokens(cross, count)  # accuracy on the other side's pairs
    ))
    return work


def rl(run: Path, side: str, stage: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, f"{stage}_{side}")
    model = cfg["model"]["init_args"]
    cap, epochs = model["generation"]["max_new_tokens"], model["ppo_epochs"]
    with open(run / "logs" / f"{stage}_{side}" / "version_0" / "rollouts.csv", newline="") as handle:
        episodes = list(csv.DictReader(handle))
    groups = {(e["step"], e["prompt"]) for e in episodes}  # episodes of one prompt share it
    prompts = sum(count(prompt) for _, prompt in groups)
    answers = sum(count(e["response"], cap) for e in episodes)
    rows = cfg["data"]["init_args"]["batch_size"] * model.get("rloo_k", 1)
    work = Work(stage, threads)
    generation_work(work, shapes, rows, [prompts], [answers])
    forward = prompts + answers
    work.add(TRAINING_ROWS, "body", shapes.body_flops * (
        2 * forward  # policy and reference log-probs of the rollout
        + forward  # reward-model scores
        + epochs * 2 * forward  # the updates: forward + input-gradient backward
    ))
    work.add(TRAINING_ROWS, "head", shapes.head_flops * answers * (2 + epochs * 2))
    return work


def evaluation(run: Path, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, "eval")["model"]["init_args"]
    cap, rows = cfg["generation"]["max_new_tokens"], cfg["generation_batch_size"]
    prompt_of = {r["id"]: r["prompt"] for r in read_jsonl(run / "data" / "prompts.jsonl")}
    work = Work("eval", threads)
    answers = [row for cache in sorted((run / "eval" / "cache").glob("*.jsonl")) for row in read_jsonl(cache)]
    generation_work(
        work, shapes, min(rows, 96), [count(prompt_of[a["id"]]) for a in answers],
        [count(a["response"], cap) for a in answers],
    )
    scored = read_jsonl(run / "eval" / "scores.jsonl") + read_jsonl(run / "eval" / "depth_scores.jsonl")
    train_answers = [a for cache in (run / "eval" / "cache").glob("*.jsonl") if "prefilled" not in cache.name
                     for a in read_jsonl(cache) if cache.name.split("-")[0] != "base"]
    heldout = {r["id"] for r in scored}
    texts = scored + [{"id": a["id"], "response": a["response"]} for a in train_answers if a["id"] not in heldout]
    reward_models = len(cfg.get("reward_models") or {})
    distinct_prompts = {t["id"] for t in texts}
    work.add(TRAINING_ROWS, "body", shapes.body_flops * reward_models * (
        sum(count(prompt_of[i]) for i in distinct_prompts) + sum(count(t["response"]) for t in texts)
    ))
    summary = json.loads((run / "eval" / "summary.json").read_text())
    pairs = len(summary.get("reference_kl", {})) + sum(
        1 for k in summary.get("depth", {}).get("kl", []) if (k["model"], k["reference"]) not in {
            (m, v["reference"]) for m, v in summary.get("reference_kl", {}).items()
        }
    )
    per_model = [r for r in read_jsonl(run / "eval" / "scores.jsonl")]
    tokens_per_model = statistics.mean(count(prompt_of[r["id"]]) + count(r["response"]) for r in per_model)
    answer_tokens = statistics.mean(count(r["response"]) for r in per_model)
    n = len({r["id"] for r in per_model})
    work.add(TRAINING_ROWS, "body", shapes.body_flops * pairs * 2 * n * tokens_per_model)  # model and reference
    work.add(TRAINING_ROWS, "head", shapes.head_flops * pairs * 2 * n * answer_tokens)
    return work


def measured_minutes(log: Path) -> dict[str, float]:
    """Stage -> minutes of its slower side, from the pipeline's ``stage_times.json`` or
    from its console output (the ``<== stage (side) done in`` lines)."""
    out: dict[str, float] = {}
    if log.suffix == ".json":
        found = [(r["stage"], r["seconds"] / 60) for r in json.loads(log.read_text())["runs"] if r["seconds"] is not None]
    else:
        found = [
            (stage, float(value) / 60 if unit == "s" else float(value))
            for stage, value, unit in re.findall(r"<== (\w+)(?: \(\w+\))? done in ([\d.]+) (s|min)", log.read_text())
        ]
    for stage, minutes in found:
        out[stage] = max(out.get(stage, 0.0), minutes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("lightning_logs/experiment_cpu"), help="the pipeline's output_root")
    parser.add_argument(
        "--log", type=Path,
        help="the pipeline's console output, for the measured stage times (default: RUN/stage_times.json)",
    )
    parser.add_argument("--threads", type=int, default=None, help="threads of the machine (default: torch's)")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    model = args.run / "models" / SIDES[0] / "sl_model"
    shapes = Shapes.of(AutoConfig.from_pretrained(model))
    count = Counter(AutoTokenizer.from_pretrained(model))
    threads = args.threads or torch.get_num_threads()
    side_threads = max(threads // 2, 1)
    rl_stage = next(s for s in ("rloo", "ppo", "dpo") if (args.run / "logs" / f"{s}_{SIDES[0]}").is_dir())
    if rl_stage == "dpo":
        raise SystemExit("experiment_floor: counts PPO/RLOO rollouts; this run trained DPO")
    per_stage: dict[str, list[Work]] = {}
    for side in SIDES:
        for work in (
            critique_revision(args.run, side, shapes, count, side_threads),
            sft(args.run, side, shapes, count, side_threads),
            preferences(args.run, side, shapes, count, side_threads),
            reward(args.run, side, shapes, count, side_threads),
            rl(args.run, side, rl_stage, shapes, count, side_threads),
        ):
            per_stage.setdefault(work.stage, []).append(work)
    per_stage["eval"] = [evaluation(args.run, shapes, count, threads)]

    rates = Rates(shapes)
    log = args.log or args.run / "stage_times.json"
    measured = measured_minutes(log) if log.is_file() else {}
    print(f"model linears: {shapes.body_flops / 2e6:.1f} M weights a token, head {shapes.head_flops / 2e6:.1f} M; "
          f"threads: {side_threads} a side, {threads} for the evaluation")
    for (rows, part, t), _ in sorted({(r, p, w.threads): 0 for ws in per_stage.values() for w in ws for (r, p) in w.flops}.items()):
        print(f"  F.linear rate, {rows:>5} rows, {part}, {t} thread(s): {rates(rows, part, t):6.1f} GFLOP/s")
    floor_total = measured_total = 0.0
    print(f"{'stage':<18}{'TFLOP (slower side)':>20}{'floor min':>11}{'measured min':>14}{'ratio':>7}")
    for stage, works in per_stage.items():
        slowest = max(works, key=rates.seconds)
        floor = rates.seconds(slowest) / 60
        floor_total += floor
        took = measured.get(stage)
        measured_total += took or 0.0
        ratio = f"{took / floor:7.2f}" if took else f"{'':>7}"
        print(f"{stage:<18}{sum(slowest.flops.values()) / 1e12:>20.1f}{floor:>11.2f}{(took or float('nan')):>14.1f}{ratio}")
    ratio = measured_total / floor_total if measured else float("nan")
    print(f"experiment_floor: floor_min={floor_total:.1f} measured_min={measured_total:.1f} floor_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
