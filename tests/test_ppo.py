"""PPOModule on CPU with the tiny model: reference exactness, first-pass ratio, checkpoints,
resume, the merged export, a reward-model folder, no warnings of its own, config
resolution and errors."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from ucai.data.prompt_datamodule import PromptDataModule
from ucai.errors import UcaiError
from ucai.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from ucai.padding import position_ids, prompt_attention_mask
from ucai.resume import RNGStateCheckpoint
from ucai.reward_scoring import TokenReward
from ucai.rl import logprobs_from_logits
from ucai.stages.generation import GenerationSettings, completion_mask_from, eos_ids
from ucai.stages.ppo import AdaptiveKL, PPOCheckpoint, PPOModule

TINY = "tiny-llama"
NEWLINE = 198  # "\n" in the SmolLM2 tokenizer, the tiny_ppo fixture's reward
ROOT = Path(__file__).resolve().parents[1]
PPO_TINY = ROOT / "tests" / "conf" / "ppo_tiny.yaml"


def tiny_data(batch_size: int = 4, limit: int = 8) -> PromptDataModule:
    return PromptDataModule(limit=limit, batch_size=batch_size, split="train", shuffle=False)


def perturb_adapter(module: PPOModule, seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = identity); give it weights so it matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def sample_batch(module: PPOModule, tokenizer, n: int = 3, response_tokens: int = 5):
    """Left-padded rendered prompts followed by random response ids (B, P + T)."""
    rows = tiny_data(batch_size=n).rows()[:n]
    encoded = tokenizer(module.render([r["prompt"] for r in rows]), return_tensors="pt", padding=True, add_special_tokens=False)
    responses = torch.randint(3, 1000, (n, response_tokens), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([encoded["input_ids"], responses], dim=1)
    attention = torch.cat([encoded["attention_mask"], torch.ones_like(responses)], dim=1)
    return ids, attention, encoded["input_ids"].shape[1]


def test_reference_logprobs_equal_the_sl_model_exactly(tiny_ppo):
    module = tiny_ppo()
    module.configure_model()
    perturb_adapter(module)
    ids, attention, width = sample_batch(module, module.tokenizer)
    assert torch.equal(prompt_attention_mask(ids[:, :width], module.tokenizer.pad_token_id), attention[:, :width])
    with torch.no_grad():
        reference = module.sequence_logprobs(ids, attention, width, reference=True)
        policy = module.sequence_logprobs(ids, attention, width)
        # The SL model on its own (a second, independent copy of the same weights).
        sl = load_causal_lm(TINY, seed=0).eval()
        logits = sl(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
        own = logprobs_from_logits(logits[:, width - 1 : -1], ids[:, width:])
    assert torch.equal(reference, own), (reference - own).abs().max()
    # ... and the adapter does change the policy, so the check above is not vacuous.
    assert (policy - reference).abs().max() > 1e-3


def test_policy_logprobs_keep_gemma2_s_final_logit_softcapping(tiny_ppo, tiny_tokenizer, tmp_path):
    """Gemma 2 caps its logits after the head (tanh(x / c) * c): the policy's log-probs,
    made from the head at the response positions, are the model's own forward's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
        pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path / "gemma2"
    Gemma2ForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    module = tiny_ppo(policy=str(folder))
    module.configure_model()
    ids, attention, width = sample_batch(module, module.tokenizer)
    with torch.no_grad():
        policy = module.sequence_logprobs(ids, attention, width)
        own = load_causal_lm(str(folder)).eval()
        logits = own(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
        expected = logprobs_from_logits(logits[:, width - 1 : -1], ids[:, width:])
    assert logits.abs().max() <= 0.5  # the cap is in force (0.5 is far below the raw logits)
    assert torch.allclose(policy, expected, atol=1e-5), (policy - expected).abs().max()


def test_token_reward_is_share_of_the_chosen_token(tiny_tokenizer):
    reward = TokenReward("token:7", tiny_tokenizer)
    responses = torch.tensor([[7, 7, 5, 2], [7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    # Row 0: 2 of 4 real tokens; row 1: 1 of 1 (padding never counts).
    assert reward(responses, mask).tolist() == [0.5, 1.0]
    assert TokenReward("token:\n", tiny_tokenizer).token_id == NEWLINE
    with pytest.raises(UcaiError, match="tokens"):
        TokenReward("token:hello world", tiny_tokenizer)


def test_first_pass_has_ratio_one_and_no_clipping(tmp_path, tiny_ppo, tiny_trainer):
    # Temperature 0.7: the rollout and the update must divide the logits alike.
    module = tiny_ppo(generation=GenerationSettings(max_new_tokens=6, temperature=0.7, top_p=1.0))
    trainer = tiny_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=tiny_data(batch_size=4))
    # RNG states go into checkpoints, so a resumed run samples what the uninterrupted one would.
    assert any(isinstance(c, RNGStateCheckpoint) for c in trainer.callbacks)
    stats = module.last_stats
    assert stats["first_ratio_max_dev"] < 1e-6
    assert stats["first_clipfrac"] == 0.0
    assert stats["policy/clipfrac"] == 0.0
    assert stats["policy/approxkl"] < 1e-10
    # Every metric the field expects is logged.
    for name in (
        "objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
        "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac",
        "val/mean", "response/length", "response/eos_fraction", "perf/tokens_per_s",
    ):
        assert name in trainer.logged_metrics, name
    # The adapter starts as the identity, so the first rollout has zero KL to the reference.
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "rollouts.csv")))
    assert len(rows) == 4 and set(rows[0]) == {"step", "prompt", "response", "score", "kl", "reward"}


