"""The ``gateway-agent`` command line: one argparse parser, each command group in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError
from .._version import __version__
from ._help import HelpFormatter

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["build_parser", "main", "settings_from_args"]


def settings_from_args(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load Settings with the global ``--config`` and the command's own flag overrides."""
    from ..config import load_settings  # pydantic: only the commands that read settings pay

    config: Path | None = getattr(args, "config", None)
    return load_settings(config, overrides)


def _add_global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--config`` and ``--log-format``, accepted before and after the command word.

    On the commands' parsers the default is ``argparse.SUPPRESS``: a value given before the
    command is kept unless the same option is given again after it.
    """
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="FILE",
        help="TOML config file (default /etc/gateway-agent/config.toml)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=default,
        help="log renderer (default: from the configuration)",
    )


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command parser below ``parser`` (``config show`` included), depth first."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.append(child)
                found.extend(_commands(child))
    return found


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each command module adds its commands through ``register``."""
    from . import agent_cmds, config_cmds, deid_cmds, imaging_cmds, pixels_cmds

    parser = argparse.ArgumentParser(
        prog="gateway-agent",
        description="Edge gateway for medical images: de-identify, queue, upload, QC.",
        epilog="example:\n  gateway-agent run --inbox /srv/inbox --destination-folder /srv/out",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (agent_cmds, deid_cmds, pixels_cmds, imaging_cmds, config_cmds):
        module.register(sub)
    for command in _commands(parser):
        _add_global_options(command, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # here, where a reader that went away is handled below
    except ConfigError as exc:
        print(f"gateway-agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``gateway-agent inspect F | head``): not worth a traceback. Point
        # stdout at /dev/null so the flush at exit does not raise again (Python's documented way).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by it
    return status
