"""Reward-model training throughput and memory: ucai's RewardModule vs TRL's RewardTrainer.

    python benchmarks/reward.py                 # full run (about 20 minutes on 2 cores)
    python benchmarks/reward.py --steps 4 --repeats 1   # a quick look, not a result

Both sides train SmolLM2-135M-Instruct with a scalar head, LoRA r=8 (alpha 16,
dropout 0.05) on q_proj/v_proj, AdamW lr 1e-4, bf16 autocast on CPU, batch 4 pairs
(TRL: one forward of 8 sequences; ucai: 4 packed rows), on the same hh-rlhf pairs rendered with
the same chat template into the same token ids (pairs longer than ``--max-length``
are left out beforehand, since TRL drops them while ucai would truncate them). Each
side runs ``--warmup-epochs`` untimed epochs over those pairs, then one timed epoch:
every side is timed on exactly the same pairs, however it batches them, and the figure
is pairs / summed step time (a median of step times would depend on how each side
happens to group long and short pairs). Each configuration runs in its own
subprocess, and peak memory is that process's maximum resident set size.

Configurations, each ``--repeats`` times in alternating order, medians compared:

* ucai at its defaults: each pair packed into one row, the shared conversation once
  (`ucai.reward_scoring.packed_pair_rewards`), bf16 frozen linear weights;
* ucai without ``frozen_linear_bf16`` (fp32 frozen weights, as TRL keeps them): its
  memory ratio against the peer says how much of ucai's memory saving that option is;
* ucai with gradient checkpointing, to compare with TRL's defaults like for like;
* TRL at its defaults (gradient checkpointing on), without gradient checkpointing, and
  without it plus Hugging Face's length-grouped sampler (the same idea as ucai's
  length-sorted buckets).

The work check: every run of every configuration must train on the same pairs and
tokens in its timed epoch (pairs, and the non-pad tokens of their chosen and rejected
sequences as each side tokenised them; ucai's packing of a pair's shared conversation
happens inside its step and is its design, not less work). The headline ratio is
against the fastest TRL configuration. The last line reads ``reward: speed_ratio=X
memory_ratio=Y`` (ucai over the peer; memory lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

from harness import check_same_work, median_of, peak_rss_mb, run_alternating  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SYSTEM_PROMPT = "You are a helpful assistant."
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


def total_steps(args) -> int:
    return (args.warmup_epochs + 1) * args.steps


CONFIGS = {
    "ucai default": ("ucai", "plain"),
    "ucai fp32 frozen weights": ("ucai", "fp32frozen"),
    "ucai gradient checkpointing": ("ucai", "gc"),
    "trl defaults (gradient checkpointing)": ("trl", "default"),
    "trl no checkpointing": ("trl", "nogc"),
    "trl no checkpointing, group_by_length": ("trl", "grouped"),
}


# --------------------------------------------------------------------------- data


def prepare(workdir: Path, pairs_needed: int, max_length: int) -> tuple[Path, Path, float]:
    """Write the same pairs for both sides; returns (ucai file, TRL file, mean tokens/pair)."""
    from ucai.data.preference_data import read_preferences
    from ucai.models import load_tokenizer
    from ucai.reward_scoring import render_for_reward

    tokenizer = load_tokenizer("smollm2-135m", padding_side="right")
    ucai_rows, trl_rows, tokens = [], [], []
    for pair in read_preferences(DATA):
        chosen = render_for_reward(tokenizer, pair.conversation, pair.chosen, SYSTEM_PROMPT)
        rejected = render_for_reward(tokenizer, pair.conversation, pair.rejected, SYSTEM_PROMPT)
        n_c = len(tokenizer(chosen, add_special_tokens=False)["input_ids"])
        n_r = len(tokenizer(rejected, add_special_tokens=False)["input_ids"])
        if max(n_c, n_r) > max_length:
            continue
        ucai_rows.append({"id": pair.id, "prompt": pair.conversation, "chosen": pair.chosen, "rejected": pair.rejected})
        trl_rows.append({"chosen": chosen, "rejected": rejected})
        tokens.append(n_c + n_r)
        if len(ucai_rows) == pairs_needed:
            break
    if len(ucai_rows) < pairs_needed:
        raise SystemExit(f"only {len(ucai_rows)} pairs of <= {max_length} tokens in {DATA}")
    ucai_file, trl_file = workdir / "pairs_ucai.jsonl", workdir / "pairs_trl.jsonl"
    ucai_file.write_text("".join(json.dumps(r) + "\n" for r in ucai_rows))
    trl_file.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    return ucai_file, trl_file, statistics.mean(tokens)


# --------------------------------------------------------------------------- workers


def run_ucai(args) -> dict:
    import lightning as L

    from ucai.data.preference_data import PreferenceDataModule
    from ucai.models import LoraSettings
    from ucai.stages.reward import RewardModule

    times: list[float] = []
    pairs: list[int] = []
    tokens: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            pairs.append(len(batch["p_chosen"]))
            tokens.append(int(batch["attention_mask"].sum()))

    module = RewardModule(
        model="smollm2-135m",
        output_dir=None,  # TRL saves nothing either
        lora=LoraSettings(**LORA),
        learning_rate=1e-4,
        gradient_checkpointing=args.config == "gc",
        frozen_linear_bf16=args.config != "fp32frozen",
        stats_max_pairs=0,
    )
    data = PreferenceDataModule(
        path=args.data, system_prompt=SYSTEM_PROMPT, max_length=args.max_length, batch_size=args.batch, val_fraction=0.0
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=total_steps(args),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Timer()],
    )
    trainer.fit(module, datamodule=data)
    return {"step_times": times, "step_pairs": pairs, "step_tokens": tokens}


def run_trl(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from ucai.models import load_tokenizer, smollm2_folder

    times: list[float] = []
    pairs: list[int] = []
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    tokenizer = load_tokenizer("smollm2-135m", padding_side="right")
    dataset = datasets.Dataset.from_list(rows)
    grouped = args.config == "grouped"
    if grouped:  # precomputed lengths for the length-grouped sampler
        dataset = dataset.map(lambda r: {"length": len(tokenizer(r["chosen"])["input_ids"]) + len(tokenizer(r["rejected"])["input_ids"])})
    model = AutoModelForSequenceClassification.from_pretrained(str(smollm2_folder()), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    config = RewardConfig(
        output_dir=str(Path(args.workdir) / f"trl_{args.config}"),
        per_device_train_batch_size=args.batch,
        max_steps=total_steps(args),
        learning_rate=1e-4,
        max_length=args.max_length,
        use_cpu=True,
        bf16=True,
        gradient_checkpointing=args.config == "default",
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        seed=0,
        **({"train_sampling_strategy": "group_by_length", "remove_unused_columns": False} if grouped else {}),
    )
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"], task_type="SEQ_CLS",
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[Timer()],
    )
    inner = trainer.training_step

    def counting_step(model, inputs, *rest, **kw):
        # RewardTrainer stacks the chosen rows, then the rejected rows, in one batch.
        pairs.append(int(inputs["input_ids"].shape[0]) // 2)
        tokens.append(int(inputs["attention_mask"].sum()))
        return inner(model, inputs, *rest, **kw)

    trainer.training_step = counting_step
    trainer.train()
    return {"step_times": times, "step_pairs": pairs, "step_tokens": tokens}


def worker(args) -> None:
    torch_threads = os.environ.get("BENCH_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    result = run_ucai(args) if args.side == "ucai" else run_trl(args)
    if len(result["step_times"]) != total_steps(args):
        raise SystemExit(f"{args.side}: {len(result['step_times'])} steps timed, expected {total_steps(args)}")
    last_epoch = slice(args.warmup_epochs * args.steps, None)
    timed = result["step_times"][last_epoch]
    timed_pairs = sum(result["step_pairs"][last_epoch])
    result.update(
        timed_pairs=timed_pairs,
        timed_tokens=sum(result["step_tokens"][last_epoch]),
        pairs_per_s=timed_pairs / sum(timed),
        median_step_s=statistics.median(timed),
        peak_rss_mb=peak_rss_mb(),
    )
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def spawn(name: str, repeat: int, args, data: dict[str, Path], workdir: Path) -> dict:
    side, config = CONFIGS[name]
    result = workdir / f"{side}_{config}.json"
    command = [
        sys.executable, __file__, "--worker", "--side", side, "--config", config, "--data", str(data[side]),
        "--result", str(result), "--workdir", str(workdir), "--steps", str(args.steps), "--warmup-epochs", str(args.warmup_epochs),
        "--batch", str(args.batch), "--max-length", str(args.max_length),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} ({config}) failed with exit status {proc.returncode}")
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - started
    print(
        f"[{repeat + 1}/{args.repeats}] {name:38s} {out['pairs_per_s']:6.3f} pairs/s  median step "
        f"{out['median_step_s']:.2f} s  peak RSS {out['peak_rss_mb']:7.0f} MB  ({out['timed_pairs']} pairs, "
        f"{out['timed_tokens']} tokens timed; run {out['wall_s']:.0f} s)",
        flush=True,
    )
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per epoch (pairs = steps x batch)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before the timed one")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, in alternating order")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found (the benchmark data ships in ../shared)")
    with tempfile.TemporaryDirectory(prefix="ucai-bench-reward-") as tmp:
        workdir = Path(tmp)
        pairs = args.steps * args.batch
        ucai_data, trl_data, mean_tokens = prepare(workdir, pairs, args.max_length)
        print(
            f"SmolLM2-135M, LoRA r=8 q/v, bf16 autocast, batch {args.batch} pairs, {pairs} hh-rlhf pairs "
            f"<= {args.max_length} tokens (mean {mean_tokens:.0f} tokens per pair), "
            f"{args.warmup_epochs} warm-up epoch(s) + 1 timed epoch of {args.steps} steps, "
            f"{args.repeats} repeats in alternating order",
            flush=True,
        )
        data = {"ucai": ucai_data, "trl": trl_data}
        trials = run_alternating(list(CONFIGS), args.repeats, lambda name, r: spawn(name, r, args, data, workdir))
    for unit in ("pairs", "tokens"):
        check_same_work(
            {f"{name} run {i + 1}": r[f"timed_{unit}"] for name, rs in trials.items() for i, r in enumerate(rs)},
            f"timed {unit}",
        )
    summary = {
        name: {"pairs_per_s": median_of(rs, "pairs_per_s"), "peak_rss_mb": median_of(rs, "peak_rss_mb"),
               "timed_tokens": rs[0]["timed_tokens"]}
        for name, rs in trials.items()
    }
    for name, s in summary.items():
        print(f"{name:38s} median {s['pairs_per_s']:6.3f} pairs/s  peak RSS {s['peak_rss_mb']:7.0f} MB  "
              f"({s['timed_tokens']} tokens per timed epoch)")
    best_name = max((n for n in CONFIGS if CONFIGS[n][0] == "trl"), key=lambda n: summary[n]["pairs_per_s"])
    ucai, best = summary["ucai default"], summary[best_name]
    default, ucai_gc = summary["trl defaults (gradient checkpointing)"], summary["ucai gradient checkpointing"]
    fp32_frozen = summary["ucai fp32 frozen weights"]

    def ratios(a: dict, b: dict) -> str:
        return f"speed_ratio={a['pairs_per_s'] / b['pairs_per_s']:.2f} memory_ratio={a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"

    print(f"ucai vs TRL defaults: {ratios(ucai, default)}; both with gradient checkpointing: {ratios(ucai_gc, default)}")
    print(
        f"frozen_linear_bf16: ucai with fp32 frozen weights vs {best_name}: {ratios(fp32_frozen, best)}; "
        f"the option saves {fp32_frozen['peak_rss_mb'] - ucai['peak_rss_mb']:.0f} MB "
        f"({(fp32_frozen['peak_rss_mb'] - ucai['peak_rss_mb']) / best['peak_rss_mb']:.2f} of the peer's peak)"
    )
    print(f"peer's best: {best_name}")
    print(f"reward: {ratios(ucai, best)}")

if __name__ == "__main__":
    main()