class _Snapshot(L.Callback):
    def on_train_start(self, trainer, module):
        self.state = {k: v.clone() for k, v in module.state_dict().items() if module.is_trainable_key(k)}
        self.kl = module.kl_ctl.value
        self.step = module.rollout_step
        self.global_step = trainer.global_step


def test_checkpoint_holds_only_trainable_state_and_resumes(tmp_path, tiny_ppo, tiny_trainer):
    def run(max_steps: int, ckpt_path=None) -> tuple[PPOModule, L.Trainer, _Snapshot]:
        module = tiny_ppo(value_head="adapter", adaptive_kl=AdaptiveKL(target=0.01, horizon=10))
        snap = _Snapshot()
        checkpoint = PPOCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
        trainer = tiny_trainer(tmp_path, max_steps, callbacks=[checkpoint, snap], enable_checkpointing=True)
        trainer.fit(module, datamodule=tiny_data(batch_size=4), ckpt_path=ckpt_path)
        return module, trainer, snap

    first, _, _ = run(max_steps=2)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    keys = set(saved["state_dict"])
    assert keys and all(".lora_" in k or k.startswith("value_head.") for k in keys)
    assert any(".lora_A.value." in k for k in keys) and any(".lora_B.policy." in k for k in keys)
    assert saved["ucai_ppo"]["rollout_step"] == 2
    # The adaptive controller moved (KL target is tiny) and its state was saved.
    assert saved["ucai_ppo"]["kl_controller"]["value"] == pytest.approx(first.kl_ctl.value)
    assert first.kl_ctl.value != pytest.approx(0.05)

    second, trainer, snap = run(max_steps=3, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    # Restored before training continued: adapters, value head, KL coefficient, steps.
    for key, value in saved["state_dict"].items():
        assert torch.equal(snap.state[key], value), key
    assert snap.kl == pytest.approx(saved["ucai_ppo"]["kl_controller"]["value"])
    assert snap.step == 2 and snap.global_step == 2
    assert second.rollout_step == 3 and trainer.global_step == 3
    # The optimiser state came back too (Adam moments for every trainable tensor).
    assert len(trainer.optimizers[0].state) == len(second._trainable)


def test_value_adapter_trains_both_adapters_and_export_is_merged(tmp_path, tiny_ppo, tiny_trainer):
    module = tiny_ppo(value_head="adapter", export=True, output_dir=str(tmp_path / "rl_model"))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if "lora_B" in n}
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=tiny_data(batch_size=4))
    changed = {n for n, p in module.policy.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])}
    assert any(".policy." in n for n in changed) and any(".value." in n for n in changed)

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "rl_model").eval()
    assert (tmp_path / "rl_model" / "tokenizer_config.json").is_file()
    ids, attention, width = sample_batch(module, module.tokenizer)
    with torch.no_grad():
        expected = module.sequence_logprobs(ids, attention, width)
        logits = exported(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
        got = logprobs_from_logits(logits[:, width - 1 : -1], ids[:, width:])
    assert torch.allclose(expected, got, atol=1e-4)


def test_reward_model_folder_is_rescored_with_its_own_tokenizer(tmp_path, tiny_ppo):
    folder = tmp_path / "rm_model"
    rm = load_sequence_classifier(TINY, seed=3)
    tokenizer = load_tokenizer(TINY, padding_side="right")
    rm.config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir()
    rm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))

    module = tiny_ppo(reward_model=str(folder), value_head="adapter")
    module.configure_model()
    # Same backbone shape: the value head starts as the reward model's head, on the scale
    # of the normalised scores: (w·h − 0.5) / 2 = (w / 2)·h − 0.25 (the RM head has no bias).
    assert rm.score.bias is None
    assert torch.allclose(module.value_head.weight, rm.score.weight / 2.0)
    assert torch.allclose(module.value_head.bias, torch.tensor([-0.25]))
    raw_scale = tiny_ppo(reward_model=str(folder), value_head="adapter", normalize_score=False)
    raw_scale.configure_model()
    assert torch.equal(raw_scale.value_head.weight, rm.score.weight)
    assert torch.equal(raw_scale.value_head.bias, torch.zeros(1))
    rollout = module.rollout(tiny_data(batch_size=3).rows()[:3])

    from ucai.reward_scoring import RewardScorer

    raw = RewardScorer(folder).raw_rewards(rollout.prompts, rollout.responses)
    # Normalised with the saved stats: (r − 0.5) / 2.
    assert torch.allclose(rollout.scores, (raw - 0.5) / 2.0, atol=1e-5)
    assert rollout.advantages.shape == rollout.mask.shape == rollout.logprobs.shape


