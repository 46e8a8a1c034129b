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

from ...logs import get_logger
from ._sqlite import connect, query, transaction

__all__ = ["JUMP_TOLERANCE_SECONDS", "SOURCES", "STATES", "OutboxDB", "OutboxRow"]

log = get_logger()

#: The wall clock is taken as set (a jump) when it moved this much more, or less, than the
#: monotonic clock between two readings.
JUMP_TOLERANCE_SECONDS = 2.0

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
    monotonic
        With a monotonic clock, the wall clock is watched: when it jumps (set by hand, or by NTP
        on a box that booted at an old date), the waiting rows' times (next attempt, lease,
        age) and the destination circuit's move with it, so a jump neither delays delivery by
        its size, nor expires every lease at once, nor makes rows too old (see :meth:`now`).
        None (the default): no watching.
    read_only
        Open an existing database for reading only (``status``): nothing is created or written.
    """

    def __init__(
        self,
        db_path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] | None = None,
        read_only: bool = False,
    ) -> None:
        self.db_path = Path(db_path) if str(db_path) != ":memory:" else None
        self._clock = clock
        self._monotonic = monotonic
        self._anchor: tuple[float, float] | None = None
        self._lock = threading.RLock()
        # Rows in ``sending`` whose instance arrived again meanwhile (a new version): their
        # outcome is not the new version's (see add_many, mark_sent). Rows in ``sending`` never
        # outlive the process (requeued at start-up), so memory is the right place.
        self._superseded: set[int] = set()
        self._conn = connect(self.db_path, read_only=read_only)
        self._first_id = 0
        if not read_only:
            with self._lock:
                self.initialize_schema()
            self._first_id = int(self._query("select coalesce(max(id), 0) from outbox")[0][0])

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

    # -- the wall clock -----------------------------------------------------------------------
    def now(self) -> float:
        """The wall clock, watched for jumps (see ``monotonic``): when it was set since the
        last reading, the stored times are moved by as much, in one transaction, before this
        returns. Every decision of the outbox reads the time this way."""
        with self._lock:
            now, jump = self._read_clock()
            if jump:
                with self._tx() as c:
                    self._shift(c, jump)
            return now

    def _now_tx(self, c: sqlite3.Connection) -> float:
        """:meth:`now` inside a transaction (the lock held): the shift joins that transaction."""
        now, jump = self._read_clock()
        if jump:
            self._shift(c, jump)
        return now

    def _read_clock(self) -> tuple[float, float]:
        """``(now, jump)``; the caller holds the lock."""
        now = self._clock()
        if self._monotonic is None:
            return now, 0.0
        mono = self._monotonic()
        jump = 0.0
        if self._anchor is not None:
            jump = now - (self._anchor[0] + (mono - self._anchor[1]))
            if abs(jump) <= JUMP_TOLERANCE_SECONDS:
                jump = 0.0
        self._anchor = (now, mono)
        return now, jump

    def _shift(self, c: sqlite3.Connection, jump: float) -> None:
        """Move what measures time still to come, or time waited, by ``jump`` seconds: the
        waiting rows' next attempt and lease, the age of those added since this outbox was
        opened, and the destination circuit's times."""
        c.execute(
            "update outbox set next_attempt_at = next_attempt_at + ?1,"
            " lease_until = lease_until + ?1,"
            " created_at = case when id > ?2 then created_at + ?1 else created_at end"
            " where state in ('queued', 'sending')",
            (jump, self._first_id),
        )
        c.execute(
            "update destination_state set"
            " blocked_until = case when blocked_until > 0 then blocked_until + ?1 else 0 end,"
            " probe_until = case when probe_until > 0 then probe_until + ?1 else 0 end,"
            " last_error_at = last_error_at + ?1, last_success_at = last_success_at + ?1"
            " where id = 1",
            (jump,),
        )
        log.warning("clock_jumped", seconds=round(jump, 1))

    def clamp_future(self, *, longest: float, cap: float) -> int:
        """At start-up: a next attempt (or a closed circuit) further away than ``longest``
        seconds can only come from a clock set back while the agent was down: it becomes
        ``cap`` seconds away. Returns the rows moved."""
        with self._tx() as c:
            now = self._now_tx(c)
            n = c.execute(
                "update outbox set next_attempt_at = ?1 where state = 'queued'"
                " and next_attempt_at > ?2",
                (now + cap, now + longest),
            ).rowcount
            c.execute(
                "update destination_state set blocked_until = min(blocked_until, ?1),"
                " probe_until = 0 where id = 1 and blocked_until > ?2",
                (now + cap, now + longest),
            )
        if n:
            log.warning("outbox_far_future_clamped", rows=n)
        return int(n)

    def aged_out(self, ids: Sequence[int], max_age: float) -> set[int]:
        """The rows among ``ids`` waiting for ``max_age`` seconds or more (by :meth:`now`)."""
        with self._lock:
            now = self.now()
            rows = self._query(
                "select id from outbox where id in (select value from json_each(?))"
                " and ? - created_at >= ?",
                (ids_param(ids), now, max_age),
            )
        return {int(r[0]) for r in rows}

    def integrity_problem(self) -> str | None:
        """SQLite's ``quick_check``: None when the database is sound, else its first finding."""
        rows = self._query("pragma quick_check(1)")
        first = str(rows[0][0]) if rows else "no answer"
        return None if first == "ok" else first[:200]

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
        added: list[bool] = []
        again: list[tuple[str, str]] = []
        with self._tx() as c:
            now = self._now_tx(c)
            for p in params:
                cur = c.execute(
                    "insert or ignore into outbox (sop_instance_uid, study_instance_uid,"
                    " series_instance_uid, sop_class_uid, path, size, state, attempts,"
                    " next_attempt_at, created_at, audit, scanner, source, calling_ae)"
                    " values (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?)",
                    (*p[:6], now, now, *p[6:]),
                )
                added.append(cur.rowcount == 1)
                if cur.rowcount != 1:
                    state = self._received_again(c, p, now)
                    if state is not None:
                        again.append((p[0], state))
        for uid, state in again:
            log.info("outbox_received_again", sop_instance_uid=uid, previous_state=state)
        return added

    def _received_again(self, c: sqlite3.Connection, p: tuple[Any, ...], now: float) -> str | None:
        """An instance already in the outbox arrived again (a corrected version, a resend by
        the modality, or the same file after a crash): its file was just rewritten under the
        row, so the row follows it. Delivered or dead, it is queued again (the destination is
        idempotent per SOP Instance UID; a new version must not stay unsent); being sent, its
        outcome will not count for the new version. Returns the previous state."""
        row = c.execute(
            "select id, state from outbox where sop_instance_uid = ?", (p[0],)
        ).fetchone()
        if row is None:
            return None
        row_id, state = int(row[0]), str(row[1])
        if state in ("sent", "dead"):
            c.execute(
                "update outbox set state = 'queued', attempts = 0, next_attempt_at = ?,"
                " created_at = ?, sent_at = null, lease_until = null, last_error = null,"
                " file_gone = 0, size = ?, audit = ? where id = ?",
                (now, now, p[5], p[6], row_id),
            )
        else:
            c.execute(
                "update outbox set size = ?, audit = ?, file_gone = 0 where id = ?",
                (p[5], p[6], row_id),
            )
            if state == "sending":
                self._superseded.add(row_id)
        return state

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
        if rows[0][0] is None:
            return None
        return max(0.0, self.now() - float(rows[0][0]))

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
