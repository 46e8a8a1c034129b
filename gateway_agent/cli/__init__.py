"""The ``gateway-agent`` command line: one argparse parser, each command group in its own module."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .._exceptions import ConfigError

TYPE_CHECKING = False  # not typing's: keeps typing off the de-identification path
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import Any

    from ..config import Settings

__all__ = ["build_parser", "main", "settings_from_args"]


def settings_from_args(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load Settings with the global ``--config`` and the command's own flag overrides."""
    from ..config import load_settings  # pydantic costs ~0.3 s; only commands that need it pay

    config: Path | None = getattr(args, "config", None)
    return load_settings(config, overrides)


#: Commands whose module is enough to parse them: ``main`` builds a parser with only that
#: module (the others cost start-up time: structlog, imaging presets...). The parsed arguments
#: are the same as with the full parser.
_LEAN_COMMANDS = frozenset({"anonymize", "inspect"})


def build_parser(*, only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; each command module adds its subcommands through ``register``.

    ``only="deid"`` registers the de-identification commands alone (used by :func:`main` for
    ``anonymize`` and ``inspect``, whose start-up time matters).
    """
    import argparse
    from pathlib import Path

    from ._help import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="gateway-agent",
        description="Edge gateway for medical images: de-identify, queue, upload, QC.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML config file (default /etc/gateway-agent/config.toml)",
    )
    parser.add_argument(
        "--log-format", choices=["auto", "json", "console"], default=None, help="log renderer"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from . import deid_cmds

    if only == "deid":
        deid_cmds.register(sub)
        return parser
    from . import agent_cmds, config_cmds, imaging_cmds

    for module in (agent_cmds, deid_cmds, imaging_cmds, config_cmds):
        module.register(sub)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` when the global options before it are unambiguous."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "--log-format"):
            i += 2
        elif arg.startswith(("--config=", "--log-format=")):
            i += 1
        elif arg.startswith("-"):
            return None  # -h, abbreviations, errors: leave them to the full parser
        else:
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    words = sys.argv[1:] if argv is None else list(argv)
    lean = _command_of(words) in _LEAN_COMMANDS
    args: argparse.Namespace | None = None
    if words[:1] == ["anonymize"]:
        from .deid_cmds import parse_anonymize  # without argparse: ~4 ms of its start-up

        args = parse_anonymize(words[1:])
    if args is None:
        args = build_parser(only="deid" if lean else None).parse_args(words)
    try:
        status: int = args.func(args)
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
    if argv is None and lean:
        # The process ends now, and nothing is left open but stdio: outputs and the audit file
        # are closed, workers reaped. Skip the interpreter's teardown (module clean-up and a
        # last collection: ~4 ms of a 0.1 s ``anonymize`` run).
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:
            status = 141
        os._exit(status)
    return status
