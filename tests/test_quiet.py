"""The quiet console: each known-harmless message is dropped at its source by an exact
match, while another message of the same category (or logger) from the same place still
shows; the fresh reward head is reported once in ucai's words; transformers' load and
save progress bars are hidden by their exact description, other bars still show.
(Warnings ucai itself would cause are fixed at their source: tests/test_stage_warnings.py.)"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from ucai import quiet


@pytest.fixture
def installed():
    """The filters as the ``ucai`` command installs them, undone after the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # also repeats, so nothing hides behind a registry
        quiet.install()
        yield
    for record in quiet.KNOWN_LOG_RECORDS:
        logger = logging.getLogger(record.logger)
        for drop in [f for f in logger.filters if isinstance(f, quiet._DropKnown)]:
            logger.removeFilter(drop)


def _messages(caught) -> list[str]:
    return [str(w.message) for w in caught]


def test_lightning_leafspec_deprecation_is_silenced_but_other_future_warnings_show(installed):
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        _tree_flatten(torch.zeros(1))  # Lightning builds a LeafSpec: the real source
        warnings.warn_explicit(
            "`isinstance(treespec, TreeSpec)` will change", FutureWarning, "_pytree.py", 1,
            module="lightning.pytorch.utilities._pytree",
        )
    assert not any("LeafSpec" in m for m in _messages(caught))
    assert "`isinstance(treespec, TreeSpec)` will change" in _messages(caught)


def test_is_gradient_checkpointing_deprecation_is_silenced_but_not_its_sibling(installed, tiny_model):
    with warnings.catch_warnings(record=True) as caught:
        assert tiny_model.is_gradient_checkpointing is False  # the property peft reads
        warnings.warn_explicit(
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning,
            "modeling_utils.py", 1, module="transformers.modeling_utils",
        )
    messages = _messages(caught)
    assert not any("is_gradient_checkpointing" in m for m in messages)
    assert any("gradient_checkpointing_enable" in m for m in messages)


@pytest.mark.parametrize("known", quiet.KNOWN_WARNINGS, ids=lambda k: k.module)
def test_each_filter_matches_its_message_category_and_module_only(installed, known):
    def warn(message, category=known.category, module=known.module):
        warnings.warn_explicit(message, category, "source.py", 1, module=module)

    with warnings.catch_warnings(record=True) as caught:
        warn(known.message + " (and the rest of the library's text)")
        warn("another warning from the same place")
        warn(known.message, module="my_package.trees")  # the same words from elsewhere
        warn(known.message, category=RuntimeWarning)  # a different category
    assert [(str(w.message), w.category) for w in caught] == [
        ("another warning from the same place", known.category),
        (known.message, known.category),
        (known.message, RuntimeWarning),
    ]


def test_lightning_tips_are_dropped_and_other_info_is_kept(installed, collect):
    from lightning.pytorch import Trainer
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    seen = collect(logger.name)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    rank_zero_info(
        "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]"
        "(https://pypi.org/project/litmodels/) to enable LitModelCheckpoint, which syncs automatically"
    )
    rank_zero_info("💡 Tip: something else worth knowing")
    rank_zero_info("Loading `train_dataloader` to estimate number of stepping batches.")
    rank_zero_info("Loading `train_dataloader` to estimate something else.")
    assert not any(m.endswith("number of stepping batches.") for m in seen.messages)
    assert "Loading `train_dataloader` to estimate something else." in seen.messages
    assert not any("litlogger" in m or "litmodels" in m for m in seen.messages)
    assert "💡 Tip: something else worth knowing" in seen.messages
    assert any("GPU available" in m for m in seen.messages), "the Trainer's own lines still show"


def test_bitsandbytes_kernel_hub_message_is_dropped_and_other_warnings_kept(installed, collect):
    name = "bitsandbytes.backends.cpu.ops"
    seen = collect(name)
    logger = logging.getLogger(name)
    # The exact call bitsandbytes makes when the optional `kernels` package is absent.
    logger.warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1",
        ModuleNotFoundError("No module named 'kernels'"),
    )
    logger.warning("Failed to load CPU gemv_4bit from libbitsandbytes_cpu.so")
    assert seen.messages == ["Failed to load CPU gemv_4bit from libbitsandbytes_cpu.so"]


def test_ucai_quiet_0_turns_the_filters_off(monkeypatch):
    monkeypatch.setenv("UCAI_QUIET", "0")
    logger = logging.getLogger(quiet.KNOWN_LOG_RECORDS[0].logger)
    for drop in [f for f in logger.filters if isinstance(f, quiet._DropKnown)]:
        monkeypatch.setattr(logger, "filters", [f for f in logger.filters if f is not drop])
    with warnings.catch_warnings():
        before = list(warnings.filters)
        quiet.install()
        assert warnings.filters == before
    assert not any(isinstance(f, quiet._DropKnown) for f in logger.filters)


