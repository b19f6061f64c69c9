"""What the pipeline remembers between runs: content hashes, finished-stage markers and
running-stage state files.

When a stage succeeds, a ``.ucai-stage.json`` beside its output (inside an output
folder, or ``.<file>.ucai-stage.json`` next to an output file) records a hash of the
stage's command, its config files' text and its inputs (file contents; for model
folders the hash recorded in their own marker). A stage whose outputs exist with a
matching hash is up to date. A state file under ``<root>/.pipeline/`` says a stage was
started with a given hash, so an interrupted run with the same hash resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ucai.data.io import atomic_output
from ucai.pipeline.plan import StageRun, is_folder_output
from ucai.resources import resolve_shipped

MARKER = ".ucai-stage.json"


def marker_path(run: StageRun) -> Path:
    primary = run.outputs[0]
    return primary / MARKER if is_folder_output(primary) else primary.with_name(f".{primary.name}{MARKER}")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_fingerprint(path: Path) -> str:
    """Content hash of a file; for a folder the hash its producing stage recorded;
    ``"missing"`` when there is neither."""
    resolved = resolve_shipped(path, "data") if not path.exists() else path
    if resolved.is_file():
        return _file_digest(resolved)
    if resolved.is_dir():
        marker = resolved / MARKER
        if marker.is_file():
            return json.loads(marker.read_text())["hash"]
        listing = sorted((str(p.relative_to(resolved)), p.stat().st_size) for p in resolved.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return "missing"


def stage_hash(run: StageRun) -> str:
    payload = {
        "stage": run.stage,
        "side": run.side,
        "mode": run.mode,
        "configs": [config.read_text(encoding="utf-8") for config in run.configs],
        "args": run.args,
        "inputs": {str(p): input_fingerprint(p) for p in run.inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def outputs_complete(run: StageRun) -> bool:
    for path in run.outputs:
        if is_folder_output(path):
            if not path.is_dir() or not any(p.name != MARKER for p in path.iterdir()):
                return False
        elif not path.is_file() or path.stat().st_size == 0:
            return False
    return True


def read_json(path: Path) -> dict:
    """A marker or state file; ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def state_file(root: Path, run: StageRun) -> Path:
    return root / ".pipeline" / f"{run.stage}{'-' + run.side if run.side else ''}.json"


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_output(path) as handle:
        json.dump(data, handle, indent=2)


def clean_outputs(run: StageRun) -> None:
    """Remove a stage's outputs, their CSV twins, shards and marker (a changed stage restarts clean)."""
    for path in run.outputs:
        if is_folder_output(path):
            shutil.rmtree(path, ignore_errors=True)
            continue
        # Everything named <stem>.*: the CSV twin, shard folders and the extra files some
        # stages keep beside their output (prompts.all.jsonl, preferences.dropped.jsonl).
        if path.parent.is_dir():
            for sibling in path.parent.glob(path.stem + ".*"):
                if sibling.is_dir():
                    shutil.rmtree(sibling, ignore_errors=True)
                else:
                    sibling.unlink(missing_ok=True)
        marker_path(run).unlink(missing_ok=True)
