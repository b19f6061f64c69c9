"""The reward head: it starts at zero (no side starts with a preference, none shares a
random direction with the other), and it has its own, larger learning rate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ucai.data.preference_data import PreferenceDataModule
from ucai.stages.reward import RewardModule, zero_head


@pytest.fixture
def reward_module(tiny_lora):
    """``reward_module(**settings)``: a configured RewardModule on the tiny model."""

    def build(**kwargs) -> RewardModule:
        module = RewardModule(**{"model": "tiny-llama", "output_dir": None, "lora": tiny_lora, **kwargs})
        module.configure_model()
        return module

    return build


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "preferences_small.jsonl"


def _batch() -> dict[str, torch.Tensor]:
    """The first 8 training pairs of the marker-word fixture, as one batch."""
    data = PreferenceDataModule(path=str(FIXTURE), tokenizer="tiny-llama", max_length=64, batch_size=8, val_size=16)
    data.setup("fit")
    return data.collate(data._encoded["train"][:8])


def _named(module: RewardModule, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.net.named_parameters() if p.requires_grad and part in n}


def test_head_starts_at_zero_whatever_the_seed_so_every_reward_is_equal(reward_module):
    batch = None
    for seed in (0, 1):
        module = reward_module(seed=seed)
        head = _named(module, "score")
        assert head and all(torch.count_nonzero(w) == 0 for w in head.values())
        batch = batch or _batch()
        with torch.no_grad():
            rewards = module.pair_rewards(batch)  # (16,): 8 chosen, 8 rejected
        assert torch.count_nonzero(rewards) == 0  # no preference at all before training


def test_zero_head_zeroes_only_the_last_layer_of_a_two_layer_head():
    # RoBERTa-style head: dense -> out_proj; zeroing dense too would leave both with no gradient
    net = torch.nn.Module()
    net.classifier = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    zeroed = zero_head(net)
    assert zeroed is net.classifier[2]
    assert torch.count_nonzero(zeroed.weight) == 0 and torch.count_nonzero(zeroed.bias) == 0
    assert torch.count_nonzero(net.classifier[0].weight) > 0


def test_parameter_groups_give_the_head_its_own_learning_rate(reward_module):
    module = reward_module(learning_rate=1e-3, head_learning_rate=5e-2)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert {name: g["lr"] for name, g in groups.items()} == {"backbone": 1e-3, "head": 5e-2}
    names = {id(p): n for n, p in module.net.named_parameters()}
    head = [names[id(p)] for p in groups["head"]["params"]]
    backbone = [names[id(p)] for p in groups["backbone"]["params"]]
    assert head == ["base_model.model.score.modules_to_save.default.weight"]  # the trained copy only
    assert backbone and all("lora_" in n for n in backbone)
    trainable = sum(p.requires_grad for p in module.net.parameters())
    assert len(head) + len(backbone) == trainable  # every trained weight in exactly one group
    # default: 10 × the LoRA's rate (1e-4 -> 1e-3)
    assert {g["name"]: g["lr"] for g in reward_module().parameter_groups()} == {"backbone": 1e-4, "head": pytest.approx(1e-3)}


def test_first_step_moves_only_the_head_and_by_its_own_rate(reward_module):
    # Zero head: dL/dh = 0 behind it, so LoRA's B (zero) gets no gradient, nor does A (B = 0).
    # Adam's first step is lr · g / (|g| + eps) = ±lr for every weight with g != 0, so
    # each head weight moves by the head's rate, 2e-2, not by the LoRA's 1e-4.
    torch.manual_seed(0)
    module = reward_module(learning_rate=1e-4, head_learning_rate=2e-2)
    batch = _batch()
    optimizer = module.configure_optimizers()
    before_head, before_lora = _named(module, "score"), _named(module, "lora_")
    module._step(batch, module.train_metrics, step_values=False).backward()
    optimizer.step()
    optimizer.zero_grad()
    after_head, after_lora = _named(module, "score"), _named(module, "lora_")
    for name, w in after_head.items():
        moved = (w - before_head[name]).abs()
        assert moved.max().item() == pytest.approx(2e-2, rel=1e-3)
        assert (moved > 0).float().mean() > 0.9  # nearly every weight had a gradient
    assert all(torch.equal(after_lora[n], before_lora[n]) for n in before_lora)
    # Second step: the head is no longer zero, so B gets a gradient g (A still none: B = 0).
    # Adam saw g = 0 at step 1, so at step 2: m = 0.1·g, v = 0.001·g²; bias-corrected
    # m̂ = 0.1g / (1 − 0.9²) = 0.526316·g, v̂ = 0.001g² / (1 − 0.999²) = 0.500250·g²,
    # step = 1e-4 · 0.526316 / sqrt(0.500250) = 1e-4 · 0.526316 / 0.707284 = 7.4413e-5.
    module._step(batch, module.train_metrics, step_values=False).backward()
    optimizer.step()
    moved = {n: (w - after_lora[n]).abs().max().item() for n, w in _named(module, "lora_").items()}
    assert max(v for n, v in moved.items() if "lora_B" in n) == pytest.approx(7.4413e-5, rel=1e-3)
    assert max(v for n, v in moved.items() if "lora_A" in n) == 0.0


# --------------------------------------------------------------------------- pre-trained heads (PMP)


@pytest.fixture
def saved_reward_model(reward_module, tmp_path):
    """A tiny reward model saved as the reward stage saves one, its head random (a
    zero head would give every reward 0 and hide a sign error)."""
    from ucai.reward_scoring import RewardStats, unwrap_peft

    module = reward_module()
    head = unwrap_peft(module.net).score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    module.stats = RewardStats(mean=0.3, std=2.0, max_length=64)
    return module.save(tmp_path / "rm_model")


def test_keep_reproduces_the_saved_model_and_negate_its_exact_negative(reward_module, saved_reward_model):
    from ucai.reward_scoring import RewardScorer

    batch = _batch()
    rewards = {}
    for how in ("keep", "negate"):
        module = reward_module(model=str(saved_reward_model), init_head=how)
        module.net.eval()
        with torch.no_grad():
            rewards[how] = module.rewards(batch["input_ids"], batch["attention_mask"]).float()  # (16,)
    assert rewards["keep"].unique().numel() > 8  # the head reads the hidden state
    assert torch.equal(rewards["negate"], -rewards["keep"])  # exact: w·h + b with −w, −b
    # ``keep`` is the saved model before any step, as the scorer (PPO, evaluation) reads it.
    scorer = RewardScorer(saved_reward_model)
    with torch.no_grad():
        saved = unwrap_saved(scorer, batch)
    torch.testing.assert_close(rewards["keep"], saved, atol=1e-5, rtol=1e-5)


def unwrap_saved(scorer, batch) -> torch.Tensor:
    """(16,) raw rewards of the saved folder's own model on the batch's sequences."""
    from ucai.reward_scoring import sequence_rewards

    return sequence_rewards(scorer.model, batch["input_ids"], batch["attention_mask"]).float()


@pytest.mark.parametrize("how", ["keep", "negate"])
def test_keep_or_negate_without_a_reward_model_is_one_line_naming_the_folder(how, tmp_path, tiny_lora):
    from ucai.errors import UcaiError

    (tmp_path / "config.json").write_text("{}")  # a model folder, but no reward_stats.json
    for model in (str(tmp_path), "tiny-llama"):
        with pytest.raises(UcaiError) as error:
            RewardModule(model=model, output_dir=None, lora=tiny_lora, init_head=how)
        message = str(error.value)
        assert "\n" not in message and model in message and "reward_stats.json" in message and how in message


def test_the_zero_head_ignores_a_saved_models_head(reward_module, saved_reward_model):
    module = reward_module(model=str(saved_reward_model))  # init_head: zero, the default
    with torch.no_grad():
        rewards = module.pair_rewards(_batch())
    assert torch.count_nonzero(rewards) == 0
