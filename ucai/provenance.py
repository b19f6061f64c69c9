"""Which ucai made an output: its version and, in a git checkout, the commit.

Written into each stage's saved ``config.yaml`` (beside Lightning's version) and into
the ``ucai_*.json`` of exported models, so a result can be traced to the code that made
it, uncommitted changes included (``-dirty``).
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # ucai/


def _git(*args: str) -> str | None:
    """A git command's output in the package's folder; None where git fails or is absent.
    ``GIT_OPTIONAL_LOCKS=0``: describing a dirty tree must not take the index lock from
    a git command the user runs meanwhile."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=5,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


@functools.cache
def ucai_version() -> str:
    """``ucai==0.1.0`` and, where ucai runs from its own git checkout, `` (git
    1a2b3c4d5e6f-dirty)``. An installed copy inside another project's repository (a
    virtual environment in it) is not that project's commit: the checkout counts only
    where its top folder is the one holding this package and ucai's pyproject.toml."""
    try:
        version = metadata.version("ucai")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "unknown"
    top = _git("rev-parse", "--show-toplevel")
    own = top is not None and Path(top).resolve() == PACKAGE.parent and (PACKAGE.parent / "pyproject.toml").is_file()
    described = _git("describe", "--always", "--dirty", "--abbrev=12") if own else None
    return f"ucai=={version} (git {described})" if described else f"ucai=={version}"
