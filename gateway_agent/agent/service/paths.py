"""Where the daemon keeps its state, and the folder layouts it refuses."""

from __future__ import annotations

from pathlib import Path

from ..._exceptions import ConfigError
from ...config import Settings

__all__ = ["StatePaths", "check_layout"]


class StatePaths:
    """Where the daemon keeps its state under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir).resolve()
        self.outbox_db = self.root / "outbox.db"
        self.outbox_files = self.root / "outbox"
        self.quarantine = self.root / "quarantine"
        self.qc_report = self.root / "qc"
        #: The C-STORE listener's spool: instances received, not yet committed to the outbox.
        self.received = self.root / "received"

    def damaged_databases(self) -> list[Path]:
        """Outbox databases found damaged and moved aside (kept, oldest first)."""
        try:
            return sorted(self.root.glob(f"{self.outbox_db.name}.damaged-*[0-9]"))
        except OSError:
            return []


def _inside(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or below it."""
    try:
        a.relative_to(b)
    except ValueError:
        return False
    return True


def check_layout(settings: Settings) -> None:
    """Refuse folder layouts where the agent would ingest its own output."""
    inbox = Path(settings.inbox).resolve()
    others = {"state_dir": Path(settings.state_dir).resolve()}
    for d in settings.all_destinations:
        if d.kind == "folder":
            key = f"destinations.{d.name}.folder" if settings.destinations else "destination.folder"
            others[key] = Path(d.folder).resolve()
    if settings.originals == "archive" and settings.archive_dir is not None:
        others["archive_dir"] = Path(settings.archive_dir).resolve()
    for name, path in others.items():
        if _inside(path, inbox) or _inside(inbox, path):
            raise ConfigError(f"{name} and inbox must not contain each other")