def test_install_twice_adds_each_filter_once(installed):
    before = len(warnings.filters)
    quiet.install()
    assert len(warnings.filters) == before
    for record in quiet.KNOWN_LOG_RECORDS:
        drops = [f for f in logging.getLogger(record.logger).filters if isinstance(f, quiet._DropKnown)]
        assert len(drops) == 1


# --------------------------------------------------------------------------- progress bars


@pytest.fixture
def transformers_bars():
    """transformers' progress bars switched on, with no hook; the state restored after."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.set_tqdm_hook(None)
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    yield transformers_logging
    transformers_logging.set_tqdm_hook(previous)
    if not enabled:
        transformers_logging.disable_progress_bar()


def _save_and_load(model, folder) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    type(model).from_pretrained(folder)


def test_load_and_save_bars_are_hidden_and_other_bars_show(transformers_bars, tiny_model, tmp_path, capsys):
    _save_and_load(tiny_model, tmp_path / "before")
    shown = capsys.readouterr().err
    assert "Loading weights" in shown and "Writing model shards" in shown  # what the filter is for

    quiet.install_progress_filter()
    quiet.install_progress_filter()  # a second call wraps nothing twice
    _save_and_load(tiny_model, tmp_path / "after")
    for _ in transformers_bars.tqdm(range(2), desc="Another transformers bar"):
        pass
    shown = capsys.readouterr().err
    assert "Loading weights" not in shown and "Writing model shards" not in shown
    assert "Another transformers bar" in shown
    hook = transformers_bars.set_tqdm_hook(None)
    assert hook.ucai_hides == {bar.description for bar in quiet.KNOWN_PROGRESS_BARS}
    assert hook.ucai_previous is None  # the second call did not wrap the first


def test_progress_filter_keeps_a_hook_set_before_it(transformers_bars, capsys):
    seen = []

    def earlier(factory, args, kwargs):
        seen.append(kwargs.get("desc"))
        return factory(*args, **kwargs)

    transformers_bars.set_tqdm_hook(earlier)
    quiet.install_progress_filter()
    transformers_bars.tqdm(range(1), desc="Loading weights").close()
    transformers_bars.tqdm(range(1), desc="Another transformers bar").close()
    assert seen == ["Another transformers bar"]
    assert transformers_bars.set_tqdm_hook(None).ucai_previous is earlier
    assert "Another transformers bar" in capsys.readouterr().err


def test_ucai_quiet_0_keeps_the_bars(transformers_bars, monkeypatch):
    monkeypatch.setenv("UCAI_QUIET", "0")
    quiet.install_progress_filter()
    assert transformers_bars.set_tqdm_hook(None) is None


# --------------------------------------------------------------------------- reward head


def _save_causal_lm(folder, model, drop: str | None = None):
    model.save_pretrained(folder, safe_serialization=True)
    if drop is not None:
        from safetensors.torch import load_file, save_file

        path = folder / "model.safetensors"
        weights = load_file(path)
        del weights[drop]
        save_file(weights, path, metadata={"format": "pt"})


def test_fresh_reward_head_is_said_once_in_ucais_words(tmp_path, tiny_model, collect, caplog):
    from ucai.models import load_sequence_classifier

    report = collect("transformers.modeling_utils")
    _save_causal_lm(tmp_path, tiny_model)
    with caplog.at_level(logging.INFO, logger="ucai.models"):
        load_sequence_classifier(str(tmp_path))
    assert not any("LOAD REPORT" in m for m in report.messages)
    ours = [r.getMessage() for r in caplog.records if r.name == "ucai.models"]
    assert len(ours) == 1 and ours[0].startswith("reward head score.weight initialised fresh (expected")


def test_a_missing_backbone_weight_keeps_transformers_report(tmp_path, tiny_model, collect, caplog):
    from ucai.models import load_sequence_classifier

    report = collect("transformers.modeling_utils")
    _save_causal_lm(tmp_path, tiny_model, drop="model.norm.weight")
    with caplog.at_level(logging.INFO, logger="ucai.models"):
        load_sequence_classifier(str(tmp_path))
    assert any("LOAD REPORT" in m and "model.norm.weight" in m and "score.weight" in m for m in report.messages)
    assert not any("initialised fresh" in r.getMessage() for r in caplog.records)


def test_a_reward_model_checkpoint_without_its_head_keeps_the_report(tmp_path, collect):
    from ucai.models import fresh_head_keys, load_sequence_classifier

    model = load_sequence_classifier("tiny-llama")
    model.config.architectures = ["LlamaForSequenceClassification"]
    # The head of a trained reward model must be in its checkpoint; missing, it is news.
    assert fresh_head_keys(model, {"missing_keys": {"score.weight"}}) is None
    assert fresh_head_keys(model, {"missing_keys": set()}) is None
    model.config.architectures = ["LlamaForCausalLM"]
    assert fresh_head_keys(model, {"missing_keys": {"score.weight"}, "unexpected_keys": {"lm_head.weight"}}) == [
        "score.weight"
    ]
    assert fresh_head_keys(model, {"missing_keys": {"score.weight"}, "mismatched_keys": [("x", 1, 2)]}) is None
