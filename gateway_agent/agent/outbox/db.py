"""The outbox database: schema, the one connection, rows in (intake) and rows out (reads).

Plumbing in the style of huey's ``BaseSqlStorage``: the schema as ``create table if not exists``
strings, one connection guarded by a lock in autocommit mode, WAL, ``synchronous=FULL`` and a busy
timeout set explicitly, and one ``_tx()`` context manager (``BEGIN IMMEDIATE``/commit/rollback).
:class:`OutboxDB` is the base the outbox's other parts (``delivery``, ``circuit``, ``upkeep``)
build on; :class:`~gateway_agent.agent.outbox.store.Outbox` joins them.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sqlite import connect, query, transaction

__all__ = ["SOURCES", "STATES", "OutboxDB", "OutboxRow"]

STATES = ("queued", "sending", "sent", "dead")
#: Where an instance came from: the watched inbox, or the C-STORE listener.
SOURCES = ("inbox", "listener")

_SCHEMA = (
    """
    create table if not exists outbox (
        id integer primary key,
        sop_instance_uid text not null unique,
        study_instance_uid text not null,
        series_instance_uid text not null,
        sop_class_uid text not null,
        path text not null,
        size integer not null,
        state text not null default 'queued'
            check (state in ('queued', 'sending', 'sent', 'dead')),
        attempts integer not null default 0,
        next_attempt_at real not null default 0,
        lease_until real,
        last_error text,
        created_at real not null,
        sent_at real,
        file_gone integer not null default 0,
        audit text not null default '{}',
        scanner text,
        source text not null default 'inbox',
        calling_ae text
    )
    """,
    "create index if not exists outbox_due on outbox (state, next_attempt_at)",
    "create index if not exists outbox_sent on outbox (state, file_gone, sent_at)",
    """
    create table if not exists destination_state (
        id integer primary key check (id = 1),
        consecutive_failures integer not null default 0,
        blocked_until real not null default 0,
        probe_until real not null default 0,
        last_error text,
        last_error_at real,
        last_success_at real,
        auth_failing integer not null default 0
    )
    """,
    "insert or ignore into destination_state (id) values (1)",
)

_WHERE_IDS = " where id in (select value from json_each(?)) order by id"
_SELECT_ROWS = (
    "select id, sop_instance_uid, study_instance_uid, series_instance_uid, sop_class_uid, path,"
    " size, state, attempts, next_attempt_at, last_error, created_at, sent_at, scanner,"
    " source, calling_ae"
    " from outbox"
)


@dataclass(frozen=True)
class OutboxRow:
    """One de-identified instance waiting for (or done with) upload."""

    id: int
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    sent_at: float | None
    #: the keyed scanner pseudonym of the instance (None for rows written before it was kept)
    scanner: str | None = None
    #: ``"inbox"`` or ``"listener"`` (received over C-STORE).
    source: str = "inbox"
    #: The calling AE title of the association that brought it (``source == "listener"``).
    calling_ae: str | None = None


def _row(r: sqlite3.Row | tuple[Any, ...]) -> OutboxRow:
    return OutboxRow(
        id=int(r[0]),
        sop_instance_uid=str(r[1]),
        study_instance_uid=str(r[2]),
        series_instance_uid=str(r[3]),
        sop_class_uid=str(r[4]),
        path=Path(r[5]),
        size=int(r[6]),
        state=str(r[7]),
        attempts=int(r[8]),
        next_attempt_at=float(r[9]),
        last_error=r[10],
        created_at=float(r[11]),
        sent_at=None if r[12] is None else float(r[12]),
        scanner=r[13],
        source=str(r[14]),
        calling_ae=r[15],
    )


def ids_param(ids: Sequence[int]) -> str:
    """A JSON array parameter for ``id in (select value from json_each(?))`` (no SQL building)."""
    return json.dumps([int(i) for i in ids])


class OutboxDB:
    """The outbox database (``db_path`` may be ``":memory:"`` for tests).

    Parameters
    ----------
    db_path
        SQLite file; created with mode 0600 (its WAL and SHM files inherit that mode).
    clock
        Wall-clock source for every timestamp (injected by tests).
    read_only
        Open an existing database for reading only (``status``): nothing is created or written.
    """

    def __init__(
        self,
        db_path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> None:
        self.db_path = Path(db_path) if str(db_path) != ":memory:" else None
        self._clock = clock
        self._lock = threading.RLock()
        self._conn = connect(self.db_path, read_only=read_only)
        if not read_only:
            with self._lock:
                self.initialize_schema()

    def initialize_schema(self) -> None:
        with self._tx() as c:
            for ddl in _SCHEMA:
                c.execute(ddl)
            columns = {r[1] for r in c.execute("pragma table_info(outbox)")}
            if "scanner" not in columns:  # a database from before the column
                c.execute("alter table outbox add column scanner text")
            if "source" not in columns:  # a database from before the C-STORE listener
                c.execute("alter table outbox add column source text not null default 'inbox'")
                c.execute("alter table outbox add column calling_ae text")

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … commit, or rollback and re-raise; holds the connection lock."""
        return transaction(self._conn, self._lock)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return query(self._conn, self._lock, sql, params)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def checkpoint(self) -> None:
        """Fold the WAL into the database file and truncate it."""
        if self.db_path is not None:
            self._query("pragma wal_checkpoint(TRUNCATE)")

    # -- rows in (intake) ---------------------------------------------------------------------
    def add(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_class_uid: str,
        path: Path,
        size: int,
        audit: dict[str, Any],
        scanner: str | None = None,
        source: str = "inbox",
        calling_ae: str | None = None,
    ) -> bool:
        """Insert a queued row, durable on return; False if the SOP UID was already there.

        ``source`` says where the instance came from (``"inbox"``, ``"listener"``) and
        ``calling_ae`` which scanner sent it over C-STORE; routing may match on them.
        """
        return self.add_many(
            [
                {
                    "sop_instance_uid": sop_instance_uid,
                    "study_instance_uid": study_instance_uid,
                    "series_instance_uid": series_instance_uid,
                    "sop_class_uid": sop_class_uid,
                    "path": path,
                    "size": size,
                    "audit": audit,
                    "scanner": scanner,
                    "source": source,
                    "calling_ae": calling_ae,
                }
            ]
        )[0]

    def add_many(self, items: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Insert queued rows in ONE transaction (a group commit: one WAL sync for the group).

        Each item holds the keyword arguments of :meth:`add` (``scanner`` optional). All or
        nothing: either every row is committed and durable on return, or (an exception) none is.
        Returns, per item, False if its SOP UID was already there (or earlier in ``items``).
        """
        params = []
        for item in items:
            uid = item["sop_instance_uid"]
            if not uid:
                raise ValueError('Argument "sop_instance_uid" must not be empty.')
            if int(item["size"]) < 0:
                raise ValueError('Argument "size" must be >= 0.')
            source = str(item.get("source") or "inbox")
            if source not in SOURCES:
                raise ValueError(f'Argument "source" must be one of {SOURCES}, not {source!r}.')
            params.append(
                (
                    uid,
                    item["study_instance_uid"],
                    item["series_instance_uid"],
                    item["sop_class_uid"],
                    str(item["path"]),
                    int(item["size"]),
                    json.dumps(item.get("audit") or {}, sort_keys=True, default=str),
                    item.get("scanner") or None,
                    source,
                    item.get("calling_ae"),
                )
            )
        if not params:
            return []
        now = self._clock()
        added: list[bool] = []
        with self._tx() as c:
            for p in params:
                cur = c.execute(
                    "insert or ignore into outbox (sop_instance_uid, study_instance_uid,"
                    " series_instance_uid, sop_class_uid, path, size, state, attempts,"
                    " next_attempt_at, created_at, audit, scanner, source, calling_ae)"
                    " values (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?)",
                    (*p[:6], now, now, *p[6:]),
                )
                added.append(cur.rowcount == 1)
        return added

    def get(self, sop_instance_uid: str) -> OutboxRow | None:
        rows = self._query(_SELECT_ROWS + " where sop_instance_uid = ?", (sop_instance_uid,))
        return _row(rows[0]) if rows else None

    def audit(self, row_id: int) -> dict[str, Any]:
        rows = self._query("select audit from outbox where id = ?", (row_id,))
        return dict(json.loads(rows[0][0])) if rows else {}

    # -- rows out (status, QC) ----------------------------------------------------------------
    def has_rows(self) -> bool:
        """True if the outbox holds any row (in any state)."""
        return bool(self._query("select exists (select 1 from outbox)")[0][0])

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state, n in self._query("select state, count(*) from outbox group by state"):
            out[str(state)] = int(n)
        return out

    def oldest_waiting_age(self) -> float | None:
        """Seconds since the oldest not-yet-sent, not-dead row was added (None: nothing waits)."""
        rows = self._query(
            "select min(created_at) from outbox where state in ('queued', 'sending')"
        )
        return None if rows[0][0] is None else max(0.0, self._clock() - float(rows[0][0]))

    def rows(self, state: str | None = None, limit: int = 1000) -> list[OutboxRow]:
        if state is not None and state not in STATES:
            raise ValueError(f'Argument "state" must be one of {STATES}, not {state!r}.')
        if state is None:
            q = self._query(_SELECT_ROWS + " order by id limit ?", (limit,))
        else:
            q = self._query(
                _SELECT_ROWS + " where state = ? order by id limit ?",
                (state, limit),
            )
        return [_row(r) for r in q]

    def rows_since(self, last_id: int, limit: int = 1000) -> list[OutboxRow]:
        q = self._query(_SELECT_ROWS + " where id > ? order by id limit ?", (last_id, limit))
        return [_row(r) for r in q]
