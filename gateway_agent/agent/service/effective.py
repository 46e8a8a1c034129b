"""The settings the running agent uses, recorded in its state folder without credentials.

``gateway-agent status`` reads them back: it shows what the agent actually runs with (flags and
``GATEWAY_*`` variables included), not what the configuration file says now.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..._version import __version__
from ...config import Settings
from ...dicom.files import atomic_write, write_all

__all__ = ["EFFECTIVE_SETTINGS_FILE", "read_effective_settings", "write_effective_settings"]

#: In the state folder, next to ``outbox.db``.
EFFECTIVE_SETTINGS_FILE = "effective-settings.json"


def effective_record(settings: Settings, destinations: list[dict[str, str]]) -> dict[str, Any]:
    """Every setting in effect, JSON-ready: secrets (passwords, tokens) are masked by pydantic
    (``SecretStr``), and URLs carry no credentials (the settings refuse them).

    ``destinations`` lists each destination's ``name`` and credential-free ``target``.
    """
    return {
        "version": __version__,
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "destinations": destinations,
        "settings": settings.model_dump(mode="json"),
    }


def write_effective_settings(
    state_dir: Path, settings: Settings, destinations: list[dict[str, str]]
) -> Path:
    """Write the record atomically into ``state_dir`` (a 0700 folder); return its path."""
    data = json.dumps(effective_record(settings, destinations), indent=1, sort_keys=True)
    path = Path(state_dir) / EFFECTIVE_SETTINGS_FILE

    def write(fd: int) -> int:
        payload = data.encode() + b"\n"
        write_all(fd, payload)
        return len(payload)

    atomic_write(path, write, fsync=True)
    return path


def read_effective_settings(state_dir: Path) -> dict[str, Any] | None:
    """The record of the agent that last started with ``state_dir``; None when there is none."""
    try:
        data = json.loads((Path(state_dir) / EFFECTIVE_SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
