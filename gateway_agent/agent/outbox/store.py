"""The durable SQLite outbox: a row per de-identified instance, its retries, the upload circuit.

States (see design.md)::

    queued ──claim──▶ sending ──ack──▶ sent ──retention──▶ (file removed, row kept)
       ▲                 │
       └── retriable ────┤
                         └── permanent / attempts or age exhausted ──▶ dead ── retry_dead ──▶ queued

Plumbing in the style of huey's ``BaseSqlStorage``: the schema as ``create table if not exists``
strings, one connection guarded by a lock in autocommit mode, WAL, ``synchronous=FULL`` and a busy
timeout set explicitly, and one ``_tx()`` context manager (``BEGIN IMMEDIATE``/commit/rollback).
Unlike huey, delivery is at-least-once: a claim only leases a row (``sending``); the row becomes
``sent`` after the destination acknowledged it, and leases left by a crash are requeued.

The ``destination_state`` table holds the destination-level circuit (consecutive failures,
``blocked_until``), so an outage is detected once and probed by one worker at a time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from ...logs import get_logger
from ._sqlite import connect, query, transaction

__all__ = ["STATES", "Outbox", "OutboxRow", "row_from_file"]

log = get_logger()

STATES = ("queued", "sending", "sent", "dead")

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
        audit text not null default '{}'
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
    " size, state, attempts, next_attempt_at, last_error, created_at, sent_at from outbox"
)

_IGNORED_SUFFIXES = (".tmp", ".partial", ".part")


def row_from_file(path: Path, audit: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Outbox.add`` for a part-10 file, from its header alone.

    Raises pydicom's ``InvalidDicomError``, ``AttributeError`` (a UID missing), ``OSError``.
    """
    from pydicom import dcmread  # only reconcile (and tests, benchmarks) read headers this way

    ds = dcmread(path, stop_before_pixels=True)
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "path": path,
        "size": path.stat().st_size,
        "audit": audit,
    }


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
    )


def _ids(ids: Sequence[int]) -> str:
    """A JSON array parameter for ``id in (select value from json_each(?))`` (no SQL building)."""
    return json.dumps([int(i) for i in ids])


