"""Where a running stage stands, as one line in a file beside its console log.

When the pipeline runs the sides of a stage side by side, each side's console goes to
a log file (`ucai.pipeline.runner.run_side_by_side`), and a progress bar that is not
drawn on a terminal shows nothing until it ends. So the pipeline names a file in
``UCAI_PROGRESS_FILE``; the stage's trainer writes one line to it as it goes
(`ucai.lightning_cli.ProgressToFile`), and the pipeline prints the sides' lines while
it waits. Plain file I/O: the pipeline's own process does not import Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path

PROGRESS_FILE_ENV = "UCAI_PROGRESS_FILE"


def progress_file(console_log: Path) -> Path:
    """The progress file of the stage whose console goes to ``console_log``."""
    return console_log.with_suffix(".progress")


def write_progress(path: str | Path, text: str) -> None:
    """Replace the file's line with ``text`` at once (a reader never sees half of it)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)


def read_progress(path: Path) -> str | None:
    """The stage's last line, or None before it has written one."""
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
