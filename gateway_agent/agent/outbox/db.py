"""The outbox database: the one connection, rows in (intake, routed) and rows out (reads).

Plumbing in the style of huey's ``BaseSqlStorage``: the schema as ``create table if not exists``
strings (:mod:`.schema`, which also upgrades older outboxes), one connection guarded by a lock in
autocommit mode, WAL, ``synchronous=FULL`` and a busy timeout set explicitly, and one ``_tx()``
context manager (``BEGIN IMMEDIATE``/commit/rollback). :class:`OutboxDB` is the base the outbox's
other parts (``upkeep``; ``delivery`` and ``circuit`` per destination) build on;
:class:`~gateway_agent.agent.outbox.store.Outbox` joins them.

An instance is a row of ``instances``; each destination it goes to (its :mod:`.routing`, decided
when the row is added) has a row in ``deliveries`` with that delivery's state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._exceptions import GatewayError
from ...logs import get_logger
from ._sqlite import connect, query, transaction
from .routing import DEFAULT_ROUTES, Route
from .schema import (
    SCHEMA_VERSION,
    OutboxSchemaError,
    has_counts,
    lacks_columns,
    prepare,
    schema_version,
)

__all__ = [
    "AWAITING_PROOF",
    "JUMP_TOLERANCE_SECONDS",
    "SOURCES",
    "STATES",
    "DestinationView",
    "OutboxClosedError",
    "OutboxDB",
    "OutboxRow",
]

log = get_logger()

#: The wall clock is taken as set (a jump) when it moved this much more, or less, than the
#: monotonic clock between two readings.
JUMP_TOLERANCE_SECONDS = 2.0

STATES = ("queued", "sending", "sent", "dead")
#: Where an instance came from: the watched inbox, or the C-STORE listener.
SOURCES = ("inbox", "listener")

#: Sent deliveries whose storage the destination has yet to prove (``confirmed`` NULL), their
#: instance's file kept; ``d`` is the delivery, ``i`` its instance.
AWAITING_PROOF = "d.state = 'sent' and d.confirmed is null and i.file_gone = 0"

_WHERE_IDS = " where id in (select value from json_each(?)) order by id"
#: One delivery (an instance at one destination), in the column order :func:`_row` reads.
_SELECT_ROWS = (
    "select i.id, i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid,"
    " i.sop_class_uid, i.path, i.size, d.state, d.attempts, d.next_attempt_at, d.last_error,"
    " d.created_at, d.sent_at, d.destination, i.modality, i.source, i.inbox_folder, i.calling_ae,"
    " i.scanner from deliveries d join instances i on i.id = d.instance_id"
)
#: One instance, its state summed up over its deliveries (see :meth:`OutboxDB.rows_since`).
_SELECT_INSTANCES = (
    "select i.id, i.sop_instance_uid, i.study_instance_uid, i.series_instance_uid,"
    " i.sop_class_uid, i.path, i.size,"
    " coalesce((select case"
    "   when sum(d.state = 'sending') then 'sending' when sum(d.state = 'queued') then 'queued'"
    "   when sum(d.state = 'dead') then 'dead' else 'sent' end"
    "   from deliveries d where d.instance_id = i.id), 'sent'),"
    " coalesce((select max(d.attempts) from deliveries d where d.instance_id = i.id), 0),"
    " 0, null, i.created_at,"
    " (select max(d.sent_at) from deliveries d where d.instance_id = i.id), null,"
    " i.modality, i.source, i.inbox_folder, i.calling_ae, i.scanner from instances i"
)


@dataclass(frozen=True)
class OutboxRow:
    """One de-identified instance and its delivery to one destination.

    ``state``, ``attempts``, ``next_attempt_at``, ``last_error`` and ``sent_at`` are the
    delivery's. Rows read per instance (``destination`` None, from :meth:`OutboxDB.rows_since`)
    sum up its deliveries: ``sending`` or ``queued`` while any waits, else ``dead`` if any is
    dead, else ``sent``.
    """

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
    #: When the instance was added; for a delivery, when it was queued (or queued again by
    #: ``retry``): its age counts from then.
    created_at: float
    sent_at: float | None
    #: The destination of this delivery (None: the instance across its deliveries).
    destination: str | None = None
    #: The output's Modality ("" when absent or not recorded).
    modality: str = ""
    #: ``"inbox"`` or ``"listener"`` (received over C-STORE).
    source: str = "inbox"
    #: The inbox sub-folder it came from, recorded only when a routing rule names that folder.
    inbox_folder: str | None = None
    #: The calling AE title of the association that brought it (``source == "listener"``).
    calling_ae: str | None = None
    #: The keyed scanner pseudonym of the instance (None for rows written before it was kept).
    scanner: str | None = None


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
        destination=r[13],
        modality=str(r[14] or ""),
        source=str(r[15] or "inbox"),
        inbox_folder=r[16],
        calling_ae=r[17],
        scanner=r[18],
    )


#: The destinations that have deliveries: one index seek per destination (the primary key leads
#: with it), not a read of every delivery.
_DELIVERY_DESTINATIONS = (
    "with recursive known (name) as ("
    " select min(destination) from deliveries union all"
    " select (select min(destination) from deliveries where destination > known.name)"
    " from known where known.name is not null)"
    " select name from known where name is not null"
)
#: One destination's deliveries by state, as the triggers keep them (a few rows).
_COUNTS = "select state, deliveries from delivery_counts where destination = ?"
#: The same counted from the rows (a read-only open of an outbox of an earlier build).
_COUNTS_OF_ROWS = "select state, count(*) from deliveries where destination = ? group by state"
#: One destination's sent deliveries whose files are kept, by proof (``{proof}``: ``is null``
#: pending, ``= 0`` unproven): ``count``, ``bytes``, from the ``deliveries_kept`` index.
_KEPT = (
    "select count(*), coalesce(sum(i.size), 0) from deliveries d"
    " join instances i on i.id = d.instance_id"
    " where d.destination = ? and d.state = 'sent' and d.confirmed {proof} and i.file_gone = 0"
)
#: When the oldest delivery still waiting at one destination was queued: queued or sending (one
#: seek in ``deliveries_waiting``, whose condition this one is, word for word), or sent with its
#: proof pending (``+``: read through ``deliveries_kept``, the few pending entries, rather than
#: every sent delivery in the order it was queued).
_OLDEST = (
    "select (select min(created_at) from deliveries"  # noqa: S608 (constants)
    " where destination = ?1 and state in ('queued', 'sending')),"
    " (select min(+d.created_at) from deliveries d join instances i on i.id = d.instance_id"
    " where d.destination = ?1 and " + AWAITING_PROOF + ")"
)


class OutboxClosedError(GatewayError):
    """The outbox was closed (the agent stopped): a thread that outlived the stop (a request
    still running at its deadline) meets this on its next read or write, and ends."""


def ids_param(ids: Sequence[int]) -> str:
    """A JSON array parameter for ``id in (select value from json_each(?))`` (no SQL building)."""
    return json.dumps([int(i) for i in ids])


class OutboxDB:
    """The outbox database (``db_path`` may be ``":memory:"`` for tests).

    Parameters
    ----------
    db_path
        SQLite file; created with mode 0600 (its WAL and SHM files inherit that mode). An outbox
        written by an earlier version is upgraded in place (see :mod:`.schema`).
    clock
        Wall-clock source for every timestamp (injected by tests).
    routes
        The destinations and what each receives, in configuration order (default: one
        destination named ``default`` taking everything). A version-1 outbox's rows go to the
        route named ``default``, else to the first. None (operator commands): the destinations
        the outbox already knows, and nothing can be added.
    upgrade
        Upgrade an outbox written by an earlier version (the daemon); False refuses it with an
        :class:`OutboxSchemaError` instead (operator commands, which may run beside an older
        agent).

    Raises
    ------
    OutboxSchemaError
        The database was written by a newer version, or upgrading it failed (it is unchanged).
    monotonic
        With a monotonic clock, the wall clock is watched: when it jumps (set by hand, or by NTP
        on a box that booted at an old date), the waiting rows' times (next attempt, lease,
        age) and the destination circuit's move with it, so a jump neither delays delivery by
        its size, nor expires every lease at once, nor makes rows too old (see :meth:`now`).
        None (the default): no watching.
    read_only
        Open an existing database for reading only (``status``): nothing is created, written or
        upgraded (an older schema is refused like with ``upgrade=False``).
    """

    def __init__(
        self,
        db_path: Path | str,
        *,
        clock: Callable[[], float] = time.time,
        routes: Sequence[Route] | None = DEFAULT_ROUTES,
        upgrade: bool = True,
        monotonic: Callable[[], float] | None = None,
        read_only: bool = False,
    ) -> None:
        if routes is not None and not routes:
            raise ValueError('Argument "routes" must name at least one destination.')
        self._configured = routes is not None
        self.db_path = Path(db_path) if str(db_path) != ":memory:" else None
        self._clock = clock
        self._monotonic = monotonic
        self._anchor: tuple[float, float] | None = None
        # When this outbox was opened, by the wall clock (moved with it, see ``_shift``).
        self._opened_at = clock()
        self._lock = threading.RLock()
        self.routes = tuple(routes or ())
        self._folders = frozenset().union(*(r.names_folders for r in self.routes))
        self._upgrade = upgrade and not read_only
        self.read_only = read_only
        # Deliveries ``(destination, instance id)`` in ``sending`` whose instance arrived again
        # meanwhile (a new version): their outcome is not the new version's (see add_many,
        # mark_sent). Deliveries in ``sending`` never outlive the process (requeued at
        # start-up), so memory is the right place.
        self._superseded: set[tuple[str, int]] = set()
        self._conn = connect(self.db_path, read_only=read_only)
        self._first_id = 0
        self._counted = False
        #: True once :meth:`close` ran.
        self.closed = False
        try:
            with self._lock:
                if read_only:
                    self._check_readable()
                else:
                    self.initialize_schema()
            self._first_id = int(self._query("select coalesce(max(id), 0) from instances")[0][0])
            self._counted = has_counts(self._conn)
        except BaseException:
            self._conn.close()
            raise

    def initialize_schema(self) -> None:
        """Create the schema, or upgrade an older one (see :func:`.schema.prepare`)."""
        names = [r.name for r in self.routes]
        heir = "default" if "default" in names or not names else names[0]
        prepare(self._conn, destination=heir, upgrade=self._upgrade)
        with self._tx() as c:
            c.executemany(
                "insert or ignore into destinations (name) values (?)", [(n,) for n in names]
            )

    def _check_readable(self) -> None:
        """A read-only open: the schema must be this version's (nothing is created)."""
        found = schema_version(self._conn)
        if found != SCHEMA_VERSION:
            prepare(self._conn, destination="default", upgrade=False)
        elif lacks_columns(self._conn):
            raise OutboxSchemaError(
                "the outbox database was written by an earlier build of this version (its "
                "deliveries have no proof of storage yet); the agent adds it when it starts: "
                "restart it (systemctl restart gateway-agent), then try again"
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … commit, or rollback and re-raise; holds the connection lock.

        Raises :class:`OutboxClosedError` once the outbox is closed."""
        with self._lock:
            self._check_open()
            with transaction(self._conn, self._lock) as c:
                yield c

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            self._check_open()
            return query(self._conn, self._lock, sql, params)

    def _check_open(self) -> None:
        if self.closed:
            raise OutboxClosedError("the outbox is closed (the agent stopped)")

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
        opened, when the deliveries sent since it was opened were sent (retention counts from
        then), and the destination circuit's times."""
        c.execute(
            "update deliveries set next_attempt_at = next_attempt_at + ?1,"
            " lease_until = lease_until + ?1,"
            " created_at = case when instance_id > ?2 then created_at + ?1 else created_at end"
            " where state in ('queued', 'sending')",
            (jump, self._first_id),
        )
        c.execute(
            "update instances set created_at = created_at + ?1 where id > ?2"
            " and exists (select 1 from deliveries d where d.instance_id = instances.id"
            " and d.state in ('queued', 'sending'))",
            (jump, self._first_id),
        )
        c.execute(
            "update deliveries set sent_at = sent_at + ?1 where state = 'sent' and sent_at >= ?2",
            (jump, self._opened_at),
        )
        self._opened_at += jump
        c.execute(
            "update destinations set"
            " blocked_until = case when blocked_until > 0 then blocked_until + ?1 else 0 end,"
            " probe_until = case when probe_until > 0 then probe_until + ?1 else 0 end,"
            " last_error_at = last_error_at + ?1, last_success_at = last_success_at + ?1",
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
                "update deliveries set next_attempt_at = ?1 where state = 'queued'"
                " and next_attempt_at > ?2",
                (now + cap, now + longest),
            ).rowcount
            c.execute(
                "update destinations set blocked_until = min(blocked_until, ?1),"
                " probe_until = 0 where blocked_until > ?2",
                (now + cap, now + longest),
            )
        if n:
            log.warning("outbox_far_future_clamped", rows=n)
        return int(n)

    def aged_out(
        self, ids: Sequence[int], max_age: float, *, destination: str | None = None
    ) -> set[int]:
        """The instances among ``ids`` whose delivery (to ``destination``, or to any) has
        waited for ``max_age`` seconds or more (by :meth:`now`)."""
        with self._lock:
            now = self.now()
            rows = self._query(
                "select distinct instance_id from deliveries"
                " where instance_id in (select value from json_each(?1))"
                " and (?2 is null or destination = ?2) and ?3 - created_at >= ?4",
                (ids_param(ids), destination, now, max_age),
            )
        return {int(r[0]) for r in rows}

    def integrity_problem(self) -> str | None:
        """SQLite's ``quick_check``: None when the database is sound, else its first finding."""
        rows = self._query("pragma quick_check(1)")
        first = str(rows[0][0]) if rows else "no answer"
        return None if first == "ok" else first[:200]

    def close(self) -> None:
        """Close the database: every later read or write raises :class:`OutboxClosedError`."""
        with self._lock:
            self.closed = True
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
        modality: str = "",
        source: str = "inbox",
        inbox_folder: str | None = None,
        calling_ae: str | None = None,
        scanner: str | None = None,
    ) -> bool:
        """Insert an instance and its deliveries, durable on return; False if the SOP UID was
        already there.

        ``modality`` (the output's), ``source`` (``"inbox"`` or ``"listener"``), ``inbox_folder``
        (the sub-folder of the inbox it was dropped into, ``""`` for the inbox itself) and
        ``calling_ae`` (the scanner that sent it over C-STORE) decide where it goes (its
        routes). The folder is recorded only when a route names it: a folder name may be a
        patient's. ``scanner`` is the keyed scanner pseudonym (QC groups by it).
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
                    "modality": modality,
                    "source": source,
                    "inbox_folder": inbox_folder,
                    "calling_ae": calling_ae,
                    "scanner": scanner,
                }
            ]
        )[0]

    def add_many(self, items: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Insert instances and their deliveries in ONE transaction (a group commit: one WAL sync
        for the group).

        Each item holds the keyword arguments of :meth:`add` (the routing ones and ``scanner``
        optional). All or
        nothing: either every row is committed and durable on return, or (an exception) none is.
        Returns, per item, False if its SOP UID was already there (or earlier in ``items``). An
        instance no route matches is kept without deliveries (``unrouted``) and logged.
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
            folder = item.get("inbox_folder")
            attrs = {
                "modality": str(item.get("modality") or ""),
                "sop_class_uid": str(item["sop_class_uid"]),
                "inbox_folder": folder if source == "inbox" else None,
                "calling_ae": item.get("calling_ae"),
            }
            targets = [r.name for r in self.routes if r.matches(attrs)]
            params.append(
                (
                    (
                        uid,
                        item["study_instance_uid"],
                        item["series_instance_uid"],
                        item["sop_class_uid"],
                        attrs["modality"],
                        source,
                        folder if folder in self._folders else None,
                        attrs["calling_ae"],
                        item.get("scanner") or None,
                        str(item["path"]),
                        int(item["size"]),
                        json.dumps(item.get("audit") or {}, sort_keys=True, default=str),
                    ),
                    targets,
                )
            )
        if not params:
            return []
        added: list[bool] = []
        unrouted: list[str] = []
        again: list[tuple[str, str]] = []
        with self._tx() as c:
            now = self._now_tx(c)
            for values, targets in params:
                cur = c.execute(
                    "insert or ignore into instances (sop_instance_uid, study_instance_uid,"
                    " series_instance_uid, sop_class_uid, modality, source, inbox_folder,"
                    " calling_ae, scanner, path, size, audit, created_at)"
                    " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, now),
                )
                new = cur.rowcount == 1
                added.append(new)
                if not new:
                    state = self._received_again(c, values, targets, now)
                    if state is not None:
                        again.append((values[0], state))
                    continue
                instance_id = cur.lastrowid
                c.executemany(
                    "insert into deliveries (instance_id, destination, next_attempt_at, created_at)"
                    " values (?, ?, ?, ?)",
                    [(instance_id, name, now, now) for name in targets],
                )
                if not targets:
                    unrouted.append(values[0])
        if unrouted:
            log.warning("instance_unrouted", rows=len(unrouted), sop_uids=unrouted[:5])
        for uid, state in again:
            log.info("outbox_received_again", sop_instance_uid=uid, previous_state=state)
        return added

    def _received_again(
        self, c: sqlite3.Connection, values: tuple[Any, ...], targets: list[str], now: float
    ) -> str | None:
        """An instance already in the outbox arrived again (a corrected version, a resend by
        the modality, or the same file after a crash): its file was just rewritten under the
        row (where the row says), so the row follows it: its header, where it came from and its
        scanner become the new version's, and so does its routing. Each delivery the new
        version goes to that was delivered or dead is queued again (a destination is idempotent
        per SOP Instance UID; a new version must not stay unsent), a destination it goes to
        newly gets a delivery, and one being sent will not count its outcome for the new
        version. A configured destination whose rule does not match the new version loses its
        delivery still waiting or dead (it was for the previous version); one that was sent the
        previous version keeps that record. Returns the instance's previous state (summed up
        over its deliveries).
        """
        row = c.execute(
            "select id from instances where sop_instance_uid = ?", (values[0],)
        ).fetchone()
        if row is None:
            return None
        instance_id = int(row[0])
        deliveries = c.execute(
            "select destination, state from deliveries where instance_id = ?", (instance_id,)
        ).fetchall()
        states = {str(s) for _, s in deliveries}
        previous = next((s for s in ("sending", "queued", "dead") if s in states), "sent")
        c.execute(
            "update instances set study_instance_uid = ?, series_instance_uid = ?,"
            " sop_class_uid = ?, modality = ?, source = ?, inbox_folder = ?, calling_ae = ?,"
            " scanner = ?, size = ?, audit = ?, file_gone = 0 where id = ?",
            (*values[1:9], *values[10:], instance_id),
        )
        configured = {r.name for r in self.routes}
        elsewhere = [
            str(name)
            for name, state in deliveries
            if name in configured and name not in targets and state in ("queued", "dead")
        ]
        c.executemany(
            "delete from deliveries where instance_id = ? and destination = ?",
            [(instance_id, name) for name in elsewhere],
        )
        c.executemany(
            "insert or ignore into deliveries (instance_id, destination, next_attempt_at,"
            " created_at) values (?, ?, ?, ?)",
            [(instance_id, name, now, now) for name in targets],
        )
        c.execute(
            "update deliveries set state = 'queued', attempts = 0, next_attempt_at = ?1,"
            " created_at = ?1, sent_at = null, lease_until = null, last_error = null"
            " where instance_id = ?2 and state in ('sent', 'dead')"
            " and destination in (select value from json_each(?3))",
            (now, instance_id, json.dumps(targets)),
        )
        self._superseded.update(
            (str(name), instance_id)
            for name, state in deliveries
            if state == "sending" and name in targets
        )
        return previous

    def get(self, sop_instance_uid: str, destination: str | None = None) -> OutboxRow | None:
        """The instance with this SOP UID at ``destination`` (default: summed up over all)."""
        if destination is None:
            rows = self._query(
                _SELECT_INSTANCES + " where i.sop_instance_uid = ?", (sop_instance_uid,)
            )
        else:
            rows = self._query(
                _SELECT_ROWS + " where i.sop_instance_uid = ? and d.destination = ?",
                (sop_instance_uid, destination),
            )
        return _row(rows[0]) if rows else None

    def deliveries_of(self, sop_instance_uid: str) -> dict[str, OutboxRow]:
        """The instance's delivery to each destination it goes to, by destination name."""
        rows = self._query(
            _SELECT_ROWS + " where i.sop_instance_uid = ? order by d.destination",
            (sop_instance_uid,),
        )
        return {str(r[13]): _row(r) for r in rows}

    def audit(self, row_id: int) -> dict[str, Any]:
        rows = self._query("select audit from instances where id = ?", (row_id,))
        return dict(json.loads(rows[0][0])) if rows else {}

    # -- rows out (status, QC) ----------------------------------------------------------------
    def destination_names(self) -> list[str]:
        """Every destination the outbox knows: the configured ones first, then any other that
        still has deliveries (a destination removed from the configuration)."""
        names = [r.name for r in self.routes]
        known = _DELIVERY_DESTINATIONS
        if not self._configured:
            known += " union select name from destinations"
        for (name,) in self._query(known + " order by 1"):
            if name not in names:
                names.append(str(name))
        return names

    def has_rows(self) -> bool:
        """True if the outbox holds any instance."""
        return bool(self._query("select exists (select 1 from instances)")[0][0])

    def counts(self, destination: str | None = None) -> dict[str, int]:
        """Deliveries by state (of every destination, or of one)."""
        out = dict.fromkeys(STATES, 0)
        names = self.destination_names() if destination is None else [destination]
        for name in names:
            for state, n in self._query(_COUNTS if self._counted else _COUNTS_OF_ROWS, (name,)):
                out[str(state)] += int(n)
        return out

    def proof_summary(self, destination: str | None = None) -> dict[str, tuple[int, int]]:
        """``{"pending": (deliveries, bytes), "unproven": (deliveries, bytes)}`` of sent
        deliveries (to every destination, or to one) whose files are kept: proof pending, or
        acknowledged by a destination that could not prove storage."""
        out = {"pending": (0, 0), "unproven": (0, 0)}
        names = self.destination_names() if destination is None else [destination]
        for key, proof in (("pending", "is null"), ("unproven", "= 0")):
            for name in names:
                n, size = self._query(_KEPT.format(proof=proof), (name,))[0]
                out[key] = (out[key][0] + int(n), out[key][1] + int(size))
        return out

    def counts_by_destination(self) -> dict[str, dict[str, int]]:
        """``{destination: {state: deliveries}}`` for every destination the outbox knows."""
        return {name: self.counts(name) for name in self.destination_names()}

    def instance_count(self) -> int:
        return int(self._query("select count(*) from instances")[0][0])

    def unrouted_count(self) -> int:
        """Instances no destination's rule matched (kept without deliveries)."""
        return int(
            self._query(
                "select count(*) from instances i"
                " where not exists (select 1 from deliveries d where d.instance_id = i.id)"
            )[0][0]
        )

    def oldest_waiting_age(self, destination: str | None = None) -> float | None:
        """Seconds since the oldest instance not yet delivered to a destination (of any, or this
        one) was added: its delivery queued, sending, or sent with its proof of storage pending;
        None: nothing waits."""
        names = self.destination_names() if destination is None else [destination]
        found = [
            float(t) for name in names for t in self._query(_OLDEST, (name,))[0] if t is not None
        ]
        if not found:
            return None
        return max(0.0, self.now() - min(found))

    def rows(
        self, state: str | None = None, limit: int = 1000, *, destination: str | None = None
    ) -> list[OutboxRow]:
        """Deliveries (of every destination, or of one), in the order instances were added."""
        if state is not None and state not in STATES:
            raise ValueError(f'Argument "state" must be one of {STATES}, not {state!r}.')
        q = self._query(
            _SELECT_ROWS
            + " where (?1 is null or d.state = ?1) and (?2 is null or d.destination = ?2)"
            " order by d.instance_id, d.destination limit ?3",
            (state, destination, limit),
        )
        return [_row(r) for r in q]

    def rows_since(self, last_id: int, limit: int = 1000) -> list[OutboxRow]:
        """Instances added after ``last_id`` (one row each, its deliveries summed up)."""
        q = self._query(
            _SELECT_INSTANCES + " where i.id > ? order by i.id limit ?", (last_id, limit)
        )
        return [_row(r) for r in q]


class DestinationView:
    """The base of the per-destination parts (``delivery``, ``circuit``): one destination's
    deliveries and circuit, over the outbox's connection and lock.

    Parameters
    ----------
    db
        The outbox.
    name
        The destination (a row of ``destinations`` is made for it if it has none).
    """

    def __init__(self, db: OutboxDB, name: str) -> None:
        self.outbox_db = db
        self.name = name
        self._clock = db._clock
        if not db.read_only and not self._query(
            "select 1 from destinations where name = ?", (name,)
        ):
            with self._tx() as c:
                c.execute("insert or ignore into destinations (name) values (?)", (name,))

    @property
    def _superseded(self) -> set[tuple[str, int]]:
        return self.outbox_db._superseded

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return self.outbox_db._tx()

    def now(self) -> float:
        """The outbox's wall clock, watched for jumps (see :meth:`OutboxDB.now`)."""
        return self.outbox_db.now()

    def _now_tx(self, c: sqlite3.Connection) -> float:
        return self.outbox_db._now_tx(c)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.outbox_db._query(sql, params)
