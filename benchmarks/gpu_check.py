"""Every training stage on one CUDA device, each with a learning check, in under 8 minutes.

    python benchmarks/gpu_check.py                    # on a GPU machine (one H200: ~3-5 min)
    python benchmarks/gpu_check.py --device cpu       # smoke test of this script on CPU
    python benchmarks/gpu_check.py --only sft-nf4     # one check (names below)

Checks, each through the real stage module and a Lightning ``Trainer``
(``accelerator="cuda"``, ``precision="bf16-mixed"``, one device):

===========  ===============================================  ===============================
name         what runs                                        passes when
===========  ===============================================  ===============================
generation   ``CritiqueRevisionModule`` predict, 16 prompts   every prompt gets a row with one
             (the shared batched ``generate``)                critique and one revision
sft          ``SFTModule``, LoRA, 60 steps on 8 pairs         the loss halves (first three
                                                              steps vs last three)
reward       ``RewardModule``, LoRA + head, 30 steps on the   train accuracy and margin rise,
             marker-word pairs (chosen holds "kindly")        held-out accuracy >= 0.75
ppo          ``PPOModule``, LoRA + value head, 16 rollout     the ``token:<id>`` score rises
             batches, synthetic ``token:<id>`` reward         by 0.3 to above 0.6, KL < 20
sft-nf4      as sft, base weights in NF4 (QLoRA,              as sft, and the base layers
             bitsandbytes)                                    really are 4-bit
sft-fsdp     as sft, under FSDP                               as sft
reward-fsdp  as reward, under FSDP                            as reward
ppo-fsdp     as ppo, under FSDP                               as ppo
===========  ===============================================  ===============================

FSDP uses the shipped ``configs/strategies/fsdp.yaml`` settings (FULL_SHARD, one unit
per ``LlamaDecoderLayer``, full state dict) on one device. Nothing is downloaded: the
model is a random-init Llama (``--hidden``, ``--layers``) saved to a temporary local
folder with a byte-level BPE tokenizer trained in a second on the repo's own texts, so
the stages load it as users load any local model (``from_pretrained``; NF4 through
bitsandbytes). Data: the shipped red-team prompts, ``tests/fixtures/
preferences_small.jsonl`` and eight prompt/response pairs to memorise.

Each check runs in its own subprocess (a crash, a CUDA error or an FSDP process group
cannot leak into the next) and prints ``PASS``/``FAIL``/``SKIPPED``, its settings, its
seconds and what it measured (or the error). A global deadline (``--budget``, 470 s)
kills a check that runs past it and fails the checks left. The last line is
``gpu_check: N/M passed``; the exit status is 0 only when N == M.

``--device cpu`` runs generation, sft, reward and ppo in float32 on CPU (about two
minutes on two cores) and reports the CUDA-only checks (NF4, FSDP) as SKIPPED, outside
M. sft-nf4 needs ``bitsandbytes`` importable; without it the check fails saying so.
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
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFERENCES = ROOT / "tests" / "fixtures" / "preferences_small.jsonl"
PROMPTS = ROOT / "data" / "red_team_prompts.jsonl"
RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class Check:
    name: str
    stage: str  # generation, sft, reward or ppo
    strategy: str = "auto"  # auto or fsdp
    quantization: str | None = None
    cuda_only: bool = False
    cap_s: int = 120  # the most one check may take, within the global budget

    def settings(self, precision: str) -> str:
        parts = [precision] + ([self.quantization] if self.quantization else [])
        return "+".join(parts + ([self.strategy] if self.strategy != "auto" else []))


CHECKS = [
    Check("generation", "generation", cap_s=90),
    Check("sft", "sft"),
    Check("reward", "reward"),
    Check("ppo", "ppo", cap_s=150),
    Check("sft-nf4", "sft", quantization="nf4", cuda_only=True),
    Check("sft-fsdp", "sft", strategy="fsdp", cuda_only=True),
    Check("reward-fsdp", "reward", strategy="fsdp", cuda_only=True),
    Check("ppo-fsdp", "ppo", strategy="fsdp", cuda_only=True, cap_s=150),
]
BY_NAME = {check.name: check for check in CHECKS}

# Eight short pairs the model can memorise in a few dozen LoRA steps.
MEMORISE = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey and wax."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("What do cows drink?", "Cows drink water, not milk."),
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Every linear layer and the output head: a random model's hidden states carry no
# knowledge to steer, so the head's adapter is what lets it memorise within seconds.
SFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------- local model


def corpus() -> list[str]:
    """Texts to train the tokenizer on: everything the checks will feed the model."""
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    for line in PREFERENCES.read_text().splitlines():
        row = json.loads(line)
        texts += [row["prompt"], row["chosen"], row["rejected"]]
    texts += [text for pair in MEMORISE for text in pair]
    texts.append("system user assistant You are a helpful assistant.")
    return texts


def build_local_model(
    folder: Path, hidden: int, layers: int, embedding_std: float = 0.1, vocab_size: int = 1024
) -> Path:
    """A random-init Llama and a byte-level BPE tokenizer with a ChatML template, saved as
    a Hugging Face folder. A small vocabulary keeps the output head cheap and lets the
    learning checks see signal within a few dozen steps."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the report to one line per check

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    tokenizer.model_max_length = 512
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 2),
        num_key_value_heads=max(hidden // 64, 1),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # Tied embeddings at the usual std 0.02 cap every logit near +-0.02 * hidden:
        # LoRA could then barely move the output distribution. Trained models have
        # larger embeddings; this std gives the learning checks room to show learning.
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=embedding_std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- one check (child)


def make_trainer(args, check: Check, max_steps: int, callbacks: list, **extra):
    import lightning as L

    strategy = "auto"
    if check.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # As configs/strategies/fsdp.yaml.
        strategy = FSDPStrategy(
            sharding_strategy="FULL_SHARD", auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full"
        )
    return L.Trainer(
        accelerator="cuda" if args.device == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        precision=args.precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=args.work,
        callbacks=callbacks,
        **extra,
    )


def mean_of(values: list[float], first: bool, n: int = 3) -> float:
    window = values[:n] if first else values[-n:]
    return statistics.mean(window)


def check_generation(args, check: Check) -> tuple[bool, str]:
    from ucai.data.prompt_datamodule import PromptDataModule
    from ucai.stages.critique_revision import CritiqueRevisionModule
    from ucai.stages.generation import GenerationSettings

    prompts = 16
    output = Path(args.work) / "sl.jsonl"
    module = CritiqueRevisionModule(
        model=args.model,
        output=str(output),
        generation=GenerationSettings(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=1.0),
        max_prompt_tokens=256,
        few_shot=False,
    )
    trainer = make_trainer(args, check, max_steps=-1, callbacks=[])
    start = time.perf_counter()
    trainer.predict(module, datamodule=PromptDataModule(path=str(PROMPTS), limit=prompts, batch_size=8), return_predictions=False)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in output.read_text().splitlines()] if output.exists() else []
    # A random model may say little, but every row has one critique and one revision.
    complete = [r for r in rows if len(r["critiques"]) == len(r["revisions"]) == 1 and r["mode"] == "critique_revision"]
    tokens = module._meter.tokens if module._meter is not None else 0
    detail = (
        f"{len(complete)}/{prompts} rows with a critique and a revision; {tokens} tokens generated "
        f"({tokens / seconds:.0f} tok/s over {seconds:.1f} s, three batched steps per batch)"
    )
    return len(complete) == prompts and tokens >= 3 * prompts, detail


