"""DPO training throughput and memory: ucai's DPOModule vs TRL 1.12's DPOTrainer.

    python benchmarks/dpo.py                    # full run (about 20 minutes on 2 cores)
    python benchmarks/dpo.py --steps 3 --repeats 1   # a quick look, not a result

Both sides train SmolLM2-135M-Instruct (the offline ``smollm2-135m`` alias) with a
fresh LoRA r=8 (alpha 16) on q_proj/v_proj, the reference being the same model with
the adapter disabled, sigmoid DPO with beta 0.1 on hard labels, AdamW lr 1e-4 with
TRL's linear decay, gradient clipping at 1.0, bf16 autocast on CPU, batch 4 pairs, on
the same hh-rlhf pairs. The pairs are rendered once with the chat template (system
prompt, conversation, assistant header) and given to TRL as prompt and completion
text, so both sides train on the same token ids with the same prompt/completion split;
pairs longer than ``--max-length`` are left out beforehand (TRL cuts the end of a long
completion, ucai the start of its conversation). Each side runs ``--warmup-epochs``
untimed epochs, then one timed epoch: the figure is pairs / summed step time over the
same pairs, however each side batches them. Each configuration runs in its own
subprocess; peak memory is its maximum resident set size.

Before timing, a loss check builds both sides in fp32 with the SAME non-zero adapter
(ucai's, copied into TRL's model; a fresh adapter has B = 0, where every loss is log 2
whatever the code does) and compares the loss and the summed log-probs of the first 4
pairs; it stops if the losses differ by more than 1e-5.

Configurations, each ``--repeats`` times in alternating order, medians compared:

* ucai at its defaults: each pair one packed row (the conversation once), logits only
  at reply positions, reference in the same step under no_grad, bf16 frozen linears;
* TRL at its defaults (gradient checkpointing on, random batches);
* TRL without gradient checkpointing, with ``group_by_length`` (ucai buckets by length);
* the same with ``precompute_ref_log_probs``: the reference log-probs of every pair are
  computed once before training, its time (``precompute_s``) counted in the timed
  epoch, since one epoch over the pairs needs them once — the same work as one epoch
  of per-step reference passes. (Over several epochs it does LESS work than the
  others: the reference pass is not repeated; the line shows it as it is.)
  TRL 1.12's ``padding_free`` is disabled in that release (it warns and pads), so it
  is not a configuration.

The work check: every run must train on the same pairs and non-pad tokens (chosen and
rejected sequences as each side tokenised them) in its timed epoch. The headline ratio
is against the fastest TRL configuration. The last line reads ``dpo: speed_ratio=X
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
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
LEARNING_RATE = 1e-4
BETA = 0.1
LOSS_TOLERANCE = 1e-5
CHECK_PAIRS = 4

CONFIGS = {
    "ucai default": {"side": "ucai"},
    "trl defaults (gradient checkpointing)": {"side": "trl", "gc": True},
    "trl no checkpointing, group_by_length": {"side": "trl", "grouped": True},
    "trl no checkpointing, group_by_length, precompute_ref": {"side": "trl", "grouped": True, "precompute": True},
}
UCAI = "ucai default"


def total_steps(args) -> int:
    return (args.warmup_epochs + 1) * args.steps


# --------------------------------------------------------------------------- data


def prepare(workdir: Path, pairs_needed: int, max_length: int) -> tuple[Path, Path, dict]:
    """Write the same pairs for both sides: ucai's preference rows and TRL's
    prompt/completion texts. Returns (ucai file, TRL file, what the pairs are like)."""
    from ucai.chat import render_chat
    from ucai.data.preference_data import read_preferences
    from ucai.models import load_tokenizer
    from ucai.reward_scoring import render_for_reward

    tokenizer = load_tokenizer("smollm2-135m", padding_side="right")
    eos = tokenizer.eos_token
    ucai_rows, trl_rows, tokens, reply_tokens = [], [], [], []
    for pair in read_preferences(DATA):
        prompt = render_chat(tokenizer, pair.conversation, SYSTEM_PROMPT, add_generation_prompt=True)
        texts = [render_for_reward(tokenizer, pair.conversation, reply, SYSTEM_PROMPT) for reply in (pair.chosen, pair.rejected)]
        if texts != [prompt + pair.chosen + eos, prompt + pair.rejected + eos]:
            continue  # a reply the template trims: the two sides would see other text
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        if max(len(ids) for ids in full) > max_length or any(ids[: len(prompt_ids)] != prompt_ids for ids in full):
            continue
        ucai_rows.append({"id": pair.id, "prompt": pair.conversation, "chosen": pair.chosen, "rejected": pair.rejected})
        trl_rows.append({"prompt": prompt, "chosen": pair.chosen + eos, "rejected": pair.rejected + eos})
        tokens.append(sum(len(ids) for ids in full))
        reply_tokens.append(sum(len(ids) - len(prompt_ids) for ids in full))
        if len(ucai_rows) == pairs_needed:
            break
    if len(ucai_rows) < pairs_needed:
        raise SystemExit(f"only {len(ucai_rows)} pairs of <= {max_length} tokens in {DATA}")
    ucai_file, trl_file = workdir / "pairs_ucai.jsonl", workdir / "pairs_trl.jsonl"
    ucai_file.write_text("".join(json.dumps(r) + "\n" for r in ucai_rows))
    trl_file.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    info = {"pairs": len(ucai_rows), "mean_tokens_per_pair": statistics.mean(tokens),
            "mean_reply_tokens_per_pair": statistics.mean(reply_tokens)}
    return ucai_file, trl_file, info


# --------------------------------------------------------------------------- the two sides


def ucai_module(args):
    from ucai.models import LoraSettings
    from ucai.stages.dpo import DPOModule

    return DPOModule(
        policy="smollm2-135m", lora=LoraSettings(**LORA), beta=BETA, label_smoothing=0.0,
        learning_rate=LEARNING_RATE, lr_schedule="linear", export=False,
    )


def ucai_data(args, path: str):
    from ucai.data.dpo_data import DPODataModule

    return DPODataModule(
        path=path, tokenizer="smollm2-135m", system_prompt=SYSTEM_PROMPT, max_length=args.max_length,
        batch_size=args.batch, val_fraction=0.0,
    )


def trl_trainer(args, path: str, precision_bf16: bool, callbacks=()):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from ucai.models import load_tokenizer, smollm2_folder

    tokenizer = load_tokenizer("smollm2-135m", padding_side="right")
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    if args.grouped:  # the length-grouped sampler reads a precomputed length column
        dataset = dataset.map(lambda r: {"length": len(tokenizer(r["prompt"] + r["chosen"])["input_ids"])
                                         + len(tokenizer(r["prompt"] + r["rejected"])["input_ids"])})
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=args.batch,
        max_steps=total_steps(args),
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        use_cpu=True,
        bf16=precision_bf16,
        gradient_checkpointing=args.gc,
        precompute_ref_log_probs=args.precompute,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        seed=0,
        **({"train_sampling_strategy": "group_by_length", "remove_unused_columns": False} if args.grouped else {}),
    )
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"], task_type="CAUSAL_LM",
    )
    return DPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, callbacks=list(callbacks),
    )


def run_ucai(args) -> dict:
    import lightning as L

    times: list[float] = []
    pairs: list[int] = []
    tokens: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            pairs.append(len(batch["p_chosen"]))
            tokens.append(int(batch["attention_mask"].sum()))  # the chosen and rejected sequences' tokens

    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=total_steps(args), gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Timer()],
    )
    trainer.fit(ucai_module(args), datamodule=ucai_data(args, args.data))
    return {"step_times": times, "step_pairs": pairs, "step_tokens": tokens, "precompute_s": 0.0}


def run_trl(args) -> dict:
    from transformers import TrainerCallback
    from trl import DPOTrainer

    times: list[float] = []
    pairs: list[int] = []
    tokens: list[int] = []
    precompute: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    inner_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        start = time.perf_counter()
        try:
            return inner_precompute(self, *a, **k)
        finally:
            precompute.append(time.perf_counter() - start)

    DPOTrainer._precompute_ref_logps = timed_precompute  # runs inside the trainer's __init__
    trainer = trl_trainer(args, args.data, precision_bf16=True, callbacks=[Timer()])
    inner_step = trainer.training_step

    def counting_step(model, inputs, *rest, **kw):
        # DPOTrainer's batch holds the chosen rows, then the rejected rows.
        pairs.append(int(inputs["input_ids"].shape[0]) // 2)
        tokens.append(int(inputs["attention_mask"].sum()))
        return inner_step(model, inputs, *rest, **kw)

    trainer.training_step = counting_step
    trainer.train()
    return {"step_times": times, "step_pairs": pairs, "step_tokens": tokens, "precompute_s": sum(precompute)}


# --------------------------------------------------------------------------- loss check


def perturb_adapter(policy) -> None:
    """Give every LoRA weight a seeded non-zero value (B = 0 would make the policy the
    reference and every loss log 2, whatever the code computes)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted((n, p) for n, p in policy.named_parameters() if ".lora_" in n):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def loss_check(args) -> dict:
    """Loss and mean summed log-probs of the first pairs on both sides, fp32, with the
    same non-zero adapter."""
    import torch

    module = ucai_module(args)
    module.configure_model()  # no trainer: fp32
    perturb_adapter(module.policy)
    data = ucai_data(args, args.data)
    data.setup("fit")
    batch = data.collate(data._encoded["train"][:CHECK_PAIRS])  # the file's first pairs, in order
    with torch.no_grad():
        loss, sums = module.pair_step(batch)
    from ucai.stages.dpo import METRICS

    ucai = {"loss": float(loss), **{m: float(v) / CHECK_PAIRS for m, v in zip(METRICS, sums[:-1], strict=True)}}

    trainer = trl_trainer(args, args.trl_data, precision_bf16=False)
    adapter = {name.replace(".policy.", ".default."): value for name, value in module.policy.state_dict().items() if ".lora_" in name}
    missing = set(adapter) - set(trainer.model.state_dict())
    if missing:
        raise SystemExit(f"adapter names differ between the sides, e.g. {sorted(missing)[0]}")
    trainer.model.load_state_dict(adapter, strict=False)
    trainer.model.train()
    examples = [trainer.train_dataset[i] for i in range(CHECK_PAIRS)]
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))
    metrics = trainer._metrics["train"]
    trl = {"loss": trl_loss, **{m: metrics[m][-1] for m in METRICS}}
    return {"ucai": ucai, "trl": trl}


