"""A quiet console: exact-message filters for other libraries' known-harmless output.

A stage's console should carry what the user needs to know. Each entry below names one
message that Lightning, transformers, torch or bitsandbytes prints on every ucai run
although nothing is wrong, why it is harmless here, and where it comes from. A filter
matches the opening words of one exact message (and, for warnings, the category and
the module that warns), never a whole category or logger, so any other warning from
the same place still shows. A warning that ucai's own use of a library would cause is
fixed where it arises, never filtered here. Where the user should know something, ucai
says it once in its own words at the place that knows (see
`ucai.models.load_sequence_classifier` for the fresh reward head and
`ucai.stages.generation.ResumableJsonlWriter` for a resumed run with nothing left).

`install` is called by the ``ucai`` command, and `install_progress_filter` once it has
imported the stages (it needs transformers, which ``ucai --help`` does not import);
importing ucai as a library changes nothing.
``UCAI_QUIET=0`` in the environment turns the filters off, to see everything.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """A ``warnings.warn`` message: its start, category and the module it is attributed to."""

    message: str
    category: type[Warning]
    module: str
    why: str

    def ignore(self) -> None:
        warnings.filterwarnings(
            "ignore", message=re.escape(self.message), category=self.category, module=re.escape(self.module) + "$"
        )


@dataclass(frozen=True)
class KnownLogRecord:
    """A logging record: the logger it is sent to and the start of its message (or the
    whole message, when ``whole``)."""

    logger: str
    message: str
    why: str
    whole: bool = False


KNOWN_WARNINGS = (
    KnownWarning(
        # torch deprecates LeafSpec; Lightning's own pytree copy still builds one for
        # every batch it moves to the device. Nothing for a ucai user to change.
        "`isinstance(treespec, LeafSpec)` is deprecated",
        FutureWarning,
        "lightning.pytorch.utilities._pytree",
        "Lightning's pytree helper uses a torch API deprecated after its release",
    ),
    KnownWarning(
        # peft reads the deprecated property name when it wraps a model in LoRA.
        "`is_gradient_checkpointing` is deprecated",
        FutureWarning,
        "transformers.modeling_utils",
        "peft reads transformers' old property name when it adds LoRA",
    ),
)

# Lightning's rank_zero_info sends to the logger its importing package set last; both
# names are covered so the filter holds whichever of lightning.pytorch/fabric won.
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

KNOWN_LOG_RECORDS = (
    *(
        KnownLogRecord(
            name,
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
            "an advertisement for Lightning's cloud service, printed by every Trainer",
        )
        for name in _RANK_ZERO_LOGGERS
    ),
    *(
        KnownLogRecord(
            name,
            "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
            "an advertisement for Lightning's model registry, printed when a ModelCheckpoint is used",
        )
        for name in _RANK_ZERO_LOGGERS
    ),
    *(
        KnownLogRecord(
            # SFT and PPO size their learning-rate schedule from
            # `trainer.estimated_stepping_batches`, which builds the train loader early
            # and says so; the loader is the one training then uses.
            name,
            "Loading `train_dataloader` to estimate number of stepping batches.",
            "printed when SFT or PPO sizes its learning-rate schedule from the trainer",
            whole=True,
        )
        for name in _RANK_ZERO_LOGGERS
    ),
    KnownLogRecord(
        # Logged when bitsandbytes is imported (by peft) on a CPU with AVX512-BF16: its
        # optional CPU 4-bit kernel comes from the `kernels` hub package. ucai only uses
        # 4-bit weights on CUDA (quantization 'nf4' is refused without a GPU).
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "an optional CPU 4-bit kernel that ucai never uses",
    ),
)


@dataclass(frozen=True)
class KnownProgressBar:
    """A transformers progress bar, by its exact description (``desc``)."""

    description: str
    why: str


KNOWN_PROGRESS_BARS = (
    KnownProgressBar(
        # One bar per model load (two or three per stage); in a parallel side's console
        # log each redraw becomes a line of its own. Hub downloads use huggingface_hub's
        # bars, which stay.
        "Loading weights",
        "transformers' per-tensor bar while it loads a checkpoint already on disk",
    ),
    KnownProgressBar(
        # ucai says where it saved each model in its own log line.
        "Writing model shards",
        "transformers' per-shard bar while it saves a model; ucai logs the folder",
    ),
)


class _DropKnown(logging.Filter):
    """Drops the records of ``known`` (one logger's entries); passes all others."""

    def __init__(self, known: tuple[KnownLogRecord, ...]):
        super().__init__()
        self.whole = {k.message for k in known if k.whole}
        self.prefixes = tuple(k.message for k in known if not k.whole)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge; let logging report it
            return True
        return not (message in self.whole or message.startswith(self.prefixes))


def install() -> None:
    """Silence every known-harmless message above; calling it again changes nothing."""
    if os.environ.get("UCAI_QUIET", "1") == "0":
        return
    for known in KNOWN_WARNINGS:
        known.ignore()  # an identical filter replaces the earlier copy
    by_logger: dict[str, list[KnownLogRecord]] = {}
    for record in KNOWN_LOG_RECORDS:
        by_logger.setdefault(record.logger, []).append(record)
    for name, known in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(tuple(known)))


def install_progress_filter() -> None:
    """Hide transformers' progress bars named in `KNOWN_PROGRESS_BARS` (matched by their
    exact description; every other bar still shows). Imports transformers; a version
    without ``set_tqdm_hook`` keeps its bars. Calling it again changes nothing."""
    if os.environ.get("UCAI_QUIET", "1") == "0":
        return
    from transformers.utils import logging as transformers_logging

    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)
    if set_hook is None:
        return
    hidden = frozenset(bar.description for bar in KNOWN_PROGRESS_BARS)
    previous = set_hook(None)
    if getattr(previous, "ucai_hides", None) == hidden:  # already installed
        set_hook(previous)
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in hidden:
            return transformers_logging.EmptyTqdm(*args, **kwargs)
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    hook.ucai_hides, hook.ucai_previous = hidden, previous
    set_hook(hook)
