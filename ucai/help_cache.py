"""Saved help texts, so a repeated ``ucai fit --help`` answers without Lightning.

Building the help imports Lightning (with torch, torchmetrics, transformers and scipy)
and reads the Trainer's signature. The text depends only on that code, the help request
and the terminal width, so a plain help request saves what it printed under a key made
of exactly those; the next identical request prints it back in milliseconds. Upgrading
a library or editing the ucai code that shapes the help changes the key, and the help
is built afresh. (``ucai --help`` never needs Lightning: `ucai.cli.top_level_parser`.)

The texts live in ``$UCAI_CACHE/help`` (``~/.cache/ucai/help`` by default). A cache
that cannot be read or written is skipped: help is always printed, just slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

# Packages whose code shapes the help: Lightning's Trainer signature and docstrings,
# jsonargparse's formatting (docstring-parser reads the docstrings), torch's types.
KEY_PACKAGES = ("ucai", "lightning", "jsonargparse", "docstring-parser", "torch")
# ucai's own modules that shape it: the parser settings and the stage listing.
KEY_SOURCES = ("lightning_cli.py", "stage_catalog.py")
# Environment variables jsonargparse and LightningCLI read while building the parser.
KEY_ENV_PREFIXES = ("JSONARGPARSE_", "PL_")
# ... except the ones Lightning itself sets at run time to pass a seed to its workers
# and subprocesses, which do not shape the help (a seeded parent would otherwise never
# get the saved or shipped help).
RUNTIME_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def _shaping_env() -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in os.environ.items() if k.startswith(KEY_ENV_PREFIXES) and k not in RUNTIME_ENV)


def help_dir() -> Path:
    # The folder of `ucai.models.cache_dir`, which is not imported here: it imports torch.
    root = os.environ.get("UCAI_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ucai") / "help"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def shaping_versions() -> dict[str, str]:
    """The versions of Python (argparse's formatting) and of the packages that shape the help.

    Local labels are dropped (``2.13.0+cpu`` is ``2.13.0``): the CPU and CUDA builds of
    one torch release define the same classes, so they print the same help."""
    versions = {name: _version(name).split("+")[0] for name in KEY_PACKAGES}
    return {"python": "{}.{}".format(*sys.version_info[:2]), **versions}


def shaping_sources_digest() -> str:
    """A digest of ucai's code that shapes the help."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in KEY_SOURCES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:32]


def help_key(argv: Sequence[str]) -> str:
    """A digest of everything the help text for ``argv`` depends on."""
    digest = hashlib.sha256()
    parts = [
        *(f"{name}={version}" for name, version in shaping_versions().items()),
        shaping_sources_digest(),
        sys.version,
        "\0".join(argv),
        str(shutil.get_terminal_size().columns),
        *(f"{k}={v}" for k, v in _shaping_env()),
    ]
    for part in parts:
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()[:32]


def lookup(argv: Sequence[str]) -> str | None:
    """The saved help text for ``argv``, or None when there is none (or it is unreadable)."""
    try:
        return (help_dir() / f"{help_key(argv)}.txt").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def save(argv: Sequence[str], text: str) -> None:
    """Save ``text`` as the help for ``argv``, atomically; failures are ignored."""
    from ucai.data.io import atomic_output

    with contextlib.suppress(OSError):
        with atomic_output(help_dir() / f"{help_key(argv)}.txt") as handle:
            handle.write(text)


class _Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextlib.contextmanager
def recording(argv: Sequence[str]) -> Iterator[None]:
    """Pass stdout through; when the block ends in a successful exit (argparse exits 0
    after printing help), save what was printed as the help for ``argv``."""
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            yield
    except SystemExit as exc:
        if exc.code in (0, None) and tee.copy.getvalue():
            save(argv, tee.copy.getvalue())
        raise
