"""SQLite plumbing shared by the agent's tables: one connection, pragmas, IMMEDIATE transactions."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["connect", "query", "transaction"]


def connect(db_path: Path | None) -> sqlite3.Connection:
    """Open (creating with mode 0600) a database in autocommit mode; ``None`` means in memory.

    WAL for files, ``synchronous=FULL`` (a committed row survives a power cut; NORMAL in WAL mode
    would not), a 30 s busy timeout. The connection may be used from several threads, always
    under the caller's lock.
    """
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(db_path, os.O_CREAT | os.O_RDWR, 0o600))
        db_path.chmod(0o600)
    conn = sqlite3.connect(
        str(db_path) if db_path is not None else ":memory:",
        isolation_level=None,
        check_same_thread=False,
        timeout=30.0,
    )
    conn.execute("pragma busy_timeout = 30000")
    if db_path is not None:
        conn.execute("pragma journal_mode = wal")
    conn.execute("pragma synchronous = full")
    return conn


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
