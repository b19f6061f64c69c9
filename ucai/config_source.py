"""Which config file, and which line of it, gave a stage's option its value.

jsonargparse reports a bad value by its option (``--data.init_args: Option 'limitt' is
not accepted``) and, for a value read from a YAML file, with the file's whole mapping
as the value given: the user is left to find the line. The arguments are applied in
order, so the source of an option is the last argument that set it: a ``--config``
file that holds its key, or a command-line option that names it or a key above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

CONFIG_FLAGS = ("--config", "-c")


def key_line(path: Path, keys: Sequence[str]) -> int | None:
    """The 1-based line of ``keys`` (``["data", "init_args", "limitt"]``) in the YAML
    file at ``path``, or None where the file does not hold it (or cannot be read)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        # The last of repeated keys is the one a YAML loader keeps.
        match = [(name, value) for name, value in node.value if isinstance(name, yaml.ScalarNode) and name.value == key]
        if not match:
            return None
        name, node = match[-1]
        line = name.start_mark.line + 1
    return line


def _option_keys(arg: str) -> list[str] | None:
    """``--model.init_args.kl_coef=0.1`` → ``["model", "init_args", "kl_coef"]``; None for
    anything that is not a long option."""
    if not arg.startswith("--") or arg == "--":
        return None
    return arg[2:].partition("=")[0].split(".")


def value_source(argv: Sequence[str], keys: Sequence[str], files_only: bool = False) -> tuple[Path, int] | None:
    """The config file and line that set ``keys`` last among ``argv`` (a stage's
    arguments, ``fit --config X.yaml --model.init_args.k=v``), or None where a
    command-line option set them last or no argument did. With ``files_only`` (the
    value reached the parser as a mapping) only the command-line options that give a
    mapping (``--model.init_args.lora={"r": ...}``) count, as a file does: the others
    are checked one by one, after the files' mappings."""
    keys = list(keys)
    source: tuple[Path, int] | None = None
    args = list(argv)
    for index, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag in CONFIG_FLAGS:
            file = value if equals else (args[index + 1] if index + 1 < len(args) else None)
            line = key_line(Path(file), keys) if file else None
            if line is not None:
                source = (Path(file), line)
            continue
        option = _option_keys(arg)
        # ``--data.init_args.limitt=3`` sets the key; ``--data=...`` sets the mapping above it.
        if option is not None and option == keys[: len(option)]:
            value = arg.partition("=")[2] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            if not files_only or value.lstrip().startswith("{"):
                source = None
    return source
