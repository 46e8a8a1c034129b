"""SQLite plumbing shared by the agent's tables: one connection, pragmas, IMMEDIATE transactions."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["connect", "is_damage", "keep_aside", "query", "transaction"]

#: SQLite's answers that mean "this file is damaged" (not "busy", "locked" or "cannot open").
_DAMAGE = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def is_damage(exc: BaseException) -> bool:
    """True if ``exc`` says the database file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGE


def keep_aside(db_path: Path, stamp: str) -> Path:
    """Rename a damaged database (and its ``-wal`` and ``-shm``) to ``<name>.damaged-<stamp>``
    (``-2``, ``-3``... if taken); return the new path. Nothing is deleted."""
    target = db_path.with_name(f"{db_path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = db_path.with_name(f"{db_path.name}.damaged-{stamp}-{n}")
    for suffix in ("-wal", "-shm"):
        side = db_path.with_name(db_path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    db_path.rename(target)
    return target


def connect(db_path: Path | None, *, read_only: bool = False) -> sqlite3.Connection:
    """Open (created by SQLite, then made 0600) a database in autocommit mode; ``None``: in memory.

    WAL for files, ``synchronous=FULL`` (a committed row survives a power cut; NORMAL in WAL mode
    would not), a 30 s busy timeout. The connection may be used from several threads, always
    under the caller's lock. ``read_only``: an existing database, opened for reading only (no
    file is created, no mode changed, nothing written: what ``status`` uses).
    """
    if read_only:
        if db_path is None:
            raise ValueError('Argument "db_path" is required with "read_only".')
        conn = sqlite3.connect(
            f"{db_path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=30.0,
        )
        conn.execute("pragma busy_timeout = 30000")
        return conn
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        str(db_path) if db_path is not None else ":memory:",
        isolation_level=None,
        check_same_thread=False,
        timeout=30.0,
    )
    conn.execute("pragma busy_timeout = 30000")
    if db_path is not None:
        # Never open the database file outside SQLite: closing any descriptor of it drops every
        # POSIX lock this process holds on it, and another process closing its connection then
        # believes it was the last and deletes the WAL under us. SQLite creates the file; chmod
        # works on the name, and the WAL and shared-memory files take the database's mode.
        _owner_only(db_path)
        conn.execute("pragma journal_mode = wal")
        for suffix in ("-wal", "-shm"):
            _owner_only(db_path.with_name(db_path.name + suffix))
    conn.execute("pragma synchronous = full")
    return conn


def _owner_only(path: Path) -> None:
    """``chmod 0600`` by name (never through a descriptor); a missing file is left alone."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_mode & 0o777 != 0o600:
            path.chmod(0o600)


@contextmanager
def transaction(
    conn: sqlite3.Connection, lock: threading.Lock | threading.RLock
) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … commit, or rollback and re-raise; holds ``lock`` throughout."""
    with lock:
        conn.execute("begin immediate")
        try:
            yield conn
        except BaseException:
            conn.execute("rollback")
            raise
        conn.execute("commit")


def query(
    conn: sqlite3.Connection,
    lock: threading.Lock | threading.RLock,
    sql: str,
    params: Sequence[Any] = (),
) -> list[tuple[Any, ...]]:
    """All rows of one read, under ``lock``."""
    with lock:
        return list(conn.execute(sql, params).fetchall())
