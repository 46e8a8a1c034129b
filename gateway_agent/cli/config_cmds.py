"""The ``config`` command group: ``config show`` (values and their sources) and ``config check``."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from .._exceptions import ConfigError
from ._help import add_command

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..config import Settings

# pydantic and the config are imported inside the functions: the parser is built for every
# command, and importing them costs about 0.1 s.

__all__ = ["config_problems", "effective_config", "register"]

MASK = "********"
_SECRET_NAMES = frozenset({"password", "token", "secret", "api_key"})


def _config_path(args: argparse.Namespace) -> Path | None:
    from ..config import DEFAULT_CONFIG_FILE

    explicit: Path | None = getattr(args, "config", None)
    if explicit is not None:
        return explicit
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    fmt = getattr(args, "log_format", None)
    return {"log.format": fmt} if fmt else {}


def _leaves(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every setting; a list of sections (``[[destinations]]``) by
    entry name: ``destinations.pacs.url``."""
    from pydantic import BaseModel

    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for item in value:
                label = getattr(item, "name", None) or str(value.index(item))
                yield from _leaves(item, f"{prefix}{name}.{label}.")
        else:
            yield f"{prefix}{name}", value


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in tree.items():
        keys.add(prefix + k)
        if isinstance(v, Mapping):
            keys |= _flat_keys(v, f"{prefix}{k}.")
    return keys


def _env_keys(env: Mapping[str, str]) -> dict[str, str]:
    """Dotted setting key -> the GATEWAY_* variable that set it (JSON section values included)."""
    out: dict[str, str] = {}
    for var, raw in env.items():
        if not var.upper().startswith("GATEWAY_"):
            continue
        dotted = ".".join(var[len("GATEWAY_") :].lower().split("__"))
        out[dotted] = var
        if raw.lstrip().startswith("{"):
            try:
                parsed = json.loads(raw)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                for key in _flat_keys(parsed, dotted + "."):
                    out[key] = var
    return out


def _mask(key: str, value: Any) -> Any:
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if key.rsplit(".", 1)[-1] in _SECRET_NAMES and value not in (None, ""):
        return MASK
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            netloc = f"{parts.username}:{MASK}@{parts.hostname}"
            netloc += f":{parts.port}" if parts.port else ""
            return urlunsplit(parts._replace(netloc=netloc))
    if isinstance(value, Path):
        return str(value)
    return value