class _LossRecorder:
    """Callback factory: the training loss of every step."""

    @staticmethod
    def make():
        import lightning as L

        class Recorder(L.Callback):
            def __init__(self):
                self.losses: list[float] = []
                self.metrics: list[dict[str, float]] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                if loss is not None:
                    self.losses.append(float(loss))
                self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

        return Recorder()


def base_linear_type(module) -> str:
    """Class name of the first decoder layer's frozen q_proj (``Linear4bit`` under NF4)."""
    try:
        return type(module._causal_lm().model.layers[0].self_attn.q_proj.base_layer).__name__
    except AttributeError as exc:  # a wrapper that hides the layers: say so, do not fail
        return f"unknown ({exc})"


def check_sft(args, check: Check) -> tuple[bool, str]:
    from ucai.data.sft_data import SFTDataModule
    from ucai.models import LoraSettings
    from ucai.stages.sft import SFTModule

    if check.quantization == "nf4":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return False, "bitsandbytes is not installed (carry its wheel to the GPU machine)"
    data = Path(args.work) / "memorise.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in MEMORISE))
    module = SFTModule(
        model=args.model,
        output_dir=str(Path(args.work) / "sl_model"),
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=SFT_TARGETS),
        quantization=check.quantization,
        learning_rate=3e-3,
        warmup_steps=0,
        schedule="constant",
        export=False,
    )
    recorder = _LossRecorder.make()
    steps = 60
    trainer = make_trainer(args, check, max_steps=steps, callbacks=[recorder])
    trainer.fit(module, datamodule=SFTDataModule(path=str(data), val_fraction=0, batch_size=4, max_length=128))
    losses = recorder.losses
    if len(losses) < steps:
        return False, f"only {len(losses)} of {steps} steps ran"
    first, last = mean_of(losses, True), mean_of(losses, False)
    base = base_linear_type(module)
    trace = " ".join(f"{x:.2f}" for x in losses[::5])
    detail = f"loss {first:.3f} -> {last:.3f} over {steps} steps (every 5th: {trace}; q_proj base: {base})"
    if check.quantization == "nf4" and "4bit" not in base:
        return False, detail + "; the base weights are not 4-bit"
    return last < first / 2, detail


