"""Help texts of ``ucai fit|validate|test|predict --help`` shipped with ucai, so that the
first such request on a fresh install answers without importing Lightning.

Building that help means importing Lightning (torch, torch._dynamo, torchmetrics with
transformers and scipy): about nine tenths of the 7-8 s a first call took on a busy
2-core machine, all of it inside those libraries (the parser itself takes under 1 s).
What the help shows depends only on the code of ucai and a few libraries, so
``python -m ucai.help_layout`` builds it once and saves it in ``ucai/help_layouts.json`` with the versions of those
libraries and a digest of ucai's help-shaping code (`ucai.help_cache.shaping_versions`,
`ucai.help_cache.shaping_sources_digest`); it is used only while both still match.

The saved form is a *layout*, not a text: the calls argparse makes on its help formatter
(usage, text, section, argument) with every width-independent piece already rendered
(an option's invocation, its expanded help, the usage fragments). Replaying those calls
on a plain `argparse.HelpFormatter` wraps them for the current terminal, so the text is
the one jsonargparse would print at any width, without jsonargparse or Lightning loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ucai import help_cache
from ucai.cli import HELP_FLAGS, SUBCOMMANDS

SHIPPED = Path(__file__).with_name("help_layouts.json")

# ---------------------------------------------------------------------------------------
# Recording (Lightning loaded)


def _snapshot(formatter, action) -> dict:
    """One argument as argparse's `_format_action` sees it, rendered: its invocation
    (``--trainer.max_steps MAX_STEPS``), its help as printed (type and default added by
    jsonargparse), and the same for its sub-actions (the subcommand choices)."""
    help_attr, expanded = action.help, ""
    if help_attr is None:
        # jsonargparse prints a bare argument's type and default as its help (see
        # DefaultHelpFormatter._format_action); do the same here.
        text = formatter._expand_help(action)
        if text and text.strip():
            action.help, action._jsonargparse_preexpanded_help = text, True
            try:
                help_attr, expanded = text, formatter._expand_help(action)
            finally:
                action.help = None
                del action._jsonargparse_preexpanded_help
    elif help_attr and help_attr.strip():
        expanded = formatter._expand_help(action)
    return {
        "invocation": formatter._format_action_invocation(action),
        "help": help_attr,
        "expanded": expanded,
        "subactions": [_snapshot(formatter, sub) for sub in formatter._iter_indented_subactions(action)],
    }


def _usage_pieces(formatter, actions, groups) -> dict:
    """The usage line's width-independent fragments: argparse wraps it from these three."""
    from jsonargparse._formatters import filter_non_parsing_actions

    actions = list(filter_non_parsing_actions(actions))
    optionals = [a for a in actions if a.option_strings]
    positionals = [a for a in actions if not a.option_strings]
    return {
        "all": formatter._format_actions_usage(optionals + positionals, groups) if actions else None,
        "optionals": formatter._format_actions_usage(optionals, groups) if optionals else None,
        "positionals": formatter._format_actions_usage(positionals, groups) if positionals else None,
    }


