"""A damaged outbox database: found when the agent starts, kept aside, and replaced by a new one
that the start-up reconcile fills from the outbox files (self-describing part-10 files).

A bad disk, a bad copy or a cut power supply can leave the database truncated, with a wrong
header or with damaged pages. Opening it, or SQLite's ``quick_check``, then says so
(``SQLITE_CORRUPT``, ``SQLITE_NOTADB``). The damaged file is renamed (never deleted), the new
database is filled by ``reconcile`` from the files in the outbox folder: every instance not yet
removed by retention is queued again (those already sent are sent again; the destination is
idempotent per SOP Instance UID), none is lost. Other errors (locked, cannot open, disk full)
are not damage and are raised as they are.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from ...logs import get_logger
from ._sqlite import is_damage, keep_aside
from .store import Outbox

__all__ = ["is_damage", "open_outbox"]

log = get_logger()


def open_outbox(db_path: Path, **kwargs: Any) -> tuple[Outbox, Path | None]:
    """The outbox at ``db_path`` (``kwargs`` go to :class:`Outbox`), and where a damaged one was
    kept (None when it was sound)."""
    problem = _check(db_path, kwargs)
    if isinstance(problem, Outbox):
        return problem, None
    kept = keep_aside(db_path, time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
    log.error(
        "outbox_damaged",
        problem=problem,
        kept_as=kept.name,
        action="a new outbox is rebuilt from the outbox files; instances already sent may be "
        "sent again",
    )
    return Outbox(db_path, **kwargs), kept


def _check(db_path: Path, kwargs: dict[str, Any]) -> Outbox | str:
    """The opened outbox when sound, else what is wrong with it."""
    try:
        outbox = Outbox(db_path, **kwargs)
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        return str(exc)[:200]
    try:
        problem = outbox.integrity_problem()
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            outbox.close()
            raise
        problem = str(exc)[:200]
    if problem is None:
        return outbox
    outbox.close()
    return problem
