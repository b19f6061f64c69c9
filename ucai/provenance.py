"""Which ucai made an output: its version and, in a git checkout, the commit.

Written into each stage's saved ``config.yaml`` (beside Lightning's version) and into
the ``ucai_*.json`` of exported models, so a result can be traced to the code that made
it, uncommitted changes included (``-dirty``).
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path


@functools.cache
def ucai_version() -> str:
    """``ucai==0.1.0`` and, where the package is a git checkout, `` (git 1a2b3c4d5e6f-dirty)``."""
    try:
        version = metadata.version("ucai")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return f"ucai=={version}"
    described = commit.stdout.strip()
    return f"ucai=={version} (git {described})" if commit.returncode == 0 and described else f"ucai=={version}"