def recording_formatter(base: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """A subclass of ``base`` that also writes down every formatter call as a layout;
    ``cls.layouts`` holds one layout per formatter made, in order."""

    class Recording(base):
        layouts: list[dict] = []

        def __init__(self, prog, *args, **kwargs):
            super().__init__(prog, *args, **kwargs)
            self.items: list[dict] = []
            Recording.layouts.append({"prog": prog, "items": self.items})

        def add_usage(self, usage, actions, groups, prefix=None):
            # jsonargparse drops link actions before argparse sees them.
            actions = [a for a in actions if type(a).__name__ != "ActionLink"]
            super().add_usage(usage, actions, groups, prefix)
            if usage is not argparse.SUPPRESS:
                item = {"kind": "usage", "usage": usage, "prefix": prefix}
                self.items.append({**item, **_usage_pieces(self, actions, groups)})

        def add_text(self, text):
            super().add_text(text)
            if text is not argparse.SUPPRESS and text is not None:
                self.items.append({"kind": "text", "text": text})

        def start_section(self, heading):
            super().start_section(heading)
            suppressed = heading is argparse.SUPPRESS
            self.items.append({"kind": "start", "heading": None if suppressed else heading})

        def end_section(self):
            super().end_section()
            self.items.append({"kind": "end"})

        def add_argument(self, action):
            super().add_argument(action)
            if action.help is not argparse.SUPPRESS:
                self.items.append({"kind": "argument", "action": _snapshot(self, action)})

    return Recording


# ---------------------------------------------------------------------------------------
# Replaying (plain argparse only)


class _Action:
    """The parts of an argparse action that help formatting reads, already rendered."""

    def __init__(self, snapshot: dict):
        self.invocation = snapshot["invocation"]
        self.help = snapshot["help"]
        self.expanded = snapshot["expanded"]
        self.subactions = [_Action(sub) for sub in snapshot["subactions"]]

    def _get_subactions(self) -> list[_Action]:
        return self.subactions


class _UsageMarker:
    """Stands for the recorded optionals (or positionals) in argparse's usage wrapping."""

    def __init__(self, optional: bool):
        self.option_strings = ["-"] if optional else []


class _ReplayFormatter(argparse.HelpFormatter):
    usage_pieces: dict = {}

    def _format_action_invocation(self, action: _Action) -> str:
        return action.invocation

    def _expand_help(self, action: _Action) -> str:
        return action.expanded

    def _iter_indented_subactions(self, action: _Action) -> Iterator[_Action]:
        self._indent()
        yield from action.subactions
        self._dedent()

    def _format_actions_usage(self, actions, groups) -> str:
        kinds = {bool(marker.option_strings) for marker in actions}
        if kinds == {True, False}:
            return self.usage_pieces["all"]
        if kinds == {True}:
            return self.usage_pieces["optionals"]
        return self.usage_pieces["positionals"] if kinds else ""


def render(layout: dict) -> str:
    """The help text of ``layout``, wrapped for the current terminal width."""
    formatter = _ReplayFormatter(layout["prog"])
    for item in layout["items"]:
        kind = item["kind"]
        if kind == "usage":
            formatter.usage_pieces = item
            markers = [_UsageMarker(True)] if item["optionals"] is not None else []
            markers += [_UsageMarker(False)] if item["positionals"] is not None else []
            formatter.add_usage(item["usage"], markers, [], item["prefix"])
        elif kind == "text":
            formatter.add_text(item["text"])
        elif kind == "start":
            formatter.start_section(argparse.SUPPRESS if item["heading"] is None else item["heading"])
        elif kind == "end":
            formatter.end_section()
        else:
            formatter.add_argument(_Action(item["action"]))
    return formatter.format_help()


# ---------------------------------------------------------------------------------------
# Shipped layouts


def subcommand_of(argv: Sequence[str]) -> str | None:
    """The subcommand whose plain help ``argv`` asks for (``fit -h``), else None."""
    if len(argv) >= 2 and argv[0] in SUBCOMMANDS and all(arg in HELP_FLAGS for arg in argv[1:]):
        return argv[0]
    return None


def load_shipped(path: Path | None = None) -> dict | None:
    """The shipped layouts file (`SHIPPED` by default), or None when it cannot be read."""
    try:
        return json.loads((path or SHIPPED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def shipped_help(argv: Sequence[str], path: Path | None = None) -> str | None:
    """The shipped help for ``argv`` at this width, or None when there is none for it or
    it was made for other library versions or other ucai code."""
    subcommand = subcommand_of(argv)
    if subcommand is None or help_cache.environment_shapes_help():
        return None
    shipped = load_shipped(path)
    if shipped is None or not is_current(shipped):
        return None
    layout = shipped["layouts"].get(subcommand)
    return None if layout is None else render(layout)


def is_current(shipped: dict) -> bool:
    """Whether ``shipped`` was made by this ucai code with these library versions."""
    return shipped.get("versions") == help_cache.shaping_versions() and shipped.get(
        "sources"
    ) == help_cache.shaping_sources_digest()


def record_help(subcommand: str) -> tuple[dict, str]:
    """Build ``ucai SUBCOMMAND --help`` with Lightning; returns its layout and the text
    jsonargparse printed (at the current width)."""
    import contextlib
    import io

    from jsonargparse import DefaultHelpFormatter

    from ucai.cli import STAGE_CLASSES
    from ucai.lightning_cli import UcaiCLI

    recorder = recording_formatter(DefaultHelpFormatter)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        UcaiCLI(args=[subcommand, "--help"], stage_classes=STAGE_CLASSES, formatter_class=recorder)
    return recorder.layouts[-1], printed.getvalue()


def write_shipped(path: Path | None = None) -> None:
    """Record every subcommand's help and save the layouts with the current key; refuse
    if a replay does not reproduce what jsonargparse printed."""
    layouts = {}
    for subcommand in SUBCOMMANDS:
        layout, printed = record_help(subcommand)
        if render(layout) != printed:
            raise RuntimeError(f"replaying the help of {subcommand!r} does not reproduce it")
        layouts[subcommand] = layout
    shipped = {
        "versions": help_cache.shaping_versions(),
        "sources": help_cache.shaping_sources_digest(),
        "layouts": layouts,
    }
    text = json.dumps(shipped, separators=(",", ":"))
    (path or SHIPPED).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED
    write_shipped(target)
    print(f"wrote {target}")
