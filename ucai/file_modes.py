"""The permissions of files written through a private temporary file.

Outputs are written to a temporary file or folder and renamed into place, so a reader
never sees half of one. `tempfile.mkstemp` and `mkdtemp` make them readable by their
owner alone, and so does safetensors' own save; renamed as they are, a run's data,
report and models would stay hidden from colleagues on a shared machine. These give
them the mode an ordinary new file or folder gets: 0o666 (0o777 for a folder) less the
process's umask.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def _umask() -> int:
    """The process's umask, read once (it rarely changes)."""
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere reading it means setting it, process-wide, for an instant.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def folder_mode() -> int:
    return 0o777 & ~_umask()


def _chmod(path: str | Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError:  # a filesystem that keeps its own modes (some network mounts): as written
        pass


def as_ordinary_file(path: str | Path) -> None:
    """Give ``path`` the mode a newly created file gets (where the filesystem lets it)."""
    _chmod(path, file_mode())


def as_ordinary_tree(folder: str | Path) -> None:
    """Give ``folder``, and every folder and file in it, the modes new ones get."""
    _chmod(folder, folder_mode())
    for root, folders, files in os.walk(folder):
        for name in folders:
            _chmod(os.path.join(root, name), folder_mode())
        for name in files:
            _chmod(os.path.join(root, name), file_mode())
