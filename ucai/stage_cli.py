"""``ucai fit|validate|test|predict``: one stage, run by `ucai.lightning_cli.UcaiCLI`.

The pipeline runs each of its stages through `main` too (in a process of its own), so
a stage behaves the same whether a person or the pipeline starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence

from ucai import help_cache, quiet
from ucai.config_source import CONFIG_FLAGS
from ucai.errors import exit_status
from ucai.resources import resolve_shipped
from ucai.stage_catalog import SUBCOMMANDS, import_stages

HELP_FLAGS = ("-h", "--help")


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """Replace each ``--config NAME`` (or ``-c NAME``) whose file does not exist with the
    shipped config."""
    out = []
    expect_value = False
    for arg in argv:
        flag, equals, value = arg.partition("=")
        if expect_value:
            out.append(str(resolve_shipped(arg, "configs")))
            expect_value = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif flag in CONFIG_FLAGS and equals:
            out.append(f"{flag}={resolve_shipped(value, 'configs')}")
        else:
            out.append(arg)
    return out


def is_plain_help(argv: Sequence[str]) -> bool:
    """Whether ``argv`` only asks for help (``fit --help``): nothing in it can name a
    class, so the stage modules need not be imported, and the text can be cached.

    Anything more (``--config``, ``--model.help SFTModule``, an override) is parsed the
    usual way, after the stages are imported.
    """
    return any(arg in HELP_FLAGS for arg in argv) and all(arg in HELP_FLAGS or arg in SUBCOMMANDS for arg in argv)


def configure_logging() -> None:
    """ucai's own log lines on stderr, ``[ucai] message``; ``UCAI_LOG_LEVEL`` sets the level."""
    logger = logging.getLogger("ucai")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[ucai] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("UCAI_LOG_LEVEL", "INFO"))


def run(argv: Sequence[str]) -> int:
    """Parse ``argv`` (``fit --config X.yaml ...``) and run the stage; raises on errors."""
    argv = list(argv)
    plain_help = is_plain_help(argv)
    if plain_help:
        # A saved copy of the same help answers without Lightning (see `ucai.help_cache`).
        text = help_cache.lookup(argv)
        if text is not None:
            sys.stdout.write(text)
            return 0
    else:
        import_stages()
        quiet.install_progress_filter()
    from ucai.lightning_cli import UcaiCLI, one_line

    argv = resolve_config_args(argv)
    try:
        with help_cache.recording(argv) if plain_help else contextlib.nullcontext():
            UcaiCLI(args=argv)
    except ArgumentError as error:
        raise one_line(error, argv) from None
    except SystemExit as exc:  # --help and --print_config end the parse with status 0
        if exc.code not in (0, None):
            raise
    return 0


def prepare_console() -> None:
    """ucai's log format, and the known-harmless messages of other libraries hidden."""
    configure_logging()
    # Arguments always come from here (names of shipped configs resolved); Lightning
    # warns about that only because sys.argv is not empty too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    quiet.install()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage command; returns its exit status (2 and one line for a user's mistake)."""
    prepare_console()
    return exit_status(run, list(sys.argv[1:] if argv is None else argv))
