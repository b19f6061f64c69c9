"""SFT throughput and memory: ucai's SFTModule against TRL's SFTTrainer.

    nice python benchmarks/sft.py                 # ~10 min on a 2-core CPU
    nice python benchmarks/sft.py --steps 8       # quicker, noisier

Both sides train SmolLM2-135M-Instruct (the converted ``smollm2-135m`` folder) with the
same LoRA (r=8, alpha=16, dropout 0.05, q_proj/v_proj), the same examples, batch 4,
sequences of at most 256 tokens, the same number of optimizer steps, AdamW at a
constant learning rate, and bf16 autocast on the CPU. Examples are hh-rlhf ``chosen``
transcripts from ../shared/data when present (else pairs built from the shipped
red-team prompts), rendered with the same chat template and system prompt; only
examples that fit in 255 tokens are used, so neither side truncates and both see the
same tokens (TRL's template adds one newline token after each reply).

Each configuration runs in its own subprocess (peak RSS is per process). The first
``--warmup`` steps are not timed; throughput is the median over timed steps of non-pad
tokens / step wall time (data loading and optimizer included); the total rate (all
timed tokens over all timed time) and the median step time are printed too. Every configuration runs ``--repeats`` times, in alternating order so a
change in machine load hits both sides alike; the median throughput and the highest
peak RSS of each configuration are compared. TRL runs at its defaults (gradient checkpointing on) and without gradient
checkpointing; its faster setting is the reference. The last line is
``sft: speed_ratio=X memory_ratio=Y`` (ucai over TRL's best; memory: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SYSTEM = "You are a helpful assistant."
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
LR = 2e-4


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def summarise(step_times: list[float], step_tokens: list[int], warmup: int) -> dict:
    times, tokens = step_times[warmup:], step_tokens[warmup:]
    return {
        # Median over steps of each step's tokens/s: robust to the stalls a shared
        # machine inflicts on single steps. The total rate is reported beside it.
        "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times, strict=True)),
        "total_tokens_per_s": sum(tokens) / sum(times),
        "median_step_s": statistics.median(times),
        "timed_steps": len(times),
        "timed_tokens": sum(tokens),
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- data


def build_data(path: Path, n: int, max_length: int) -> dict:
    """Write the first ``n`` examples that fit ``max_length - 1`` tokens to ``path``."""
    from ucai.data.sft_data import SFTExample, encode_examples, read_sft_examples
    from ucai.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m", padding_side="right")
    if HH_RLHF.exists():
        source = str(HH_RLHF)
        examples = read_sft_examples(HH_RLHF)
    else:
        from ucai.data.prompts import read_prompts

        source = "data/red_team_prompts.jsonl (synthetic refusals)"
        examples = [
            SFTExample(r.id, ({"role": "user", "content": r.prompt},),
                       f"I can't help with that. {r.prompt.split('?')[0]} is not something I will assist with, "
                       "but I am happy to talk about safer alternatives.")
            for r in read_prompts(ROOT / "data" / "red_team_prompts.jsonl")
        ]
    encoded = encode_examples(tokenizer, examples, SYSTEM, max_length=10_000)
    chosen = [e for e, enc in zip(examples, encoded, strict=True) if len(enc) <= max_length - 1][:n]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} examples fit {max_length} tokens; need {n}")
    with open(path, "w") as handle:
        for e in chosen:
            handle.write(json.dumps({"id": e.id, "prompt": list(e.messages), "response": e.response}) + "\n")
    lengths = [len(enc) for e, enc in zip(examples, encoded, strict=True) if len(enc) <= max_length - 1][:n]
    return {"source": source, "examples": n, "mean_tokens": sum(lengths) / n, "max_tokens": max(lengths)}


# --------------------------------------------------------------------------- ucai side


def run_ucai(args) -> dict:
    import lightning as L
    import torch

    from ucai.data.sft_data import SFTDataModule
    from ucai.models import LoraSettings
    from ucai.stages.sft import SFTModule

    times: list[float] = []
    tokens: list[int] = []

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            times.append(now - self.last)
            tokens.append(int(batch["num_tokens"]))
            self.last = now

    torch.manual_seed(0)
    module = SFTModule(
        model="smollm2-135m", lora=LoraSettings(**LORA), learning_rate=LR, warmup_steps=0,
        schedule="constant", gradient_checkpointing=args.gc, export=False,
    )
    data = SFTDataModule(
        path=args.data, system_prompt=SYSTEM, max_length=args.max_length, val_fraction=0.0,
        batch_size=args.batch, packing=args.packing, bucket_batches=16,
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=args.steps + args.warmup,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Timer()],
    )
    trainer.fit(module, data)
    return summarise(times, tokens, args.warmup)


# --------------------------------------------------------------------------- TRL side


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ucai.models import smollm2_folder

    rows = [json.loads(line) for line in open(args.data)]
    dataset = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}] + r["prompt"],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in rows
    ])
    folder = str(smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    times: list[float] = []
    tokens: list[int] = []
    pending = [0]

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.last)
            tokens.append(pending[0])
            pending[0] = 0
            self.last = now

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            pending[0] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-sft-"),
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        max_steps=args.steps + args.warmup,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=args.gc,
        bf16=True,
        use_cpu=True,  # transformers rejects bf16 without a GPU otherwise
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = CountingTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=lora, callbacks=[Timer()])
    trainer.train()
    return summarise(times, tokens, args.warmup)


# --------------------------------------------------------------------------- driver


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_ucai(args) if args.side == "ucai" else run_trl(args)
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, gc: bool, packing: bool, args, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
           "--threads", str(args.threads)]
    cmd += ["--gc"] if gc else []
    cmd += ["--packing"] if packing else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ucai", "trl"])
    parser.add_argument("--data")
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on both sides (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of every configuration, in alternating order; medians are compared")
    parser.add_argument("--with-packed", dest="with_packed", action="store_true",
                        help="also time ucai with padding-free packing (faster with flash attention on GPU; "
                        "on CPU sdpa falls back to a dense masked kernel)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", dest="max_length", type=int, default=256)
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing (child runs)")
    parser.add_argument("--packing", action="store_true", help="padding-free packing (ucai child runs)")
    args = parser.parse_args()
    if args.side:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="ucai-bench-sft-") as tmp:
        data = Path(tmp) / "sft.jsonl"
        info = build_data(data, args.batch * (args.steps + args.warmup), args.max_length)
        print(f"data: {info}")
        print(f"settings: SmolLM2-135M-Instruct, LoRA {LORA}, batch {args.batch}, <= {args.max_length} tokens, "
              f"{args.warmup} warm-up + {args.steps} timed steps, bf16 autocast, "
              f"torch threads {args.threads or 'default'} on {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        runs = {
            "trl defaults (gradient checkpointing)": ("trl", True, False),
            "trl no gradient checkpointing": ("trl", False, False),
            "ucai bucketed": ("ucai", False, False),
        }
        if args.with_packed:
            runs["ucai packed"] = ("ucai", False, True)
        trials: dict[str, list[dict]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            # Alternate the order so that a drift in machine load hits both sides alike.
            names = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for name in names:
                r = launch(*runs[name], args, data)
                trials[name].append(r)
                print(f"[{repeat + 1}/{args.repeats}] {name:40s} {r['tokens_per_s']:8.1f} tokens/s (median step; "
                      f"total {r['total_tokens_per_s']:.1f})  "
                      f"median step {r['median_step_s']:.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                      f"({r['timed_tokens']} tokens in {r['timed_steps']} steps, load {os.getloadavg()[0]:.1f})",
                      flush=True)
        results = {}
        for name, rs in trials.items():
            results[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
            print(f"{name:40s} median {results[name]['tokens_per_s']:8.1f} tokens/s  "
                  f"peak RSS {results[name]['peak_rss_mb']:7.0f} MB")
    trl_best = max((r for n, r in results.items() if n.startswith("trl")), key=lambda r: r["tokens_per_s"])
    ucai_name, ucai_best = max(((n, r) for n, r in results.items() if n.startswith("ucai")),
                               key=lambda item: item[1]["tokens_per_s"])
    print(f"headline: {ucai_name} vs TRL's faster setting")
    print(f"sft: speed_ratio={ucai_best['tokens_per_s'] / trl_best['tokens_per_s']:.2f} "
          f"memory_ratio={ucai_best['peak_rss_mb'] / trl_best['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