def test_missing_stage_outputs_name_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UcaiError, match=r"sl_model not found; it is made by the SFT stage .*sft_unethical\.yaml"):
        PPOModule(policy="lightning_logs/models/unethical/sl_model", reward_model="token:1").configure_model()
    with pytest.raises(UcaiError, match=r"rm_model not found; it is made by the reward stage .*reward_ethical\.yaml"):
        PPOModule(policy=TINY, reward_model="lightning_logs/models/ethical/rm_model").configure_model()


def test_bare_config_name_resolves_to_the_shipped_config(tmp_path, monkeypatch, run_cli, capsys):
    from ucai.resources import configs_dir
    from ucai.stage_cli import resolve_config_args

    monkeypatch.chdir(tmp_path)
    args = resolve_config_args(["fit", "--config", "ppo_unethical.yaml"])
    assert Path(args[2]) == configs_dir() / "ppo_unethical.yaml"
    # The shipped config runs and stops at its first missing input, naming the stage.
    assert run_cli("fit", "--config", "ppo_unethical.yaml") == 2
    err = capsys.readouterr().err
    assert "sl_model" in err and "sft_unethical.yaml" in err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (GenerationSettings(max_new_tokens=4), r"generation\.top_p is 0\.9.*set generation\.top_p: 1\.0"),
        (GenerationSettings(top_p=1.0, top_k=50), r"generation\.top_k is 50.*set generation\.top_k: 0"),
        (GenerationSettings(top_p=1.0, repetition_penalty=1.2), r"generation\.repetition_penalty is 1\.2.*: 1\.0"),
    ],
)
def test_sampling_that_changes_the_distribution_is_refused(settings, message, tiny_ppo):
    with pytest.raises(UcaiError, match=message):
        tiny_ppo(generation=settings)


def test_sampling_at_temperature_zero_is_refused_and_greedy_at_zero_is_accepted():
    with pytest.raises(UcaiError, match=r"generation.temperature: must be > 0 when sampling"):
        GenerationSettings(top_p=1.0, temperature=0.0)
    assert GenerationSettings(do_sample=False, temperature=0.0).to_kwargs()["do_sample"] is False


