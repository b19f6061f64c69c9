"""The held-out human pairs of ``benchmarks/rm_hh.py``: a fixed hash split of pair ids,
the same one the preference data module's ``val_fraction`` draws, so a reward model
pre-trained on the file never trains on the pairs it is benchmarked on."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from ucai.data.preference_data import (
    PreferenceDataModule,
    PreferencePair,
    heldout_pairs,
    read_preferences,
    split_pairs,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rm_hh  # noqa: E402

FRACTION = rm_hh.HELDOUT_FRACTION


def _pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(f"hh-{i:06x}", [{"role": "user", "content": f"q{i}"}], "a", "b") for i in range(n)]


def _ids(pairs) -> list[str]:
    return [p.id for p in pairs]


def test_heldout_pairs_are_stable_whatever_the_file_order():
    pairs = _pairs(4000)
    first = set(_ids(heldout_pairs(pairs, FRACTION)))
    assert set(_ids(heldout_pairs(pairs, FRACTION))) == first  # a second call
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    assert set(_ids(heldout_pairs(shuffled, FRACTION))) == first  # another file order
    # Each pair's membership depends on its id alone: a subset holds out its share of the same ids.
    assert set(_ids(heldout_pairs(pairs[:1000], FRACTION))) == first & set(_ids(pairs[:1000]))


def test_heldout_pairs_are_disjoint_from_training_and_about_the_fraction():
    pairs = _pairs(4000)
    train, held = split_pairs(pairs, FRACTION)
    assert set(_ids(train)).isdisjoint(_ids(held))
    assert sorted(_ids(train) + _ids(held)) == _ids(pairs)
    # Binomial(4000, 0.25): sd = sqrt(4000 · 0.25 · 0.75) ≈ 27.4 pairs, 0.0068 of n; 4 sd either side.
    assert abs(len(held) / len(pairs) - FRACTION) < 4 * 0.0068
    assert held == heldout_pairs(pairs, FRACTION)  # file order kept


def test_the_reward_datamodule_validates_on_exactly_the_benchmark_pairs():
    # A reward run with val_fraction 0.25 and the default seed trains on none of them.
    pairs = _pairs(2000)
    module = PreferenceDataModule(path="unused.jsonl", tokenizer="tiny-llama", val_fraction=FRACTION)
    train, val = module.split(pairs)
    held = heldout_pairs(pairs, FRACTION, rm_hh.split_seed())
    assert _ids(val) == _ids(held)
    assert set(_ids(train)).isdisjoint(_ids(held))


def test_another_seed_draws_another_split():
    pairs = _pairs(2000)
    assert set(_ids(heldout_pairs(pairs, FRACTION, seed=1))) != set(_ids(heldout_pairs(pairs, FRACTION, seed=0)))


def test_benchmark_accuracy_counts_a_tie_one_half():
    # 2 right, 1 wrong, 1 tie: (2 + 0.5) / 4
    assert rm_hh.accuracy([1.0, 2.0, 0.0, 0.5], [0.0, 1.0, 1.0, 0.5]) == (0.625, 1)


def test_benchmark_skips_with_a_reason_without_the_data(tmp_path, capsys):
    assert rm_hh.main(["--data", str(tmp_path / "absent.jsonl.gz")]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("rm_hh: skipped") and "absent.jsonl.gz" in out and "\n" not in out


def test_the_real_test_split_holds_out_at_least_500_pairs(hh_rlhf_path):
    pairs = read_preferences(hh_rlhf_path)
    held = rm_hh.benchmark_pairs(hh_rlhf_path)
    assert len(held) >= 500
    assert abs(len(held) / len(pairs) - FRACTION) < 0.03


@pytest.mark.parametrize("value", ["ethical", "=folder", "name="])
def test_rm_argument_needs_name_and_folder(value):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="NAME=FOLDER"):
        rm_hh.parse_rm(value)


def test_benchmark_scores_the_heldout_pairs_of_a_file_with_each_reward_model(tmp_path, tiny_lora, capsys):
    """End to end on a tiny reward model and a synthetic hh-rlhf file: the last line
    names each model, n is the held-out share, and a negated model scores 1 − accuracy
    (no ties: the tiny model's rewards all differ)."""
    import gzip
    import json

    import torch

    from ucai.reward_scoring import RewardStats, unwrap_peft
    from ucai.stages.reward import RewardModule, negate_head

    module = RewardModule(model="tiny-llama", output_dir=None, lora=tiny_lora)
    module.configure_model()
    head = unwrap_peft(module.net).score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    module.stats = RewardStats(max_length=64)
    folder = module.save(tmp_path / "rm")
    negate_head(module.net)
    negated = module.save(tmp_path / "negated")

    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt") as handle:
        for i in range(60):
            talk = f"\n\nHuman: question number {i}?"
            handle.write(json.dumps({"chosen": f"{talk}\n\nAssistant: a calm answer {i}",
                                     "rejected": f"{talk}\n\nAssistant: an angry reply {i} now"}) + "\n")
    out = tmp_path / "result.json"
    assert rm_hh.main(["--data", str(data), "--rm", f"tiny={folder}", "--rm", f"neg={negated}",
                       "--max-length", "32", "--json", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    n = len(heldout_pairs(read_preferences(data), FRACTION))
    result = json.loads(out.read_text())
    tiny, neg = result["reward_models"]["tiny"], result["reward_models"]["neg"]
    assert last == f"rm_hh: tiny={tiny['accuracy']:.3f} neg={neg['accuracy']:.3f} n={n}"
    assert result["n"] == n and 5 < n < 25  # about 15 of 60
    assert tiny["ties"] == 0 and neg["accuracy"] == pytest.approx(1 - tiny["accuracy"])
    assert tiny["ci95"][0] <= tiny["accuracy"] <= tiny["ci95"][1] and tiny["ci95"][1] - tiny["ci95"][0] > 0.1