def check_reward(args, check: Check) -> tuple[bool, str]:
    from ucai.data.preference_data import PreferenceDataModule
    from ucai.models import LoraSettings
    from ucai.stages.reward import RewardModule

    module = RewardModule(
        model=args.model,
        output_dir=None,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        learning_rate=1e-2,
    )
    recorder = _LossRecorder.make()
    steps = 30  # 80 training pairs, 8 a batch: three epochs
    trainer = make_trainer(args, check, max_steps=steps, callbacks=[recorder], check_val_every_n_epoch=3)
    datamodule = PreferenceDataModule(path=str(PREFERENCES), max_length=64, batch_size=8, val_size=16)
    trainer.fit(module, datamodule=datamodule)
    accuracy = [m["train/accuracy_step"] for m in recorder.metrics if "train/accuracy_step" in m]
    margin = [m["train/margin_step"] for m in recorder.metrics if "train/margin_step" in m]
    if len(accuracy) < steps or len(margin) < steps:
        return False, f"only {len(accuracy)} of {steps} steps logged accuracy"
    val = float(trainer.callback_metrics.get("val/accuracy", float("nan")))
    acc_first, acc_last = mean_of(accuracy, True, 5), mean_of(accuracy, False, 5)
    margin_first, margin_last = mean_of(margin, True, 5), mean_of(margin, False, 5)
    detail = (
        f"train accuracy {acc_first:.2f} -> {acc_last:.2f}, margin {margin_first:.2f} -> {margin_last:.2f}, "
        f"held-out accuracy {val:.2f}"
    )
    learned = acc_last >= acc_first + 0.2 and acc_last >= 0.8 and margin_last > margin_first + 0.5 and val >= 0.75
    return learned, detail


def check_ppo(args, check: Check) -> tuple[bool, str]:
    import lightning as L

    from ucai.chat import render_chat
    from ucai.data.prompt_datamodule import PromptDataModule
    from ucai.models import LoraSettings, load_tokenizer
    from ucai.stages.generation import GenerationSettings
    from ucai.stages.ppo import PPOModule

    # The rewarded token is the last one of every rendered prompt ("\n" after the
    # assistant header): with tied embeddings a random model copies it now and then,
    # so the very first batches already carry signal (as in tests/test_ppo_learning.py).
    tokenizer = load_tokenizer(args.model)
    header = render_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    token = tokenizer(header, add_special_tokens=False)["input_ids"][-1]

    class Scores(L.Callback):
        def __init__(self):
            self.scores: list[float] = []
            self.kls: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.scores.append(pl_module.last_stats["objective/raw_scores"])
            self.kls.append(pl_module.last_stats["objective/kl"])

    module = PPOModule(
        policy=args.model,
        reward_model=f"token:{token}",
        lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"]),
        ppo_epochs=2,
        minibatch_size=8,
        learning_rate=3e-3,
        lr_schedule="constant",
        kl_coef=0.05,
        missing_eos_penalty=0.0,  # a random model never says eos; the penalty would be a constant
        generation=GenerationSettings(max_new_tokens=4, temperature=args.ppo_temperature, top_p=1.0),
        max_prompt_tokens=256,
        export=False,
    )
    record = Scores()
    iterations = 16
    trainer = make_trainer(args, check, max_steps=iterations * 2, callbacks=[record])  # 2 epochs x 1 minibatch
    trainer.fit(module, datamodule=PromptDataModule(path=str(PROMPTS), limit=96, batch_size=8, split="train"))
    if len(record.scores) < iterations:
        return False, f"only {len(record.scores)} of {iterations} rollout batches ran"
    start, end = mean_of(record.scores, True), mean_of(record.scores, False)
    trace = " ".join(f"{x:.2f}" for x in record.scores)
    detail = f"score {start:.2f} -> {end:.2f} over {iterations} rollout batches ({trace}), max KL {max(record.kls):.2f}"
    return end > start + 0.3 and end > 0.6 and max(record.kls) < 20.0, detail


