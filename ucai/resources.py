"""Where the files shipped with ucai live, in a source checkout and when installed.

In a checkout, `configs/` and `data/` sit beside the `ucai/` package. In a wheel they
are copied into the package as `ucai/_shipped/configs` and `ucai/_shipped/data` (see
pyproject.toml). A user can therefore type a bare config name such as
`ppo_unethical.yaml` from any folder and get the shipped file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ucai.errors import UcaiError

_PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped_root(kind: str) -> Path:
    checkout = _PACKAGE_DIR.parent / kind
    if checkout.is_dir():
        return checkout
    return _PACKAGE_DIR / "_shipped" / kind


def configs_dir() -> Path:
    """The folder of shipped YAML configs."""
    return _shipped_root("configs")


def data_dir() -> Path:
    """The folder of shipped data files (the default prompt set)."""
    return _shipped_root("data")


def resolve_shipped(path: str | Path, kind: str = "configs") -> Path:
    """Return `path` if it exists, else the shipped file it names, else `path` unchanged.

    `configs/ppo_ethical.yaml`, `ppo_ethical.yaml` and `ppo_ethical` all resolve to the
    shipped config when no such file exists relative to the working directory. The
    unchanged path is returned when nothing matches so that the caller's own
    "file not found" message names what the user typed.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    root = _shipped_root(kind)
    parts = p.parts
    candidates = [root / p]
    if parts and parts[0] == kind:
        candidates.append(root.joinpath(*parts[1:]))
    if kind == "configs" and p.suffix not in (".yaml", ".yml"):
        candidates += [c.with_name(c.name + ".yaml") for c in list(candidates)]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return p


def read_yaml(path: Path):
    """The content of a YAML file; a syntax error or a file that is not UTF-8 is a
    one-line `UcaiError` naming the file (and the line, where YAML knows it)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UcaiError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError as exc:
        raise UcaiError(f"{path}: not valid UTF-8 ({exc.reason})") from None