def effective_config(
    settings: Settings,
    *,
    toml: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every setting as ``{dotted key: {"value", "source"[, "env"]}}``, secrets masked.

    ``source`` is the layer that won: ``flag`` > ``env`` > ``file`` > ``default``.
    """
    file_keys = _flat_keys(toml or {})
    flag_keys = {k for k, v in (overrides or {}).items() if v is not None}
    env_keys = _env_keys(os.environ if env is None else env)
    out: dict[str, dict[str, Any]] = {}
    for name, value in _leaves(settings):
        entry: dict[str, Any] = {"value": _mask(name, value)}
        key = name
        if key.startswith("destinations."):
            key = "destinations"  # a list of sections comes whole from one layer
        if key in flag_keys:
            entry["source"] = "flag"
        elif key in env_keys:
            entry["source"] = "env"
            entry["env"] = env_keys[key]
        elif key in file_keys:
            entry["source"] = "file"
        else:
            entry["source"] = "default"
        out[name] = entry
    return out


def _render(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)


def cmd_show(args: argparse.Namespace) -> int:
    """Print the effective configuration with the source of each value."""
    from ..config import DEFAULT_CONFIG_FILE, load_settings, read_toml

    path = _config_path(args)
    overrides = _overrides(args)
    settings = load_settings(path, overrides)
    toml = read_toml(path) if path is not None else {}
    table = effective_config(settings, toml=toml, overrides=overrides)
    if args.json:
        doc = {"config_file": str(path) if path else None, "settings": table}
        print(json.dumps(doc, indent=2, sort_keys=False))
        return 0
    print(
        f"# config file: {path if path else '(none; ' + str(DEFAULT_CONFIG_FILE) + ' not found)'}"
    )
    width = max(len(k) for k in table)
    rendered = {k: _render(e["value"]) for k, e in table.items()}
    vwidth = min(40, max(len(v) for v in rendered.values()))
    for key, entry in table.items():
        source = entry["source"] + (f" {entry['env']}" if "env" in entry else "")
        print(f"{key:<{width}} = {rendered[key]:<{vwidth}}  # {source}")
    return 0


def _dir_problem(key: str, path: Path) -> str | None:
    if path.exists():
        if not path.is_dir():
            return f"{key}: {path} exists but is not a folder"
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            return f"{key}: folder {path} is not readable and writable by this user"
        return None
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}: folder {path} does not exist and cannot be created (no write access)"
    return None


def _file_problem(key: str, path: Path) -> str | None:
    if not path.is_file():
        return f"{key}: file {path} does not exist"
    if not os.access(path, os.R_OK):
        return f"{key}: file {path} is not readable by this user"
    return None


def config_problems(settings: Settings) -> list[str]:
    """What would stop the agent working on this machine, one line per problem (empty: fine)."""
    problems: list[str] = []
    dirs: dict[str, Path] = {"inbox": settings.inbox, "state_dir": settings.state_dir}
    if settings.originals == "archive" and settings.archive_dir is not None:
        dirs["archive_dir"] = settings.archive_dir
    several = bool(settings.destinations)
    files: dict[str, Path | None] = {}
    secrets: dict[str, Path | None] = {"deid.secret_file": settings.secret_file}
    for dest in settings.all_destinations:
        where = f"destinations.{dest.name}" if several else "destination"
        if dest.kind == "folder":
            dirs[f"{where}.folder"] = dest.folder
        for name in ("password_file", "token_file", "aws_credentials_file"):
            files[f"{where}.{name}"] = getattr(dest, name)
            secrets[f"{where}.{name}"] = getattr(dest, name)
        for name in ("ca_bundle", "client_cert", "client_key"):
            files[f"{where}.{name}"] = getattr(dest, name)
    for key, path in dirs.items():
        problem = _dir_problem(key, path)
        if problem:
            problems.append(problem)
    for key, maybe in files.items():
        if maybe is not None:
            problem = _file_problem(key, maybe)
            if problem:
                problems.append(problem)
    for key, maybe in secrets.items():
        if maybe is not None and maybe.is_file():
            mode = stat.S_IMODE(maybe.stat().st_mode)
            if mode & 0o077:
                problems.append(
                    f"{key}: {maybe} is readable by group or others (mode {mode:04o}); "
                    f"allowed: 0600 or 0400 (chmod 600 {maybe})"
                )
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the configuration and the folders/files it names; exit 0 (fine) or 2."""
    from ..config import load_settings

    path = _config_path(args)
    try:
        settings = load_settings(path, _overrides(args))
    except ConfigError as exc:
        print(f"gateway-agent: {exc}", file=sys.stderr)
        return 2
    problems = config_problems(settings)
    if problems:
        print(f"gateway-agent: configuration has {len(problems)} problem(s):", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    print(f"configuration OK ({path if path else 'defaults and environment only'})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``config show`` and ``config check``."""
    parser = add_command(
        sub,
        "config",
        summary="show or check the configuration",
        description="`config show` prints each value and its source; `config check` validates.",
        examples=["gateway-agent config show", "gateway-agent config check --config FILE"],
    )
    group = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = add_command(
        group,
        "show",
        summary="effective configuration; source of each value; secrets masked",
        examples=["gateway-agent config show --config /etc/gateway-agent/config.toml --json"],
    )
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)
    check = add_command(
        group,
        "check",
        summary="validate; exit 0 when fine, 2 with one line per problem",
        description="Accepts exactly what `run` accepts: what `run` refuses fails here too.",
        examples=["gateway-agent config check --config /etc/gateway-agent/config.toml"],
    )
    check.set_defaults(func=cmd_check)
