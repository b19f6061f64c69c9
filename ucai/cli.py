"""The ``ucai`` command: argument dispatch.

    ucai fit      --config configs/sft_ethical.yaml          # training stages
    ucai predict  --config configs/critique_revision_ethical.yaml
    ucai test     --config configs/eval.yaml
    ucai pipeline --config configs/pipeline/demo.yaml        # every stage in order

``pipeline`` goes to `ucai.pipeline`, the Lightning subcommands to `ucai.stage_cli`, and
``ucai --help`` is answered here without importing either. A config name that is not a
file (``ppo_unethical.yaml``) is looked up among the configs shipped with ucai.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ucai import stage_cli
from ucai.errors import exit_status
from ucai.stage_catalog import DESCRIPTION, SUBCOMMAND_SUMMARIES


def top_level_parser() -> argparse.ArgumentParser:
    """The parser whose help ``ucai --help`` prints: plain argparse, so that listing the
    subcommands does not import Lightning. It lists the same options as the LightningCLI
    parser, plus ``pipeline``, and only formats help (the real parsing is LightningCLI's)."""
    parser = argparse.ArgumentParser(prog="ucai", description=DESCRIPTION, add_help=False)
    parser.add_argument("-h", "--help", action="help", help="Show this help message and exit.")
    parser.add_argument("-c", "--config", help="Path to a configuration file in json or yaml format.")
    # "\b" as jsonargparse does: a terminal shows "--print_config[=flags]", as in fit's help.
    parser.add_argument(
        "--print_config",
        metavar="\b[=flags]",
        help="Print the configuration after applying all other arguments and exit. The optional flags "
        "are one or more of skip_default, skip_unset, separated by commas.",
    )
    subcommands = parser.add_subparsers(
        title="subcommands",
        description="For more details of each subcommand, add it as an argument followed by --help.",
        metavar="{" + ",".join(SUBCOMMAND_SUMMARIES) + "}",
    )
    for name, summary in SUBCOMMAND_SUMMARIES.items():
        subcommands.add_parser(name, help=summary)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``ucai`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in stage_cli.HELP_FLAGS:
        top_level_parser().print_help()
        return 0
    # Options may come before the subcommand (``ucai --config X fit``): Lightning's parser
    # checks those. A missing or misspelt subcommand is answered here, pipeline included,
    # without importing Lightning.
    if not argv or (not argv[0].startswith("-") and argv[0] not in SUBCOMMAND_SUMMARIES):
        got = f"got {argv[0]!r}; " if argv else ""
        print(f"ucai: error: {got}expected a subcommand: {', '.join(SUBCOMMAND_SUMMARIES)} (ucai --help says what each does)",
              file=sys.stderr)
        return 2
    if argv and argv[0] == "pipeline":
        from ucai import pipeline  # no Lightning: the plan imports it (in the fork server's process if any)

        stage_cli.prepare_console()
        return exit_status(pipeline.main, stage_cli.resolve_config_args(argv[1:]))
    return stage_cli.main(argv)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
