"""SFTModule: loss maths, memorisation + generation, export, resume, QLoRA on CPU,
settings out of range, and the shipped configs (two-process DDP: tests/test_ddp.py; the
learning-rate schedule: tests/test_lr_schedule.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch
import pytest
import torch

from ucai.errors import UcaiError

ROOT = Path(__file__).resolve().parents[1]
TINY_CONF = ROOT / "tests" / "conf" / "sft_tiny.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "sl_small.jsonl"
SYSTEM = "You are a helpful assistant."


def test_response_token_loss_by_hand():
    from ucai.stages.sft import response_token_loss

    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    # Position t predicts labels[t + 1]: targets are [0, 1, -100 (cut)], so positions 0
    # and 1 count and position 2 (the last) has nothing to predict.
    hidden = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    # position 0: logits [0, 0], target 0 -> -log(1/2) = ln 2 = 0.693147
    # position 1: logits [ln 3, 0], target 1 -> p = 1 / (3 + 1) -> ln 4 = 1.386294
    loss, count = response_token_loss(hidden, labels, head)
    assert count == 2
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)  # 1.039721
    total, _ = response_token_loss(hidden, labels, head, reduction="sum")
    assert total.item() == pytest.approx(math.log(8), abs=1e-6)  # ln 2 + ln 4
    # Nothing labelled: zero loss that still reaches the graph (DDP needs every grad).
    hidden.requires_grad_(True)
    empty, n = response_token_loss(hidden, torch.full((1, 3), -100), head)
    assert n == 0 and empty.item() == 0.0 and empty.requires_grad


def test_memorises_generates_and_exports_a_loadable_merged_model(tmp_path, tiny_trainer):
    """LoRA on every linear layer of tiny-llama, high LR: the training loss falls and
    greedy decoding reproduces the trained replies, from the LoRA model and from the
    exported merged model loaded with AutoModelForCausalLM."""
    import lightning as L
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucai.chat import render_chat
    from ucai.data.sft_data import SFTDataModule
    from ucai.models import LoraSettings, load_causal_lm
    from ucai.stages.generation import GenerationSettings, generate
    from ucai.stages.sft import SFTModule

    rows = [
        {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
        {"prompt": "How many legs does a spider have?", "response": "A spider has eight legs."},
    ]
    data = tmp_path / "sl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)  # peft draws the LoRA A matrices from the global RNG
    module = SFTModule(
        model="tiny-llama",
        output_dir=str(tmp_path / "sl_model"),
        lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        learning_rate=1e-2,
        warmup_steps=0,
        schedule="constant",
    )
    datamodule = SFTDataModule(path=str(data), val_fraction=0, batch_size=2, max_length=64)
    module.configure_model()
    datamodule.tokenizer = module.tokenizer
    datamodule.setup("fit")
    first_batch = next(iter(datamodule._loader(datamodule.train_examples, shuffle=False)))
    with torch.no_grad():
        initial_loss = module.forward_loss(first_batch)[0].item()
    trainer = tiny_trainer(tmp_path, 30, logger=False)
    trainer.fit(module, datamodule)
    with torch.no_grad():
        final_loss = module.forward_loss(first_batch)[0].item()
    assert initial_loss > 10.5  # ~ln(49152) = 10.8 for a random model
    assert final_loss < initial_loss - 1.0

    tokenizer = module.tokenizer
    prompts = [render_chat(tokenizer, [{"role": "user", "content": r["prompt"]}], SYSTEM) for r in rows]
    greedy = GenerationSettings(max_new_tokens=16, do_sample=False)
    assert generate(module.lm, tokenizer, prompts, greedy).texts == [r["response"] for r in rows]

    out = tmp_path / "sl_model"
    merged = AutoModelForCausalLM.from_pretrained(out)
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.chat_template and "<|im_start|>" in merged_tokenizer.chat_template
    merged_tokenizer.padding_side = "left"
    assert generate(merged, merged_tokenizer, prompts, greedy).texts == [r["response"] for r in rows]
    # The adapter alone, on a fresh base, gives the same model.
    adapted = PeftModel.from_pretrained(load_causal_lm("tiny-llama"), out / "adapter")
    assert generate(adapted, merged_tokenizer, prompts, greedy).texts == [r["response"] for r in rows]
    info = json.loads((out / "ucai_sft.json").read_text())
    assert info["global_step"] == 30 and info["system_prompt"] == SYSTEM
    # Asked without a system message, the exported template puts the trained one first
    # (not the template's own default): plain transformers answers as trained.
    plain = [merged_tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                  add_generation_prompt=True) for r in rows]
    assert plain == prompts
    assert generate(merged, merged_tokenizer, plain, greedy).texts == [r["response"] for r in rows]
    assert tokenizer.chat_template != merged_tokenizer.chat_template  # the training tokenizer keeps its own


def test_frozen_weights_in_bf16_change_nothing_under_bf16_mixed(tmp_path, tiny_trainer):
    # Autocast rounds the weight of every matmul to bf16 anyway, so holding LoRA's frozen
    # base layers in bf16 must leave every step's loss and the trained adapter bit for bit
    # as they were (LoRA dropout on: the same random draws), and the export must merge
    # into the base re-read at full precision, not its bf16 rounding.
    import lightning as L
    from safetensors.torch import load_file

    from ucai.data.sft_data import SFTDataModule
    from ucai.models import LoraSettings
    from ucai.stages.sft import SFTModule

    class RecordLoss(L.Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    runs = {}
    for cast in (False, True):
        L.seed_everything(0)
        module = SFTModule(
            model="tiny-llama",
            output_dir=str(tmp_path / f"sl_{cast}"),
            lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"]),
            learning_rate=1e-2,
            warmup_steps=0,
            frozen_linear_bf16=cast,
        )
        record = RecordLoss()
        trainer = tiny_trainer(tmp_path, 3, logger=False, precision="bf16-mixed", callbacks=[record])
        trainer.fit(module, SFTDataModule(path=str(FIXTURE), val_fraction=0, batch_size=4, max_length=64))
        runs[cast] = (module, record.losses)
    module, losses = runs[True]
    layer = module._causal_lm().model.layers[0]
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16  # adapted: its frozen base
    assert layer.self_attn.k_proj.weight.dtype == torch.bfloat16  # not adapted
    assert layer.self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32  # trained: untouched
    assert module._causal_lm().get_input_embeddings().weight.dtype == torch.float32  # tied to lm_head
    assert runs[False][0]._causal_lm().model.layers[0].self_attn.k_proj.weight.dtype == torch.float32
    assert len(losses) == 3 and losses == runs[False][1]
    assert losses[-1] != losses[0]  # it trained
    exported = {cast: load_file(tmp_path / f"sl_{cast}" / "model.safetensors") for cast in (False, True)}
    assert exported[True].keys() == exported[False].keys()
    for name, tensor in exported[False].items():
        assert tensor.dtype == torch.float32 and torch.equal(exported[True][name], tensor), name


def _tensorboard_steps(version_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = version_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [s.step for s in accumulator.Scalars(tag)]


def test_cli_fit_small_checkpoint_and_exact_resume(tmp_path, monkeypatch, run_cli):
    """3 steps, then ``--ckpt_path last`` to 5 steps, gives bit-for-bit the adapter of 5
    steps in one go: same step, same optimizer state, and (the loader is checkpointed)
    the same remaining batches of the interrupted epoch (10 train examples / batch 4 =
    3 batches an epoch, so step 3 stops mid-epoch). LoRA dropout is on, so the RNG
    states must be restored too."""
    base = ["fit", "--config", TINY_CONF, "--data.init_args.path", FIXTURE,
            "--model.init_args.lora.dropout=0.3",
            "--model.init_args.schedule=constant"]  # the schedule length depends on max_steps
    straight = tmp_path / "straight"
    straight.mkdir()
    monkeypatch.chdir(straight)
    assert run_cli(*base, "--trainer.max_steps=5") == 0

    monkeypatch.chdir(tmp_path)
    assert run_cli(*base, "--trainer.max_steps=3") == 0
    checkpoint = tmp_path / "lightning_logs" / "sft_tiny" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    # Only the adapter (2 layers x q,v x A,B = 8 tensors), not the 3M-parameter base.
    assert len(saved["state_dict"]) == 8 and all("lora_" in k for k in saved["state_dict"])
    assert checkpoint.stat().st_size < 200_000
    first_run = tmp_path / "lightning_logs" / "sft_tiny" / "version_0"
    exported = json.loads((first_run / "exported_model.json").read_text())
    assert exported["global_step"] == 3
    # The saved config and the model's note name the code that made them.
    from ucai.provenance import ucai_version

    assert exported["ucai_version"] == ucai_version()
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout (not an unpacked sdist)
        assert " (git " in ucai_version()
    assert (first_run / "config.yaml").read_text().splitlines()[:2] == [
        f"# lightning.pytorch=={lightning.pytorch.__version__}", f"# {ucai_version()}"
    ]

    assert run_cli(*base, "--trainer.max_steps=5", "--ckpt_path", "last") == 0
    resumed = tmp_path / "lightning_logs" / "sft_tiny" / "version_1"
    assert _tensorboard_steps(resumed, "train/loss") == [3, 4]  # continues, not from 0
    note = json.loads((resumed / "exported_model.json").read_text())
    assert note["global_step"] == 5
    assert Path(note["output_dir"]) == tmp_path / "lightning_logs" / "models" / "tiny" / "sl_model"
    assert (Path(note["output_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
    final = torch.load(checkpoint, map_location="cpu", weights_only=True)
    reference = torch.load(straight / "lightning_logs" / "sft_tiny" / "checkpoints" / "last.ckpt",
                           map_location="cpu", weights_only=True)
    assert final["global_step"] == reference["global_step"] == 5
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    key = next(k for k in saved["state_dict"] if "lora_B" in k)
    assert not torch.equal(saved["state_dict"][key], final["state_dict"][key])  # it did train on


def test_nf4_on_cpu_fails_before_reading_anything(tmp_path, monkeypatch, run_cli, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nf4 is allowed")
    monkeypatch.chdir(tmp_path)
    # The data file does not exist: the nf4 error must come first (no data, no weights read).
    code = run_cli("fit", "--config", TINY_CONF, "--data.init_args.path", tmp_path / "nope.jsonl",
                   "--model.init_args.quantization=nf4")
    err = capsys.readouterr().err
    assert code == 2
    assert "ucai: error:" in err and "nf4" in err and "CUDA" in err and "nope.jsonl" not in err
    from ucai.stages.sft import SFTModule

    with pytest.raises(UcaiError, match="needs a CUDA GPU"):
        SFTModule(model="tiny-llama", quantization="nf4").prepare_data()


def test_missing_sl_file_names_the_stage_that_makes_it(tmp_path, monkeypatch, run_cli, capsys):
    monkeypatch.chdir(tmp_path)
    code = run_cli("fit", "--config", TINY_CONF, "--data.init_args.path", "lightning_logs/data/ethical/sl.jsonl")
    err = capsys.readouterr().err
    assert code == 2
    assert "lightning_logs/data/ethical/sl.jsonl: SFT data not found" in err and "critique-revision" in err


@pytest.mark.parametrize("strategy", [None, "ddp", "fsdp", "deepspeed_stage_2", "multinode_ddp"])
@pytest.mark.parametrize("side", ["ethical", "unethical"])
def test_shipped_configs_parse_and_compose(side, strategy, capsys, run_cli):
    args = ["fit", "--config", ROOT / "configs" / f"sft_{side}.yaml"]
    if strategy:
        args += ["--config", ROOT / "configs" / "strategies" / f"{strategy}.yaml"]
    assert run_cli(*args, "--print_config") == 0
    printed = capsys.readouterr().out
    assert f"path: lightning_logs/data/{side}/sl.jsonl" in printed
    assert f"output_dir: lightning_logs/models/{side}/sl_model" in printed
    if strategy:
        expected = {"fsdp": "FSDPStrategy", "deepspeed_stage_2": "DeepSpeedStrategy"}.get(strategy, "DDPStrategy")
        assert expected in printed


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("learning_rate", "0"),
        ("warmup_ratio", "1.5"),
        ("min_lr_ratio", "-0.1"),
        ("lora.r", "0"),
        ("betas", "[0.9,1.0]"),
    ],
)
def test_an_out_of_range_setting_is_one_line_naming_it(option, value, run_cli, capsys):
    assert run_cli("fit", "--config", TINY_CONF, f"--model.init_args.{option}={value}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucai: error: --model.init_args."), lines
    assert option.split(".")[-1] in lines[0] and value.strip("[]").split(",")[-1] in lines[0], lines