# --------------------------------------------------------------------------- driver


def worker(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.side == "check":
        Path(args.result).write_text(json.dumps(loss_check(args)))
        return
    result = run_ucai(args) if args.side == "ucai" else run_trl(args)
    if len(result["step_times"]) != total_steps(args):
        raise SystemExit(f"{args.side}: {len(result['step_times'])} steps timed, expected {total_steps(args)}")
    last_epoch = slice(args.warmup_epochs * args.steps, None)
    timed = result["step_times"][last_epoch]
    timed_pairs = sum(result["step_pairs"][last_epoch])
    epoch_s = sum(timed) + result["precompute_s"]  # the precomputed reference passes are this epoch's work
    result.update(
        timed_pairs=timed_pairs,
        timed_tokens=sum(result["step_tokens"][last_epoch]),
        pairs_per_s=timed_pairs / epoch_s,
        epoch_s=epoch_s,
        median_step_s=statistics.median(timed),
        peak_rss_mb=peak_rss_mb(),
    )
    Path(args.result).write_text(json.dumps(result))


def command(side: str, options: dict, args, data: dict[str, Path], workdir: Path, result: Path) -> list[str]:
    cmd = [
        sys.executable, __file__, "--worker", "--side", side, "--data", str(data[side if side != "check" else "ucai"]),
        "--trl-data", str(data["trl"]), "--result", str(result), "--workdir", str(workdir),
        "--steps", str(args.steps), "--warmup-epochs", str(args.warmup_epochs), "--batch", str(args.batch),
        "--max-length", str(args.max_length), "--threads", str(args.threads),
    ]
    return cmd + [f"--{flag}" for flag in ("gc", "grouped", "precompute") if options.get(flag)]


def launch(cmd: list[str], what: str) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{what} failed with exit status {proc.returncode}")


def spawn(name: str, repeat: int, args, data: dict[str, Path], workdir: Path) -> dict:
    options = CONFIGS[name]
    result = workdir / "result.json"
    started = time.perf_counter()
    launch(command(options["side"], options, args, data, workdir, result), name)
    out = json.loads(result.read_text())
    out["wall_s"] = time.perf_counter() - started
    extra = f", precompute {out['precompute_s']:.1f} s counted" if out["precompute_s"] else ""
    print(
        f"[{repeat + 1}/{args.repeats}] {name:54s} {out['pairs_per_s']:6.3f} pairs/s  median step "
        f"{out['median_step_s']:.2f} s  peak RSS {out['peak_rss_mb']:6.0f} MB  ({out['timed_pairs']} pairs, "
        f"{out['timed_tokens']} tokens timed{extra}; run {out['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    return out


def check_losses(args, data: dict[str, Path], workdir: Path) -> None:
    result = workdir / "check.json"
    launch(command("check", {}, args, data, workdir, result), "loss check")
    sides = json.loads(result.read_text())
    ucai, trl = sides["ucai"], sides["trl"]
    print(f"step-0 check (fp32, same non-zero adapter, first {CHECK_PAIRS} pairs):", flush=True)
    for key in trl:
        print(f"  {key:18s} ucai {ucai[key]:12.6f}  trl {trl[key]:12.6f}  |diff| {abs(ucai[key] - trl[key]):.2e}")
    if abs(ucai["loss"] - trl["loss"]) > LOSS_TOLERANCE:
        raise SystemExit(f"loss mismatch: ucai {ucai['loss']:.7f} vs trl {trl['loss']:.7f} (> {LOSS_TOLERANCE})")
    print(f"losses match to {LOSS_TOLERANCE:g}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per epoch (pairs = steps x batch)")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs before the timed one")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, in alternating order")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grouped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--trl-data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found (the benchmark data ships in ../shared); nothing to compare on")
    with tempfile.TemporaryDirectory(prefix="ucai-bench-dpo-") as tmp:
        workdir = Path(tmp)
        ucai_file, trl_file, info = prepare(workdir, args.steps * args.batch, args.max_length)
        print(
            f"SmolLM2-135M, LoRA r={LORA['r']} alpha {LORA['alpha']} on {'/'.join(LORA['target_modules'])}, sigmoid DPO "
            f"beta {BETA}, AdamW lr {LEARNING_RATE:g} linear decay, grad clip 1.0, bf16 autocast, batch {args.batch} "
            f"pairs, {info['pairs']} hh-rlhf pairs <= {args.max_length} tokens per sequence (mean "
            f"{info['mean_tokens_per_pair']:.0f} tokens per pair, {info['mean_reply_tokens_per_pair']:.0f} of them "
            f"reply), {args.warmup_epochs} warm-up epoch(s) + 1 timed epoch of {args.steps} steps, {args.repeats} "
            f"repeats in alternating order, torch threads {args.threads or 'default'} on {os.cpu_count()} cores",
            flush=True,
        )
        data = {"ucai": ucai_file, "trl": trl_file}
        check_losses(args, data, workdir)
        trials = run_alternating(list(CONFIGS), args.repeats, lambda name, r: spawn(name, r, args, data, workdir))
    for unit in ("pairs", "tokens"):
        check_same_work(
            {f"{name} run {i + 1}": r[f"timed_{unit}"] for name, rs in trials.items() for i, r in enumerate(rs)},
            f"timed {unit}",
        )
    summary = {
        name: {"pairs_per_s": median_of(rs, "pairs_per_s"), "peak_rss_mb": median_of(rs, "peak_rss_mb")}
        for name, rs in trials.items()
    }
    for name, s in summary.items():
        print(f"{name:54s} median {s['pairs_per_s']:6.3f} pairs/s  peak RSS {s['peak_rss_mb']:6.0f} MB")

    def ratios(a: dict, b: dict) -> str:
        return f"speed_ratio={a['pairs_per_s'] / b['pairs_per_s']:.2f} memory_ratio={a['peak_rss_mb'] / b['peak_rss_mb']:.2f}"

    ucai = summary[UCAI]
    trl_names = [n for n in CONFIGS if CONFIGS[n]["side"] == "trl"]
    for name in trl_names:
        print(f"ucai vs {name}: {ratios(ucai, summary[name])}")
    best_name = max(trl_names, key=lambda n: summary[n]["pairs_per_s"])
    print(f"peer's best: {best_name}")
    print(f"dpo: {ratios(ucai, summary[best_name])}")


if __name__ == "__main__":
    main()
