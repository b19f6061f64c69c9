"""Real data: a reward model trained on 2,000 hh-rlhf harmless-base pairs must rank the
other 312 clearly above chance (95% Wilson interval above 0.5). Slow: on 2 CPU cores
with native bf16 about 2 min (all-MiniLM-L6-v2) and 18 min (SmolLM2-135M). The reward
config's bf16-mixed becomes 32-true where bf16 is not native, as the pipeline does
(`ucai.hardware.precision_fallback`): in bf16 an AVX2-only CPU takes several times as long.
In fp32 on a 2-core AVX2-only CPU, sharing it with other work: 12.6 min (accuracy 0.638,
Wilson 0.583-0.689) and 103 min (0.702, 0.649-0.750).

    pytest -m slow tests/test_reward_hh_slow.py -s
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from ucai.data.preference_data import read_preferences
from ucai.hardware import precision_fallback
from ucai.reward_scoring import RewardScorer
from ucai.stats import wilson_interval

pytestmark = pytest.mark.slow

CONFIG = "configs/reward_ethical.yaml"
TEST_PAIRS = 312
BACKBONES = {
    # backbone: (learning rate, epochs, batch size, max tokens per text; long texts keep their end)
    "all-minilm-l6-v2": (5e-4, 1, 16, 128),
    "smollm2-135m": (1e-4, 1, 4, 256),
}


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100: centre = (0.5 + 0.019208) / 1.038416 = 0.5; half = 1.96·sqrt(0.0025 + 0.00009604)/1.038416
    # = 1.96·0.050951/1.038416 = 0.096170 → (0.403830, 0.596170)
    low, high = wilson_interval(50 / 100, 100)
    assert (low, high) == (pytest.approx(0.403830, abs=1e-5), pytest.approx(0.596170, abs=1e-5))


@pytest.fixture
def all_cores():
    """The suite runs one thread per process (conftest); this real-size training is
    alone on the machine and uses every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_reward_model_beats_chance_on_held_out_hh_rlhf(backbone, hh_rlhf_path, tmp_path, run_cli, all_cores):
    lr, epochs, batch, max_length = BACKBONES[backbone]
    out = tmp_path / "rm"
    configured = yaml.safe_load(Path(CONFIG).read_text())["trainer"]["precision"]
    precision = precision_fallback(configured, "cpu")  # None: the config's own stands
    code = run_cli(
        "fit", "--config", CONFIG,
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.max_epochs={epochs}",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--model.init_args.model", backbone, "--model.init_args.output_dir", out,
        f"--model.init_args.learning_rate={lr}", "--model.init_args.center_coef=0.0",
        "--data.init_args.path", hh_rlhf_path, f"--data.init_args.val_size={TEST_PAIRS}",
        f"--data.init_args.max_length={max_length}", f"--data.init_args.batch_size={batch}",
        *([f"--trainer.precision={precision}"] if precision else []),
    )
    assert code == 0
    pairs = read_preferences(hh_rlhf_path)[-TEST_PAIRS:]
    scorer = RewardScorer(out, batch_size=16)
    with torch.no_grad():
        chosen, _ = scorer.score([p.conversation for p in pairs], [p.chosen for p in pairs])
        rejected, _ = scorer.score([p.conversation for p in pairs], [p.rejected for p in pairs])
    correct = float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum())
    accuracy = correct / len(pairs)
    low, high = wilson_interval(accuracy, len(pairs))
    stats = json.loads((out / "reward_stats.json").read_text())
    print(
        f"\n{backbone}: trained on {stats['pairs']} pairs, held-out accuracy {accuracy:.3f} "
        f"on {len(pairs)} pairs (95% Wilson CI {low:.3f}-{high:.3f})"
    )
    assert low > 0.5, f"{backbone}: accuracy {accuracy:.3f} is not clearly above chance ({low:.3f}-{high:.3f})"
