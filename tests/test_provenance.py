"""`ucai.provenance`: the version and, only in ucai's own git checkout, the commit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "ucai" / "provenance.py"


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def _repository(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    _git(folder, "init", "-q")
    (folder / "README").write_text("x\n")
    _git(folder, "add", "-A")
    _git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return _git(folder, "rev-parse", "--short=12", "HEAD")


def _version_of(package: Path) -> str:
    """ucai_version() of a copy of provenance.py placed at ``package``/provenance.py."""
    package.mkdir(parents=True, exist_ok=True)
    shutil.copy(SOURCE, package / "provenance.py")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import provenance; print(provenance.ucai_version())"
    return subprocess.run([sys.executable, "-c", code, str(package)], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_the_commit_is_ucais_own_checkout_and_never_a_surrounding_projects(tmp_path):
    checkout = tmp_path / "ucai-checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'ucai'\n")
    commit = _repository(checkout)
    assert _version_of(checkout / "ucai").endswith(f"(git {commit})")
    (checkout / "README").write_text("changed\n")  # an uncommitted change to a tracked file
    assert _version_of(checkout / "ucai").endswith(f"(git {commit}-dirty)")
    # Installed in a virtual environment inside another project's repository: that
    # project's commit says nothing about ucai.
    project = tmp_path / "project"
    _repository(project)
    version = _version_of(project / ".venv" / "lib" / "site-packages" / "ucai")
    assert version.startswith("ucai==") and "git" not in version
