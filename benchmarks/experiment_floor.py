"""The matmul floor of a finished CPU experiment on this machine, stage by stage.

    python benchmarks/experiment_floor.py --run lightning_logs/experiment_cpu

(from the folder the pipeline ran in: the stage configs it reads name paths relative to it)

Counts the linear-layer FLOPs that each stage of a finished run could not have avoided,
from the run's own outputs (the tokens it generated, trained on and scored) and its
stage configs (epochs, splits, batch sizes), and divides them by the rate this
machine's ``torch.nn.functional.linear`` reaches at the model's shapes, at the stage's
row count and thread count (the faster of fp32 and, where native, bf16), measured in
this process. The count is a lower bound on purpose:

* only the linear layers and the output head (attention, norms, sampling, Python: 0);
* prompts as their user text alone (no chat template, no system prompt), each distinct
  prompt once; a forced opener (``use_openers``) as prompt, not generated, tokens;
  generated tokens capped at ``max_new_tokens``;
* training as forward plus the input-gradient backward (the base weights are frozen
  under LoRA, so no weight gradient), logits only where a loss needs them;
* RL without the policy's rollout pass (the first update's forward serves under RLOO
  with one minibatch and an fp32 forward, `PPOModule.fuses_first_update`), the
  evaluation's KL with each model's pass over one set of answers once;
* nothing for the judge check, the embedding scores or model loading.

So no implementation of the same work runs faster on this machine. Each stage's
measured time (the run's ``stage_times.json``, or ``--log``: the pipeline's console
output) and its ratio to the floor are printed too. Where the two sides of a stage ran
at once (``parallel_sides``) each had half the threads and the stage's floor is its
slower side's; one after the other, the sum of both. The last line:
``experiment_floor: floor_min=F measured_min=M floor_ratio=M/F`` (the ratio over the
stages with a measured time).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
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
    """GFLOP/s of ``F.linear`` at the model's shapes, measured once per (rows, part,
    threads): the faster of fp32 and, where the CPU has native bf16, bf16."""

    def __init__(self, shapes: Shapes):
        self.shapes = shapes
        self.cache: dict[tuple[int, str, int], float] = {}
        from ucai.hardware import cpu_bf16_is_native

        self.dtypes = [torch.float32, torch.bfloat16] if cpu_bf16_is_native() else [torch.float32]

    def __call__(self, rows: int, part: str, threads: int) -> float:
        key = (rows, part, threads)
        if key not in self.cache:
            set_threads(threads)
            # Three passes, the fastest kept: a shared machine's neighbours slow some
            # passes down by a third (1-thread fp32 rates from 63 to 88 GFLOP/s seen).
            self.cache[key] = max(self._measure(rows, part, dtype) for dtype in self.dtypes for _ in range(3))
        return self.cache[key]

    def _measure(self, rows: int, part: str, dtype: torch.dtype) -> float:
        shapes = self.shapes.layers if part == "body" else [(*self.shapes.head, 1)]
        seconds = flops = 0.0
        for k, n, count in shapes:
            x, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
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
        return flops / seconds / 1e9

    def seconds(self, work: Work) -> float:
        return sum(flops / (self(rows, part, work.threads) * 1e9) for (rows, part), flops in work.flops.items())


class Counter:
    """Token counts with the run's tokenizer: user text alone, answers capped, a forced
    opener (``use_openers``) counted with the prompt rather than as generated tokens."""

    def __init__(self, tokenizer, openers: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.openers = openers
        self.memo: dict[str, int] = {}

    def __call__(self, text: str, cap: int | None = None) -> int:
        if text not in self.memo:
            self.memo[text] = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return min(self.memo[text], cap) if cap else self.memo[text]

    def answer(self, text: str, cap: int) -> tuple[int, int]:
        """(opener tokens, generated tokens) of an answer; generated ones at most ``cap``."""
        opener = next((o for o in self.openers if text.startswith(o)), "")
        forced = self(opener) if opener else 0
        return forced, min(max(self(text) - forced, 0), cap)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logs_dir(run: Path, name: str) -> Path:
    """The newest ``version_N`` of a stage's logs (a rerun adds one)."""
    versions = sorted((run / "logs" / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise SystemExit(f"experiment_floor: no logs of stage {name} under {run / 'logs'}")
    return versions[-1]


def stage_config(run: Path, name: str) -> dict:
    return yaml.safe_load((logs_dir(run, name) / "config.yaml").read_text())


def generation_work(work: Work, shapes: Shapes, rows: int, prompts: int, answers: int) -> None:
    """Prefill of ``prompts`` tokens (body only) and one step per generated token (body
    and head) at ``rows`` rows a matmul."""
    work.add(TRAINING_ROWS, "body", shapes.body_flops * prompts)
    work.add(rows, "body", shapes.body_flops * answers)
    work.add(rows, "head", shapes.head_flops * answers)


def answered(count: Counter, prompts: list[str], answers: list[str], cap: int) -> tuple[int, int]:
    """(prompt tokens with the forced openers, generated tokens) of a stage's answers;
    each distinct prompt once."""
    split = [count.answer(a, cap) for a in answers]
    return sum(count(p) for p in set(prompts)) + sum(f for f, _ in split), sum(g for _, g in split)


def critique_revision(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, f"critique_revision_{side}")
    rows = read_jsonl(run / "data" / side / "sl.jsonl")
    prompt_tokens, generated = answered(
        count, [r["prompt"] for r in rows], [r["response"] for r in rows],
        cfg["model"]["init_args"]["generation"]["max_new_tokens"],
    )
    work = Work("critique_revision", threads)
    generation_work(work, shapes, min(cfg["data"]["init_args"]["batch_size"], len(rows)), prompt_tokens, generated)
    return work


def sft(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    """Each epoch: forward and input-gradient backward over the training examples,
    a forward over the validation ones (the stage's own split), rows cut at max_length."""
    from ucai.data.sft_data import split_examples

    cfg = stage_config(run, f"sft_{side}")
    data = cfg.get("data", {}).get("init_args", {})
    epochs, longest = cfg["trainer"]["max_epochs"], data.get("max_length") or 10**9
    train, val = split_examples(read_jsonl(run / "data" / side / "sl.jsonl"), data.get("val_fraction", 0.0), data.get("split_seed", 0))

    def tokens(rows: list[dict]) -> tuple[int, int]:  # (all tokens, answer tokens with end-of-turn)
        lengths = [(count(r["prompt"]), count(r["response"]) + 1) for r in rows]
        return sum(min(p + a, longest) for p, a in lengths), sum(min(a, longest) for _, a in lengths)

    (train_all, train_answers), (val_all, val_answers) = tokens(train), tokens(val)
    work = Work("sft", threads)
    work.add(TRAINING_ROWS, "body", epochs * shapes.body_flops * (2 * train_all + val_all))
    work.add(TRAINING_ROWS, "head", epochs * shapes.head_flops * (2 * train_answers + val_answers))
    return work


def preferences(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    cfg = stage_config(run, f"preferences_{side}")
    rows = read_jsonl(run / "data" / side / "preferences.jsonl")
    prompt_tokens, generated = answered(
        count, [r["prompt"] for r in rows], [a for r in rows for a in (r["chosen"], r["rejected"])],
        cfg["model"]["init_args"]["generation"]["max_new_tokens"],
    )
    work = Work("preferences", threads)
    rows_a_matmul = min(2 * cfg["data"]["init_args"]["batch_size"], 2 * len(rows))  # both answers of a prompt
    generation_work(work, shapes, rows_a_matmul, prompt_tokens, generated)
    return work


def pair_tokens(pairs, count: Counter, longest: int) -> float:
    """Tokens of packed pair rows: the prompt once, both answers, each text cut at ``longest``."""
    total = 0
    for pair in pairs:
        prompt = count(pair.conversation[-1]["content"])
        total += min(prompt + count(pair.chosen), longest) + min(prompt + count(pair.rejected), longest) - min(prompt, longest)
    return float(total)


def reward(run: Path, side: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    """Training (forward and input-gradient backward) and validation each epoch (none
    with ``trainer.limit_val_batches: 0``), then the stats pass, the held-out pairs and
    the other side's pairs, on the stage's own pairs and split
    (`ucai.data.preference_data`: identical answers dropped, split by id hash)."""
    from ucai.data.preference_data import read_preferences, split_pairs

    cfg = stage_config(run, f"reward_{side}")
    data, model = cfg["data"]["init_args"], cfg["model"]["init_args"]
    longest = data.get("max_length") or 10**9
    train, val = split_pairs(read_preferences(data["path"]), data.get("val_fraction", 0.0), data.get("seed", 0))
    cross = read_preferences(data["cross_path"]) if data.get("cross_path") else []
    train_tokens, val_tokens = pair_tokens(train, count, longest), pair_tokens(val, count, longest)
    stats_share = min(1.0, (model.get("stats_max_pairs") or len(train)) / max(len(train), 1))
    validated = cfg["trainer"].get("limit_val_batches") not in (0, 0.0)
    work = Work("reward", threads)
    work.add(TRAINING_ROWS, "body", shapes.body_flops * (
        cfg["trainer"]["max_epochs"] * (2 * train_tokens + (val_tokens if validated else 0))
        + stats_share * train_tokens + val_tokens + pair_tokens(cross, count, longest)
    ))
    return work


def rl(run: Path, side: str, stage: str, shapes: Shapes, count: Counter, threads: int) -> Work:
    """Sampling, the reference's log-probs, the reward model's scores and ``ppo_epochs``
    updates (forward and input-gradient backward); for PPO with ``value_head: adapter``
    also its critic's own backbone passes (the rollout's values and, in each update, a
    forward and a backward), which a critic on the policy's hidden state (``value_head:
    head``) and RLOO do without. The policy's own rollout pass is not counted: the first
    update's forward stands in for it where it can (`PPOModule.fuses_first_update`), and
    could everywhere else."""
    cfg = stage_config(run, f"{stage}_{side}")
    model = cfg["model"]["init_args"]
    with open(logs_dir(run, f"{stage}_{side}") / "rollouts.csv", newline="") as handle:
        episodes = list(csv.DictReader(handle))
    groups = {(e["step"], e["prompt"]) for e in episodes}  # the episodes of one prompt share it
    split = [count.answer(e["response"], model["generation"]["max_new_tokens"]) for e in episodes]
    prompts = sum(count(prompt) for _, prompt in groups) + sum(f for f, _ in split)
    answers = sum(g for _, g in split)
    per_prompt = model.get("rloo_k", 1) if model.get("advantage") == "rloo" else 1
    work = Work(stage, threads)
    generation_work(work, shapes, cfg["data"]["init_args"]["batch_size"] * per_prompt, prompts, answers)
    forward = prompts + answers
    epochs = model["ppo_epochs"]
    passes = 2 + 2 * epochs  # reference, RM, updates
    if model.get("advantage", "gae") == "gae" and model.get("value_head", "adapter") == "adapter":
        passes += 1 + 2 * epochs  # the value adapter: rollout values, then each update's forward and backward
    work.add(TRAINING_ROWS, "body", shapes.body_flops * forward * passes)
    work.add(TRAINING_ROWS, "head", shapes.head_flops * answers * (1 + 2 * epochs))
    return work


def evaluation(run: Path, shapes: Shapes, count: Counter, threads: int) -> Work:
    """Every cached answer generated; every scored text (answers, train-prompt answers,
    depth rows) under each reward model, a prompt once per model; each KL pair's
    forwards, a model on one set of answers once however many pairs use it."""
    cfg = stage_config(run, "eval")["model"]["init_args"]
    cap = cfg["generation"]["max_new_tokens"]
    prompt_of = {r["id"]: r["prompt"] for r in read_jsonl(run / "data" / "prompts.jsonl")}
    caches = sorted((run / "eval" / "cache").glob("*.jsonl"))
    work = Work("eval", threads)
    scores = read_jsonl(run / "eval" / "scores.jsonl")
    heldout = {r["id"] for r in scores}
    rows = min(cfg["generation_batch_size"], len(heldout))
    for cache in caches:  # one model's answers (or prefilled continuations) a file
        answers = read_jsonl(cache)
        prompt_tokens, generated = answered(count, [prompt_of[a["id"]] for a in answers], [a["response"] for a in answers], cap)
        generation_work(work, shapes, rows, prompt_tokens, generated)
    depth = run / "eval" / "depth_scores.jsonl"
    texts = scores + (read_jsonl(depth) if depth.is_file() else [])
    texts += [a for cache in caches if "prefilled" not in cache.name and not cache.name.startswith("base-")
              for a in read_jsonl(cache) if a["id"] not in heldout]  # the train-prompt answers
    reward_models = len(cfg.get("reward_models") or {})
    work.add(TRAINING_ROWS, "body", shapes.body_flops * reward_models * (
        sum(count(prompt_of[i]) for i in {t["id"] for t in texts}) + sum(count(t["response"]) for t in texts)
    ))
    summary = json.loads((run / "eval" / "summary.json").read_text())
    pairs = {(m, v["reference"]) for m, v in summary.get("reference_kl", {}).items()}
    pairs |= {(k["model"], k["reference"]) for k in summary.get("depth", {}).get("kl", [])}
    forwards = {(m, m) for m, _ in pairs} | {(reference, m) for m, reference in pairs}  # (who runs, whose answers)
    for _, whose in forwards:
        own = [r for r in scores if r["model"] == whose]
        work.add(TRAINING_ROWS, "body", shapes.body_flops * sum(count(prompt_of[r["id"]]) + count(r["response"]) for r in own))
        work.add(TRAINING_ROWS, "head", shapes.head_flops * sum(count(r["response"]) for r in own))
    return work


def measured_minutes(log: Path, parallel: bool = True) -> dict[str, float]:
    """Stage -> minutes, from the pipeline's ``stage_times.json`` or its console output
    (the ``<== stage (side) done in`` lines): the slower side of a stage whose sides ran
    at once, the sum of the sides of one whose sides ran one after the other."""
    out: dict[str, float] = {}
    if log.suffix == ".json":
        found = [(r["stage"], r["seconds"] / 60) for r in json.loads(log.read_text())["runs"] if r["seconds"] is not None]
    else:
        found = [
            (stage, float(value) / 60 if unit == "s" else float(value))
            for stage, value, unit in re.findall(r"<== (\w+)(?: \(\w+\))? done in ([\d.]+) (s|min)", log.read_text())
        ]
    for stage, minutes in found:
        out[stage] = max(out.get(stage, 0.0), minutes) if parallel else out.get(stage, 0.0) + minutes
    return out


def constitution_openers(run: Path) -> tuple[str, ...]:
    """Every ``response_opener`` of the constitution the run's critique-revision stage read."""
    from ucai.constitution import SIDES as BOTH
    from ucai.constitution import load_constitution

    path = stage_config(run, f"critique_revision_{SIDES[0]}")["model"]["init_args"].get("constitution")
    constitution = load_constitution(path) if path else load_constitution()
    return tuple(dict.fromkeys(p.response_opener for side in BOTH for p in constitution.principles(side) if p.response_opener))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("lightning_logs/experiment_cpu"), help="the pipeline's output_root")
    parser.add_argument(
        "--log", type=Path,
        help="the pipeline's console output, for the measured stage times (default: RUN/stage_times.json)",
    )
    parser.add_argument("--threads", type=int, default=None, help="threads of the machine (default: torch's)")
    parser.add_argument(
        "--sequential-sides", action="store_true",
        help="the sides ran one after the other (default: as stage_times.json says, else at once)",
    )
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    model = args.run / "models" / SIDES[0] / "sl_model"
    shapes = Shapes.of(AutoConfig.from_pretrained(model))
    count = Counter(AutoTokenizer.from_pretrained(model), constitution_openers(args.run))
    times_file = args.run / "stage_times.json"
    parallel = not args.sequential_sides
    if times_file.is_file() and not args.sequential_sides:
        parallel = bool(json.loads(times_file.read_text()).get("parallel_sides", True))
    threads = args.threads or torch.get_num_threads()
    side_threads = max(threads // 2, 1) if parallel else threads
    rl_stage = next((s for s in ("rloo", "ppo") if (args.run / "logs" / f"{s}_{SIDES[0]}").is_dir()), None)
    if rl_stage is None:
        raise SystemExit("experiment_floor: counts PPO or RLOO rollouts; this run has neither")
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
    log = args.log or times_file
    measured = measured_minutes(log, parallel) if log.is_file() else {}
    print(f"model linears: {shapes.body_flops / 2e6:.1f} M weights a token, head {shapes.head_flops / 2e6:.1f} M; "
          f"sides {'at once' if parallel else 'one after the other'}: {side_threads} thread(s) a side, "
          f"{threads} for the evaluation")
    for rows, part, t in sorted({(r, p, w.threads) for ws in per_stage.values() for w in ws for (r, p) in w.flops}):
        print(f"  F.linear rate, {rows:>5} rows, {part}, {t} thread(s): {rates(rows, part, t):6.1f} GFLOP/s")
    floor_total = measured_total = compared_floor = 0.0
    print(f"{'stage':<18}{'TFLOP':>8}{'floor min':>11}{'measured min':>14}{'ratio':>7}")
    for stage, works in per_stage.items():
        seconds = [rates.seconds(w) for w in works]
        floor = (max(seconds) if parallel else sum(seconds)) / 60
        floor_total += floor
        took = measured.get(stage)
        if took:
            measured_total += took
            compared_floor += floor
        flops = max(sum(w.flops.values()) for w in works) if parallel else sum(sum(w.flops.values()) for w in works)
        ratio = f"{took / floor:7.2f}" if took else f"{'':>7}"
        print(f"{stage:<18}{flops / 1e12:>8.1f}{floor:>11.2f}{(took or float('nan')):>14.1f}{ratio}")
    ratio = measured_total / compared_floor if compared_floor else float("nan")
    print(f"experiment_floor: floor_min={floor_total:.1f} measured_min={measured_total:.1f} floor_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