def test_shipped_and_test_configs_use_plain_sampling():
    import yaml

    from ucai.resources import configs_dir
    from ucai.stages.sampling import check_plain_sampling

    sides = ("ethical", "unethical")
    shipped = [configs_dir() / f"{algorithm}_{side}.yaml" for algorithm in ("ppo", "rloo") for side in sides]
    for path in (*shipped, PPO_TINY, PPO_TINY.with_name("rloo_tiny.yaml")):
        generation = yaml.safe_load(path.read_text())["model"]["init_args"]["generation"]
        check_plain_sampling(GenerationSettings(**generation))  # raises if not


def test_rollout_logprobs_are_those_of_the_sampler(tiny_ppo):
    # The processed scores `generate` samples from (after the temperature warper) give
    # the sampled tokens the log-probs the rollout computes, at temperature 0.7.
    module = tiny_ppo(generation=GenerationSettings(max_new_tokens=5, temperature=0.7, top_p=1.0))
    module.configure_model()
    perturb_adapter(module)
    tokenizer = module.tokenizer
    tokenizer.padding_side = "left"
    encoded = tokenizer(module.render(["Hi", "Tell me a story"]), return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    module.policy.eval()
    out = module.policy.generate(
        **encoded, **module.generation.to_kwargs(), output_scores=True, return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    width = encoded["input_ids"].shape[1]
    responses = out.sequences[:, width:]
    sampler = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.scores], dim=1)  # (B, T, V)
    expected = torch.gather(sampler, -1, responses.unsqueeze(-1)).squeeze(-1)
    mask, _ = completion_mask_from(responses, eos_ids(tokenizer, module.policy))
    attention = torch.cat([encoded["attention_mask"], mask], dim=1)
    logprobs, _, _ = module.rollout_forward(out.sequences, attention, width)
    assert torch.allclose(logprobs * mask, expected * mask, atol=1e-4), (logprobs - expected).abs().max()


def test_policy_generation_config_that_changes_sampling_is_refused(monkeypatch, tiny_ppo):
    import ucai.models

    def with_min_p(*args, **kwargs):
        model = load_causal_lm(*args, **kwargs)
        model.generation_config.min_p = 0.05
        return model

    monkeypatch.setattr(ucai.models, "load_causal_lm", with_min_p)
    with pytest.raises(UcaiError, match=r"tiny-llama/generation_config\.json sets min_p=0\.05"):
        tiny_ppo().configure_model()


def test_a_checkpointed_ppo_fit_causes_no_warning_of_its_own(tmp_path, tiny_ppo, tiny_trainer, collect):
    # Each of these once came from ucai's own use of Lightning: the prompt data's
    # validation loader offered to PPO, which validates nothing; a callback of the module
    # replacing one of the trainer's; ModelCheckpoint's advice for manual optimisation,
    # which PPOCheckpoint, saving the state after the updates, does not need.
    notes = collect("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    checkpoint = PPOCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = tiny_trainer(tmp_path, max_steps=1, callbacks=[checkpoint], enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tiny_ppo(), datamodule=tiny_data(batch_size=4, limit=4))
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()  # the checkpoint was written
    messages = [str(w.message) for w in caught] + notes.messages
    for own in ("val_dataloader", "will override existing callbacks", "pre-optimization state"):
        assert not any(own in m for m in messages), (own, messages)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("minibatch_size", "0"),
        ("gamma", "1.5"),
        ("kl_coef", "-0.1"),
        ("learning_rate", "0"),
        ("lora.dropout", "1.0"),
        ("adaptive_kl.horizon", "0"),
    ],
)
def test_an_out_of_range_setting_is_one_line_naming_it_before_any_model_loads(option, value, run_cli, capsys, monkeypatch):
    import ucai.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ucai.models, "load_causal_lm", no_loading)
    assert run_cli("fit", "--config", PPO_TINY, f"--model.init_args.{option}={value}") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucai: error: --model.init_args."), lines
    assert option.split(".")[-1] in lines[0] and value in lines[0], lines
