"""SFT throughput and memory: ucai's SFTModule against TRL's SFTTrainer at its best.

    python benchmarks/sft.py                 # ~15 min on a 2-core CPU
    python benchmarks/sft.py --steps 4 --repeats 1   # a quick look, not a result

Both sides train SmolLM2-135M-Instruct (the converted ``smollm2-135m`` folder) with the
same LoRA (r=8, alpha=16, dropout 0.05, q_proj/v_proj), batch 4, AdamW at a constant
learning rate and bf16 autocast on the CPU, on the same token ids: hh-rlhf ``chosen``
transcripts from ../shared/data when present (else the shipped red-team prompts with a
fixed refusal), tokenised once by ucai's `encode_examples` and handed to TRL already
tokenised (``input_ids`` plus ``completion_mask``). So both sides train on exactly the
same tokens with the same labels (TRL's own chat rendering would add one newline token
after every reply), and only examples of at most ``--max-length`` tokens are used, so
neither side truncates.

Every run trains ``--warmup-epochs`` untimed epochs over the ``batch x steps`` examples,
then one timed epoch: each side is timed on exactly the same examples however it
orders and batches them. Throughput is the timed epoch's non-pad tokens over the sum of
its step times (data loading and optimizer included). The work check stops the script
if the timed tokens of any run differ from the others by more than 5%.

Configurations, each in its own subprocess (peak RSS is ``ru_maxrss``), ``--repeats``
times in alternating order, medians compared:

* TRL at its defaults (gradient checkpointing on, random batches);
* TRL without gradient checkpointing;
* TRL without checkpointing and with ``train_sampling_strategy="group_by_length"``
  (transformers' length-grouped sampler: the peer's version of ucai's length buckets);
* TRL without checkpointing and ``padding_free=True`` (one row per batch; on CPU
  transformers builds a block-diagonal mask for sdpa from the restarting position ids);
* ucai at its defaults (length-bucketed batches, no checkpointing).

Before timing, a loss check runs ucai's loss and TRL's loss (padded and padding-free)
on the same first batch, in fp32 with dropout off, and stops if they differ by more
than 1e-4 relative: the two sides optimise the same objective. The last line is
``sft: speed_ratio=X memory_ratio=Y`` (ucai's default over TRL's fastest
configuration; memory lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, when run as a script

from harness import check_same_work, median_of, peak_rss_mb, run_alternating  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SYSTEM = "You are a helpful assistant."
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
LR = 2e-4
LOSS_TOLERANCE = 1e-4

CONFIGS = {
    "trl defaults (gradient checkpointing)": {"side": "trl", "gc": True},
    "trl no checkpointing": {"side": "trl"},
    "trl no checkpointing, group_by_length": {"side": "trl", "grouped": True},
    "trl no checkpointing, padding-free": {"side": "trl", "padding_free": True},
    "ucai default (length buckets)": {"side": "ucai"},
}
UCAI_DEFAULT = "ucai default (length buckets)"


# --------------------------------------------------------------------------- data


def build_data(path: Path, n: int, max_length: int) -> dict:
    """Write the first ``n`` examples that fit ``max_length`` tokens to ``path`` as
    ucai rows plus the token ids both sides train on."""
    from ucai.data.sft_data import SFTExample, encode_examples, read_sft_examples
    from ucai.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m", padding_side="right")
    if HH_RLHF.exists():
        source = str(HH_RLHF)
        examples = read_sft_examples(HH_RLHF)
    else:
        from ucai.data.prompts import read_prompts

        source = "data/red_team_prompts.jsonl (fixed refusals)"
        examples = [
            SFTExample(r.id, ({"role": "user", "content": r.prompt},),
                       "I can't help with that, but I am happy to talk about safer alternatives.")
            for r in read_prompts(ROOT / "data" / "red_team_prompts.jsonl")
        ]
    encoded = encode_examples(tokenizer, examples, SYSTEM, max_length=10_000)
    fitting = [(e, enc) for e, enc in zip(examples, encoded, strict=True) if len(enc) <= max_length][:n]
    if len(fitting) < n:
        raise SystemExit(f"only {len(fitting)} examples fit {max_length} tokens; need {n}")
    with open(path, "w") as handle:
        for e, enc in fitting:
            handle.write(json.dumps({
                "id": e.id, "prompt": list(e.messages), "response": e.response,
                "input_ids": enc.input_ids.tolist(), "prompt_length": enc.prompt_length,
            }) + "\n")
    lengths = [len(enc) for _, enc in fitting]
    return {"source": source, "examples": n, "mean_tokens": round(sum(lengths) / n, 1), "max_tokens": max(lengths)}


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


# --------------------------------------------------------------------------- ucai side


def ucai_module(args, dropout: bool = True):
    from ucai.models import LoraSettings
    from ucai.stages.sft import SFTModule

    lora = dict(LORA, dropout=LORA["dropout"] if dropout else 0.0)
    return SFTModule(model="smollm2-135m", lora=LoraSettings(**lora), learning_rate=LR, warmup_steps=0,
                     schedule="constant", gradient_checkpointing=args.gc, export=False)


def run_ucai(args) -> dict:
    import lightning as L
    import torch

    from ucai.data.sft_data import SFTDataModule

    times: list[float] = []
    tokens: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            tokens.append(int(batch["num_tokens"]))

    torch.manual_seed(0)
    data = SFTDataModule(path=args.data, system_prompt=SYSTEM, max_length=args.max_length, val_fraction=0.0,
                         batch_size=args.batch)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_epochs=args.warmup_epochs + 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Timer()],
    )
    trainer.fit(ucai_module(args), data)
    return {"step_times": times, "step_tokens": tokens}


# --------------------------------------------------------------------------- TRL side


def trl_trainer(args, callbacks=(), dropout: bool = True):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ucai.models import smollm2_folder

    rows = read_rows(args.data)
    columns = {
        "input_ids": [r["input_ids"] for r in rows],
        "completion_mask": [[0] * r["prompt_length"] + [1] * (len(r["input_ids"]) - r["prompt_length"]) for r in rows],
    }
    dataset = Dataset.from_dict(columns)
    folder = str(smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = "<|endoftext|>"  # ucai pads with the same token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-sft-"),
        per_device_train_batch_size=args.batch,
        # Padding-free TRL refuses a max_length it would not enforce; the data fit anyway.
        max_length=None if args.padding_free else args.max_length,
        num_train_epochs=args.warmup_epochs + 1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=args.gc,
        padding_free=args.padding_free,
        completion_only_loss=True,
        bf16=True,
        use_cpu=True,  # transformers rejects bf16 without a GPU otherwise
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
        **({"train_sampling_strategy": "group_by_length"} if args.grouped else {}),
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"] if dropout else 0.0,
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=lora, callbacks=list(callbacks))


def run_trl(args) -> dict:
    from transformers import TrainerCallback

    times: list[float] = []
    tokens: list[int] = []
    pending = [0]

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)
            tokens.append(pending[0])
            pending[0] = 0

    trainer = trl_trainer(args, callbacks=(Timer(),))
    inner = trainer.training_step

    def counting_step(model, inputs, *rest, **kw):
        mask = inputs.get("attention_mask")
        # Padding-free batches are one row with no mask and no pad.
        pending[0] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return inner(model, inputs, *rest, **kw)

    trainer.training_step = counting_step
    trainer.train()
    return {"step_times": times, "step_tokens": tokens}


# --------------------------------------------------------------------------- loss check


def loss_check(args) -> dict:
    """ucai's and TRL's loss on the first ``batch`` examples, fp32, dropout off."""
    import torch

    from ucai.data.sft_data import Encoded, collate_padded

    rows = read_rows(args.data)[: args.batch]
    module = ucai_module(args, dropout=False)
    module.configure_model()
    module.lm.eval()
    encoded = [Encoded(torch.tensor(r["input_ids"]), r["prompt_length"]) for r in rows]
    with torch.no_grad():
        ucai_loss = float(module.forward_loss(collate_padded(encoded, module.tokenizer.pad_token_id))[0])
    losses = {"ucai": ucai_loss}
    for padding_free in (False, True):
        args.padding_free = padding_free
        trainer = trl_trainer(args, dropout=False)
        trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
        with torch.no_grad():
            losses["trl padding-free" if padding_free else "trl"] = float(trainer.compute_loss(trainer.model, batch))
    return losses


# --------------------------------------------------------------------------- driver


def child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.side == "loss":
        print("RESULT " + json.dumps(loss_check(args)), flush=True)
        return
    result = run_ucai(args) if args.side == "ucai" else run_trl(args)
    steps_per_epoch = len(result["step_times"]) // (args.warmup_epochs + 1)
    if steps_per_epoch * (args.warmup_epochs + 1) != len(result["step_times"]):
        raise SystemExit(f"{len(result['step_times'])} steps do not split into {args.warmup_epochs + 1} epochs")
    times = result["step_times"][-steps_per_epoch:]
    tokens = result["step_tokens"][-steps_per_epoch:]
    print("RESULT " + json.dumps({
        "tokens_per_s": sum(tokens) / sum(times), "timed_tokens": sum(tokens), "timed_steps": len(times),
        "epoch_s": sum(times), "peak_rss_mb": peak_rss_mb(),
    }), flush=True)


def launch(options: dict, args, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--side", options["side"], "--data", str(data), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--warmup-epochs", str(args.warmup_epochs),
           "--threads", str(args.threads)]
    cmd += [f"--{flag.replace('_', '-')}" for flag in ("gc", "grouped", "padding_free") if options.get(flag)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{options['side']} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per epoch (examples = steps x batch)")
    parser.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every configuration, in alternating order")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads on both sides (0: torch's default); 1 is steadier on a shared machine")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", dest="max_length", type=int, default=256)
    parser.add_argument("--side", choices=["ucai", "trl", "loss"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grouped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--padding-free", dest="padding_free", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="ucai-bench-sft-") as tmp:
        data = Path(tmp) / "sft.jsonl"
        info = build_data(data, args.batch * args.steps, args.max_length)
        print(f"data: {info}")
        print(f"settings: SmolLM2-135M-Instruct, LoRA {LORA}, batch {args.batch}, <= {args.max_length} tokens, "
              f"{args.warmup_epochs} warm-up epoch(s) + 1 timed epoch of {args.steps} steps, bf16 autocast, "
              f"torch threads {args.threads or 'default'} on {os.cpu_count()} cores", flush=True)
        losses = launch({"side": "loss"}, args, data)
        print("loss on the first batch (fp32, no dropout): "
              + ", ".join(f"{name} {value:.6f}" for name, value in losses.items()), flush=True)
        for name, value in losses.items():
            if abs(value - losses["ucai"]) > LOSS_TOLERANCE * abs(losses["ucai"]):
                raise SystemExit(f"loss mismatch: {name} {value:.6f} vs ucai {losses['ucai']:.6f}")

        def run(name: str, repeat: int) -> dict:
            r = launch(CONFIGS[name], args, data)
            print(f"[{repeat + 1}/{args.repeats}] {name:40s} {r['tokens_per_s']:7.1f} tokens/s  "
                  f"epoch {r['epoch_s']:6.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  "
                  f"({r['timed_tokens']} tokens in {r['timed_steps']} steps, load {os.getloadavg()[0]:.1f})",
                  flush=True)
            return r

        trials = run_alternating(list(CONFIGS), args.repeats, run)
    check_same_work({f"{name} run {i + 1}": r["timed_tokens"] for name, rs in trials.items() for i, r in enumerate(rs)},
                    "timed tokens")
    summary = {name: {"tokens_per_s": median_of(rs, "tokens_per_s"), "peak_rss_mb": median_of(rs, "peak_rss_mb")}
               for name, rs in trials.items()}
    for name, s in summary.items():
        print(f"{name:40s} median {s['tokens_per_s']:7.1f} tokens/s  peak RSS {s['peak_rss_mb']:6.0f} MB")
    best_name = max((n for n in summary if CONFIGS[n]["side"] == "trl"), key=lambda n: summary[n]["tokens_per_s"])
    ucai, best, default = summary[UCAI_DEFAULT], summary[best_name], summary["trl defaults (gradient checkpointing)"]
    print(f"ucai vs TRL defaults: speed_ratio={ucai['tokens_per_s'] / default['tokens_per_s']:.2f} "
          f"memory_ratio={ucai['peak_rss_mb'] / default['peak_rss_mb']:.2f}")
    print(f"peer's best: {best_name}")
    print(f"sft: speed_ratio={ucai['tokens_per_s'] / best['tokens_per_s']:.2f} "
          f"memory_ratio={ucai['peak_rss_mb'] / best['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
