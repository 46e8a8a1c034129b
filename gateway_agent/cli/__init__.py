"""The ``gateway-agent`` command line: one argparse parser, each command group in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigError

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["main", "settings_from_args"]


def settings_from_args(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> Settings:
    """Load Settings with the global ``--config`` and the command's own flag overrides."""
    from ..config import load_settings  # pydantic costs ~0.3 s; only commands that need it pay

    config: Path | None = getattr(args, "config", None)
    return load_settings(config, overrides)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each command module adds its subcommands through ``register``."""
    from . import agent_cmds, config_cmds, deid_cmds, imaging_cmds

    parser = argparse.ArgumentParser(
        prog="gateway-agent",
        description="Edge gateway for medical images: de-identify, queue, upload, QC.",
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
    for module in (agent_cmds, deid_cmds, imaging_cmds, config_cmds):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(f"gateway-agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status