RUNNERS = {"generation": check_generation, "sft": check_sft, "reward": check_reward, "ppo": check_ppo}


def run_one(args) -> int:
    """Child process: run one check and print its result as one JSON line."""
    import warnings

    import lightning as L

    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings("ignore", category=UserWarning)
    check = BY_NAME[args.run_check]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    try:
        ok, detail = RUNNERS[check.stage](args, check)
    except Exception as exc:  # the parent reports the reason; the traceback goes to stderr
        traceback.print_exc()
        ok, detail = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    print(RESULT_PREFIX + json.dumps({"ok": ok, "detail": detail}), flush=True)
    return 0


# --------------------------------------------------------------------------- driver (parent)


def run_in_subprocess(args, check: Check, timeout: float) -> tuple[str, str, str]:
    """(status, detail, stderr tail) of one check run in a fresh interpreter."""
    command = [
        sys.executable, __file__, "--run-check", check.name, "--device", args.device,
        "--precision", args.precision, "--model", args.model, "--work", str(Path(args.work) / check.name),
        "--ppo-temperature", str(args.ppo_temperature),
    ]
    Path(args.work, check.name).mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny matmuls: more threads only contend
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return "FAIL", f"out of time: killed after {timeout:.0f} s", stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        return "FAIL", f"the check process exited with status {proc.returncode} without a result", proc.stderr
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    return ("PASS" if result["ok"] else "FAIL"), result["detail"], proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), help="run these checks alone")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for everything (default: 470)")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the random-init Llama")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ppo-temperature", dest="ppo_temperature", type=float, default=0.7)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)  # set by the parent
    parser.add_argument("--run-check", dest="run_check", choices=list(BY_NAME), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.run_check:
        return run_one(args)

    deadline = time.monotonic() + args.budget
    checks = [BY_NAME[name] for name in args.only] if args.only else CHECKS
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        args.work = args.work or scratch
        started = time.perf_counter()
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("gpu_check: no CUDA device here; use --device cpu for a smoke test", flush=True)
                print(f"gpu_check: 0/{len(checks)} passed", flush=True)
                return 1
            print(f"device: {torch.cuda.get_device_name(0)}, precision {args.precision}", flush=True)
        try:
            args.model = str(build_local_model(Path(args.work) / "model", args.hidden, args.layers))
        except Exception as exc:  # nothing can run without the model: say why, keep the last line
            traceback.print_exc()
            print(f"gpu_check: could not build the local model: {type(exc).__name__}: {exc}", flush=True)
            print(f"gpu_check: 0/{sum(not c.cuda_only or args.device == 'cuda' for c in checks)} passed", flush=True)
            return 1
        print(f"local random-init model: {args.model} ({time.perf_counter() - started:.1f} s)", flush=True)

        passed = counted = 0
        for check in checks:
            if check.cuda_only and args.device != "cuda":
                print(f"SKIPPED {check.name:12s} needs CUDA", flush=True)
                continue
            counted += 1
            left = deadline - time.monotonic()
            if left < 20:
                print(f"FAIL    {check.name:12s} out of time: {left:.0f} s of the budget left", flush=True)
                continue
            start = time.perf_counter()
            status, detail, stderr = run_in_subprocess(args, check, min(check.cap_s, left))
            seconds = time.perf_counter() - start
            label = f"[{check.settings(args.precision)}]"
            print(f"{status:7s} {check.name:12s} {label:22s} {seconds:6.1f} s  {detail}", flush=True)
            if status == "PASS":
                passed += 1
            else:
                tail = [line for line in stderr.splitlines() if line.strip()][-15:]
                for line in tail:
                    print(f"    | {line}", flush=True)
    print(f"gpu_check: {passed}/{counted} passed", flush=True)
    return 0 if passed == counted else 1


if __name__ == "__main__":
    sys.exit(main())
