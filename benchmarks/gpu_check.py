"""GPU check of SFTModule: bf16-mixed and FSDP on a random-init ~1B Llama, a few steps.

    python benchmarks/gpu_check.py                  # both checks, ~2-4 min on one H100
    python benchmarks/gpu_check.py --steps 6 --batch 4 --seq 512

Needs no internet and no downloaded model or tokenizer: the model is a random-init
Llama (TinyLlama-1.1B shape with SmolLM2's 49,152-token vocabulary, ~1.07B parameters)
built inside `SFTModule.load_base_model`, and the batches are random token ids with a
random prompt/response split, through the real `LengthBucketSampler` and padding-free
packing of `ucai.data.sft_data`. Each check runs in its own subprocess so the CUDA
peak-memory counters and the process group start clean. Prints one line per check:
tokens/s (non-pad, timed steps after warm-up) and peak GPU memory
(``torch.cuda.max_memory_allocated``), then ``gpu_check: ok`` if every check trained
(finite losses; the first and last loss are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHECKS = {
    # name: (strategy, precision, lora)
    "bf16-mixed, LoRA r=16 all-linear": ("auto", "bf16-mixed", True),
    "FSDP (1 GPU) bf16-mixed, LoRA r=16 all-linear": ("fsdp", "bf16-mixed", True),
    "FSDP (1 GPU) bf16-true, full fine-tuning": ("fsdp", "bf16-true", False),
}


def llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def run_check(args) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from ucai.data.sft_data import Encoded, LengthBucketSampler, _BatchDataset
    from ucai.models import LoraSettings
    from ucai.stages.sft import SFTModule

    strategy_name, precision, use_lora = CHECKS[args.check]

    class RandomLlamaSFT(SFTModule):
        def load_tokenizer(self):
            return None  # batches are token ids already

        def load_base_model(self, dtype):
            from ucai.models import tiny_llama_config

            config = tiny_llama_config() if args.cpu_smoke else llama_1b_config()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return LlamaForCausalLM(config).to(dtype)

    cuda = not args.cpu_smoke
    if args.cpu_smoke:
        strategy_name = "auto"  # Lightning's FSDP needs CUDA

    def sync():
        if cuda:
            torch.cuda.synchronize()

    generator = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + args.warmup)
    examples = []
    for _ in range(n):
        length = int(torch.randint(args.seq // 2, args.seq + 1, (1,), generator=generator))
        prompt = int(torch.randint(8, length // 2, (1,), generator=generator))
        # A small repeated vocabulary so the loss has something to learn in a few steps.
        ids = torch.randint(3, 512, (length,), generator=generator)
        examples.append(Encoded(ids, prompt))
    sampler = LengthBucketSampler([len(e) for e in examples], args.batch, shuffle=True, seed=0)
    loader = DataLoader(_BatchDataset(examples, packing=True, pad_id=0), sampler=sampler, batch_size=None)

    times, tokens, losses = [], [], []

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            sync()
            self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            now = time.perf_counter()
            times.append(now - self.last)
            tokens.append(int(batch["num_tokens"]))
            losses.append(float(outputs["loss"]))
            self.last = now

    module = RandomLlamaSFT(
        model="random-llama-1b",
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear") if use_lora else None,
        learning_rate=1e-3 if use_lora else 1e-4, warmup_steps=0, schedule="constant",
        gradient_checkpointing=args.gc, export=False,
    )
    strategy = (
        FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy="FULL_SHARD", state_dict_type="full")
        if strategy_name == "fsdp" else "auto"
    )
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, precision=precision,
        max_steps=args.steps + args.warmup, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        gradient_clip_val=1.0 if strategy_name != "fsdp" else None,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    timed_t, timed_n = times[args.warmup:], tokens[args.warmup:]
    params = sum(p.numel() for p in module.parameters())
    return {
        "check": args.check,
        "params": params,
        "tokens_per_s": sum(timed_n) / sum(timed_t),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        # Finite losses; whether they fall in a few steps is printed, not required.
        "ok": all(x == x and abs(x) < 1e4 for x in losses),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", choices=list(CHECKS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512, help="longest example in tokens")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                        help="check the script itself on CPU with tiny-llama (one check, no FSDP)")
    args = parser.parse_args()
    if args.check:
        print("RESULT " + json.dumps(run_check(args)), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run this on a GPU machine", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    all_ok = True
    for name in CHECKS:
        cmd = [sys.executable, __file__, "--check", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq", str(args.seq)] + (["--gc"] if args.gc else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: FAILED ({proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            all_ok = False
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        all_ok &= r["ok"]
        print(f"{name:48s} {r['tokens_per_s']:9.0f} tokens/s  peak {r['peak_gpu_gb']:5.1f} GiB  "
              f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}  ({r['params'] / 1e9:.2f}B params, {r['device']})",
              flush=True)
    print("gpu_check: ok" if all_ok else "gpu_check: FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