class Outbox:
    """The outbox database (``db_path`` may be ``":memory:"`` for tests).

    Parameters
    ----------
    db_path
        SQLite file; created with mode 0600 (its WAL and SHM files inherit that mode).
    clock
        Wall-clock source for every timestamp (injected by tests).
    """

    def __init__(self, db_path: Path | str, *, clock: Callable[[], float] = time.time) -> None:
        self.db_path = Path(db_path) if str(db_path) != ":memory:" else None
        self._clock = clock
        self._lock = threading.RLock()
        self._conn = connect(self.db_path)
        self.db = sqlite_utils.Database(self._conn)
        with self._lock:
            self.initialize_schema()

    # -- plumbing ----------------------------------------------------------------------------
    def initialize_schema(self) -> None:
        with self._tx() as c:
            for ddl in _SCHEMA:
                c.execute(ddl)

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

    # -- intake side -------------------------------------------------------------------------
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
    ) -> bool:
        """Insert a queued row, durable on return; False if the SOP UID was already there."""
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
                }
            ]
        )[0]

    def add_many(self, items: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Insert queued rows in ONE transaction (a group commit: one WAL sync for the group).

        Each item holds the keyword arguments of :meth:`add`. All or nothing: either every row
        is committed and durable on return, or (an exception) none is. Returns, per item, False
        if its SOP UID was already there (or earlier in ``items``).
        """
        params = []
        for item in items:
            uid = item["sop_instance_uid"]
            if not uid:
                raise ValueError('Argument "sop_instance_uid" must not be empty.')
            if int(item["size"]) < 0:
                raise ValueError('Argument "size" must be >= 0.')
            params.append(
                (
                    uid,
                    item["study_instance_uid"],
                    item["series_instance_uid"],
                    item["sop_class_uid"],
                    str(item["path"]),
                    int(item["size"]),
                    json.dumps(item.get("audit") or {}, sort_keys=True, default=str),
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
                    " next_attempt_at, created_at, audit)"
                    " values (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?)",
                    (*p[:6], now, now, p[6]),
                )
                added.append(cur.rowcount == 1)
        return added

    def get(self, sop_instance_uid: str) -> OutboxRow | None:
        rows = self._query(_SELECT_ROWS + " where sop_instance_uid = ?", (sop_instance_uid,))
        return _row(rows[0]) if rows else None

    def audit(self, row_id: int) -> dict[str, Any]:
        rows = self._query("select audit from outbox where id = ?", (row_id,))
        return dict(json.loads(rows[0][0])) if rows else {}

    # -- uploader side -----------------------------------------------------------------------
    def claim(self, *, max_items: int, max_bytes: int, lease_seconds: float) -> list[OutboxRow]:
        """Lease due rows (queued and due, or ``sending`` with an expired lease) in one transaction.

        At least one row is returned when one is due, even if it alone exceeds ``max_bytes``.
        ``attempts`` is counted here.
        """
        if max_items < 1:
            raise ValueError('Argument "max_items" must be >= 1.')
        now = self._clock()
        with self._tx() as c:
            candidates = c.execute(
                "select id, size from outbox where state = 'queued' and next_attempt_at <= ?"
                " union all"
                " select id, size from outbox where state = 'sending' and lease_until < ?"
                " order by id limit ?",
                (now, now, max_items),
            ).fetchall()
            ids: list[int] = []
            total = 0
            for row_id, size in candidates:
                if ids and total + size > max_bytes:
                    break
                ids.append(int(row_id))
                total += int(size)
            if not ids:
                return []
            c.execute(
                "update outbox set state = 'sending', attempts = attempts + 1, lease_until = ?"
                " where id in (select value from json_each(?))",
                (now + lease_seconds, json.dumps(ids)),
            )
            rows = c.execute(
                _SELECT_ROWS + _WHERE_IDS,
                (json.dumps(ids),),
            ).fetchall()
        return [_row(r) for r in rows]

    def mark_sent(self, ids: Sequence[int]) -> None:
        """The destination acknowledged these rows (whatever their state now: the ack is a fact)."""
        now = self._clock()
        with self._tx() as c:
            c.execute("update destination_state set last_success_at = ? where id = 1", (now,))
            c.execute(
                "update outbox set state = 'sent', sent_at = ?, lease_until = null,"
                " last_error = null where id in (select value from json_each(?))",
                (now, _ids(ids)),
            )

    def mark_retry(
        self, ids: Sequence[int], *, error: str, delay: float, refund_attempt: bool = False
    ) -> None:
        """Back to ``queued``, due in ``delay`` seconds (attempts were counted at claim).

        ``refund_attempt`` gives the attempt back: used while the destination is known to be down,
        so an outage does not burn every row's attempts.
        """
        due = self._clock() + max(0.0, delay)
        refund = 1 if refund_attempt else 0
        with self._tx() as c:
            c.execute(
                "update outbox set state = 'queued', next_attempt_at = ?, lease_until = null,"
                " last_error = ?, attempts = max(0, attempts - ?)"
                " where state = 'sending' and id in (select value from json_each(?))",
                (due, error[:500], refund, _ids(ids)),
            )

    def mark_dead(self, ids: Sequence[int], *, error: str) -> None:
        with self._tx() as c:
            c.execute(
                "update outbox set state = 'dead', lease_until = null, last_error = ?"
                " where state != 'sent' and id in (select value from json_each(?))",
                (error[:500], _ids(ids)),
            )

    def release(self, ids: Sequence[int]) -> None:
        """``sending`` → ``queued`` without penalty (shutdown before the request was made)."""
        with self._tx() as c:
            c.execute(
                "update outbox set state = 'queued', lease_until = null,"
                " attempts = max(0, attempts - 1)"
                " where state = 'sending' and id in (select value from json_each(?))",
                (_ids(ids),),
            )

    def requeue_stale(self) -> int:
        """At start-up: every ``sending`` row (left by a crash) goes back to ``queued``, due now."""
        now = self._clock()
        with self._tx() as c:
            cur = c.execute(
                "update outbox set state = 'queued', lease_until = null, next_attempt_at = ?"
                " where state = 'sending'",
                (now,),
            )
            n = cur.rowcount
        if n:
            log.info("outbox_requeued_stale", rows=n)
        return n

    def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """``dead`` → ``queued`` (all, or these ids) with attempts reset and due now."""
        now = self._clock()
        selected = None if ids is None else _ids(ids)
        with self._tx() as c:
            cur = c.execute(
                "update outbox set state = 'queued', attempts = 0, next_attempt_at = ?1,"
                " created_at = ?1, last_error = null where state = 'dead'"
                " and (?2 is null or id in (select value from json_each(?2)))",
                (now, selected),
            )
            return int(cur.rowcount)

    def retry_now(self) -> int:
        """Make every waiting row due now and close the circuit (after fixing credentials/URL)."""
        now = self._clock()
        with self._tx() as c:
            n = c.execute(
                "update outbox set next_attempt_at = ?"
                " where state = 'queued' and next_attempt_at > ?",
                (now, now),
            ).rowcount
            c.execute(
                "update destination_state set blocked_until = 0, probe_until = 0 where id = 1"
            )
        return int(n)

    def due_summary(self, limit: int) -> tuple[int, int]:
        """``(rows, bytes)`` of the first ``limit`` queued rows due now (a read, no write)."""
        rows = self._query(
            "select count(*), coalesce(sum(size), 0) from (select size from outbox"
            " where state = 'queued' and next_attempt_at <= ? order by id limit ?)",
            (self._clock(), int(limit)),
        )
        return int(rows[0][0]), int(rows[0][1])

    def next_due_at(self) -> float | None:
        """When the earliest queued row becomes due (None: nothing queued)."""
        rows = self._query("select min(next_attempt_at) from outbox where state = 'queued'")
        return None if rows[0][0] is None else float(rows[0][0])

    # -- destination circuit -----------------------------------------------------------------
    def circuit_acquire(self, probe_lease: float) -> tuple[float, bool]:
        """May a worker send now? Returns ``(wait_seconds, probing)``.

        While the destination is healthy everyone may send (``(0, False)``, a read without a
        write). After a failure, the first worker past ``blocked_until`` becomes the single probe
        (``(0, True)``) for up to ``probe_lease`` seconds; everybody else waits.
        """
        now = self._clock()
        failures, blocked_until = self._query(
            "select consecutive_failures, blocked_until from destination_state where id = 1"
        )[0]
        if failures == 0 and blocked_until <= now:
            return 0.0, False
        with self._tx() as c:
            failures, blocked_until, probe_until = c.execute(
                "select consecutive_failures, blocked_until, probe_until"
                " from destination_state where id = 1"
            ).fetchone()
            if failures == 0 and blocked_until <= now:
                return 0.0, False
            wait_until = max(float(blocked_until), float(probe_until))
            if wait_until > now:
                return wait_until - now, False
            c.execute(
                "update destination_state set probe_until = ? where id = 1", (now + probe_lease,)
            )
            return 0.0, True

    def circuit_release_probe(self) -> None:
        """The probe found nothing to send: let the next worker probe at once."""
        with self._tx() as c:
            c.execute("update destination_state set probe_until = 0 where id = 1")

    def circuit_failure(
        self,
        error: str,
        *,
        delay: float,
        started_at: float,
        auth: bool = False,
        probing: bool = False,
    ) -> bool:
        """Record a destination-level failure; block sending for ``delay`` seconds.

        Returns True if the outage was already known (the circuit was open, or another request
        recorded the failure while this one was in flight): the caller then refunds the rows'
        attempts, so an outage burns attempts once, not per request.
        """
        now = self._clock()
        with self._tx() as c:
            failures, last_error_at = c.execute(
                "select consecutive_failures, last_error_at from destination_state where id = 1"
            ).fetchone()
            concurrent = failures > 0 and (last_error_at or 0) >= started_at
            c.execute(
                "update destination_state set consecutive_failures = consecutive_failures + ?,"
                " blocked_until = max(blocked_until, ?), last_error = ?, last_error_at = ?,"
                " auth_failing = ?, probe_until = case when ? then 0 else probe_until end"
                " where id = 1",
                (0 if concurrent else 1, now + delay, error[:500], now, int(auth), int(probing)),
            )
            return bool(failures > 0)

    def circuit_success(self) -> bool:
        """The destination answered. Returns True if that closed an open circuit."""
        now = self._clock()
        failures, auth = self._query(
            "select consecutive_failures, auth_failing from destination_state where id = 1"
        )[0]
        if not (failures or auth):
            return False  # healthy already: no write (mark_sent records last_success_at)
        with self._tx() as c:
            c.execute(
                "update destination_state set consecutive_failures = 0, blocked_until = 0,"
                " probe_until = 0, last_success_at = ?, auth_failing = 0 where id = 1",
                (now,),
            )
        return bool(failures or auth)

    def consecutive_failures(self) -> int:
        return int(
            self._query("select consecutive_failures from destination_state where id = 1")[0][0]
        )

    def destination_status(self) -> dict[str, Any]:
        """``last_error``, ``last_error_at``, ``last_success_at``, ``consecutive_failures``,
        ``blocked_until`` and ``auth_failing`` of the (single) destination."""
        r = self._query(
            "select last_error, last_error_at, last_success_at, consecutive_failures,"
            " blocked_until, auth_failing from destination_state where id = 1"
        )[0]
        return {
            "last_error": r[0],
            "last_error_at": r[1],
            "last_success_at": r[2],
            "consecutive_failures": int(r[3]),
            "blocked_until": float(r[4]) if r[4] else None,
            "auth_failing": bool(r[5]),
        }

    # -- status, QC, maintenance -------------------------------------------------------------
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

    def purge_sent_files(self, older_than_seconds: float) -> int:
        """Retention: unlink files of rows sent over ``older_than_seconds`` ago; keep the rows."""
        cutoff = self._clock() - older_than_seconds
        victims = self._query(
            "select id, path from outbox where state = 'sent' and file_gone = 0 and sent_at <= ?",
            (cutoff,),
        )
        for _, path in victims:
            Path(path).unlink(missing_ok=True)
        ids = [int(v[0]) for v in victims]
        with self._tx() as c:
            c.execute(
                "update outbox set file_gone = 1 where id in (select value from json_each(?))",
                (_ids(ids),),
            )
        return len(ids)

    def compact(self, older_than_seconds: float) -> int:
        """Audit retention: delete sent rows whose files are gone, sent over the age ago.

        This bounds the database (SQLite reuses the freed pages). The newest row is never
        deleted, so row ids keep growing and ``rows_since`` readers (the QC job) stay correct.
        """
        cutoff = self._clock() - older_than_seconds
        with self._tx() as c:
            cur = c.execute(
                "delete from outbox where state = 'sent' and file_gone = 1 and sent_at <= ?"
                " and id < (select max(id) from outbox)",
                (cutoff,),
            )
            return int(cur.rowcount)

    def add_file(self, path: Path, *, audit: dict[str, Any]) -> bool:
        """``add`` a de-identified file, its UIDs read from its header (see ``row_from_file``)."""
        return self.add(**row_from_file(path, audit))

    def reconcile(self, files_dir: Path) -> dict[str, int]:
        """Start-up check between ``files_dir`` and the rows.

        * a ``*.dcm`` file without a row is re-added from its header (``added``), or counted as
          ``unreadable`` and left in place;
        * a queued/sending row whose file is missing goes to ``dead`` with ``file_missing``
          (``missing``).
        Hidden and temporary files (``.*``, ``*.tmp``, ``*.partial``) are counted as ``temp``.
        """
        from pydicom.errors import InvalidDicomError

        result = {"added": 0, "missing": 0, "unreadable": 0, "temp": 0}
        known = {os.path.realpath(p) for (p,) in self._query("select path from outbox")}
        if files_dir.is_dir():
            for dirpath, _dirs, names in os.walk(files_dir):
                for name in names:
                    path = Path(dirpath) / name
                    if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
                        result["temp"] += 1
                        continue
                    if os.path.realpath(path) in known or not path.is_file():
                        continue
                    try:
                        added = self.add_file(path, audit={"reconciled": True})
                    except (InvalidDicomError, AttributeError, OSError, ValueError):
                        result["unreadable"] += 1
                        continue
                    if added:
                        result["added"] += 1
        waiting = self._query(
            "select id, path from outbox where state in ('queued', 'sending') and file_gone = 0"
        )
        missing = [int(i) for i, p in waiting if not Path(p).exists()]
        with self._tx() as c:
            c.execute(
                "update outbox set state = 'dead', last_error = 'file_missing',"
                " lease_until = null where id in (select value from json_each(?))",
                (_ids(missing),),
            )
        result["missing"] = len(missing)
        if any(result.values()):
            log.info("outbox_reconciled", **result)
        return result
