"""The outbox schema, its recorded version, and the in-place upgrade of older outboxes.

Version history (recorded in SQLite's ``pragma user_version``):

* **1** (gateway-agent 0.1.0; ``user_version`` 0): one ``outbox`` table, a row per instance with
  its upload state (and, in later 0.1 builds, the ``scanner`` pseudonym), and
  ``destination_state``, the circuit of the single destination.
* **2**: ``instances`` (a row per de-identified instance: UIDs, routing attributes, file),
  ``deliveries`` (its state at each destination it goes to: a row per (instance, destination))
  and ``destinations`` (each destination's circuit). A sent delivery's ``confirmed`` is its
  proof of storage: NULL pending, 1 proven, 0 acknowledged by a destination that cannot prove
  it. (An outbox of version 2 written before that column gets it, NULL: its sent deliveries are
  then asked about, their files kept until proven.) ``delivery_counts`` holds each
  destination's deliveries by state, kept by triggers in the transaction that changes them, and
  :data:`SUMMARY_INDEXES` the indexes the rest of the per-destination summary reads (``/metrics``,
  ``/readyz``, ``status``): both are made where missing at the next open, the counts taken once
  from the rows. Neither changes a delivery; an older build of this version reads and writes
  the database as before (the triggers keep the counts for it too).

:func:`prepare` runs at every open: it creates the current schema in an empty database, upgrades
an older one in ONE transaction (all or nothing: a failure rolls back and leaves the database as
it was), and refuses a database written by a newer version. Either failure is an
:class:`OutboxSchemaError`, which the daemon reports as one line before it exits with status 2.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ..._exceptions import GatewayError
from ...logs import get_logger

__all__ = [
    "SCHEMA_VERSION",
    "SUMMARY_INDEXES",
    "has_counts",
    "OutboxSchemaError",
    "lacks_columns",
    "prepare",
    "schema_version",
]

log = get_logger()

#: The version this code writes.
SCHEMA_VERSION = 2

STATE_CHECK = "check (state in ('queued', 'sending', 'sent', 'dead'))"

#: The current schema, every statement idempotent (``if not exists``).
CURRENT = (
    """
    create table if not exists instances (
        id integer primary key,
        sop_instance_uid text not null unique,
        study_instance_uid text not null,
        series_instance_uid text not null,
        sop_class_uid text not null,
        modality text not null default '',
        source text not null default 'inbox',
        inbox_folder text,
        calling_ae text,
        scanner text,
        path text not null,
        size integer not null,
        created_at real not null,
        file_gone integer not null default 0,
        audit text not null default '{}'
    )
    """,
    "create index if not exists instances_files on instances (file_gone, id)",
    f"""
    create table if not exists deliveries (
        instance_id integer not null references instances (id),
        destination text not null,
        state text not null default 'queued' {STATE_CHECK},
        attempts integer not null default 0,
        next_attempt_at real not null default 0,
        lease_until real,
        last_error text,
        created_at real not null,
        sent_at real,
        confirmed integer,
        primary key (destination, instance_id)
    ) without rowid
    """,
    "create index if not exists deliveries_state on deliveries (destination, state, instance_id)",
    "create index if not exists deliveries_due on deliveries (destination, state, next_attempt_at)",
    "create index if not exists deliveries_instance on deliveries (instance_id, state)",
    """
    create table if not exists destinations (
        name text primary key,
        consecutive_failures integer not null default 0,
        blocked_until real not null default 0,
        probe_until real not null default 0,
        last_error text,
        last_error_at real,
        last_success_at real,
        auth_failing integer not null default 0
    )
    """,
)


#: Sent deliveries whose proof of storage is pending: the uploader's pages of work.
PROOF_INDEX = (
    "create index if not exists deliveries_proof on deliveries (destination, sent_at)"
    " where state = 'sent' and confirmed is null"
)

#: What the per-destination summary reads (``/metrics``, ``/readyz``, ``status``), so that it
#: reads index entries of the few rows it reports on, not every delivery the retention keeps.
#: Both are partial: a delivery is in them only while it waits (``deliveries_waiting``: the
#: oldest queued or sending, one index seek) or while it is sent with its storage not proven
#: (``deliveries_kept``: pending or unproven, with when it was sent and queued).
SUMMARY_INDEXES = (
    "create index if not exists deliveries_waiting on deliveries (destination, created_at)"
    " where state in ('queued', 'sending')",
    "create index if not exists deliveries_kept"
    " on deliveries (destination, state, confirmed, sent_at, created_at)"
    " where state = 'sent' and (confirmed is null or confirmed = 0)",
)


#: Each destination's deliveries by state (``/metrics``, ``/readyz`` and ``status`` read these
#: few rows instead of counting every delivery the retention keeps).
COUNTS_TABLE = """
    create table delivery_counts (
        destination text not null,
        state text not null,
        deliveries integer not null,
        primary key (destination, state)
    ) without rowid
"""
#: ``delivery_counts`` follows every insert, delete and change of state of a delivery, in the
#: statement's transaction (so a rollback undoes both).
COUNT_TRIGGERS = (
    """
    create trigger if not exists deliveries_count_added after insert on deliveries begin
        insert into delivery_counts values (new.destination, new.state, 1)
        on conflict (destination, state) do update set deliveries = deliveries + 1;
    end
    """,
    """
    create trigger if not exists deliveries_count_removed after delete on deliveries begin
        update delivery_counts set deliveries = deliveries - 1
        where destination = old.destination and state = old.state;
    end
    """,
    """
    create trigger if not exists deliveries_count_moved after update of destination, state
    on deliveries when old.destination is not new.destination or old.state is not new.state
    begin
        update delivery_counts set deliveries = deliveries - 1
        where destination = old.destination and state = old.state;
        insert into delivery_counts values (new.destination, new.state, 1)
        on conflict (destination, state) do update set deliveries = deliveries + 1;
    end
    """,
)


def has_counts(conn: sqlite3.Connection) -> bool:
    """Whether the database keeps ``delivery_counts`` (a read-only open of one written by an
    earlier build of this version counts the rows instead)."""
    found = conn.execute(
        "select 1 from sqlite_master where type = 'table' and name = 'delivery_counts'"
    ).fetchone()
    return found is not None


def _counts(conn: sqlite3.Connection) -> None:
    """``delivery_counts`` and its triggers, made where missing (counted once from the rows, in
    the caller's transaction); no write when they are there."""
    if not has_counts(conn):
        conn.execute(COUNTS_TABLE)
        conn.execute(
            "insert into delivery_counts (destination, state, deliveries)"
            " select destination, state, count(*) from deliveries group by destination, state"
        )
    for ddl in COUNT_TRIGGERS:
        conn.execute(ddl)


def lacks_columns(conn: sqlite3.Connection) -> bool:
    """Whether a version-2 database lacks a column added since it was first written (read-only
    opens cannot add it: the agent does at its next start)."""
    columns = {str(r[1]) for r in conn.execute("pragma table_info(deliveries)")}
    return "confirmed" not in columns


def _columns(conn: sqlite3.Connection) -> None:
    """Columns and indexes added to version 2 since it was first written: added where missing,
    idempotent."""
    if lacks_columns(conn):
        # NULL: proof pending; the uploader asks the destination, the files are kept till then.
        conn.execute("alter table deliveries add column confirmed integer")
    conn.execute(PROOF_INDEX)
    for ddl in SUMMARY_INDEXES:
        conn.execute(ddl)
    _counts(conn)


class OutboxSchemaError(GatewayError):
    """The outbox database cannot be used by this version (too new, or its upgrade failed)."""


def schema_version(conn: sqlite3.Connection) -> int:
    """The version of the database's schema (0: empty; 1: gateway-agent 0.1.0)."""
    version = int(conn.execute("pragma user_version").fetchone()[0])
    if version:
        return version
    tables = {str(r[0]) for r in conn.execute("select name from sqlite_master where type='table'")}
    return 1 if "outbox" in tables else 0


def _from_1(conn: sqlite3.Connection, destination: str) -> int:
    """Version 1 to 2: every row becomes an instance and its delivery to ``destination``; the
    circuit becomes that destination's. Row ids are kept (the QC job's records point to them).
    Returns the number of instances carried over."""
    conn.execute(
        "insert into instances (id, sop_instance_uid, study_instance_uid, series_instance_uid,"
        " sop_class_uid, path, size, created_at, file_gone, audit) select id, sop_instance_uid,"
        " study_instance_uid, series_instance_uid, sop_class_uid, path, size, created_at,"
        " file_gone, audit from outbox"
    )
    old = {str(r[1]) for r in conn.execute("pragma table_info(outbox)")}
    # Columns other builds of 0.1 may have added: carried over when present.
    for column in ("source", "scanner", "calling_ae"):
        if column in old:
            conn.execute(
                f"update instances set {column} ="  # noqa: S608 (a name from the tuple above)
                f" (select o.{column} from outbox o where o.id = instances.id)"
            )
    conn.execute(
        "insert into deliveries (instance_id, destination, state, attempts, next_attempt_at,"
        " lease_until, last_error, created_at, sent_at) select id, ?, state, attempts,"
        " next_attempt_at, lease_until, last_error, created_at, sent_at from outbox",
        (destination,),
    )
    # A sent row of 0.1.0 was acknowledged, never proven stored: its delivery's proof is pending
    # (``confirmed`` NULL), so the uploader asks the destination about it and its file is kept
    # until then. A build that recorded the proof (``outbox.confirmed``) carries it over.
    if "confirmed" in old:
        conn.execute(
            "update deliveries set confirmed ="
            " (select o.confirmed from outbox o where o.id = deliveries.instance_id)"
        )
    tables = {str(r[0]) for r in conn.execute("select name from sqlite_master where type='table'")}
    if "destination_state" in tables:
        conn.execute(
            "insert or replace into destinations (name, consecutive_failures, blocked_until,"
            " probe_until, last_error, last_error_at, last_success_at, auth_failing)"
            " select ?, consecutive_failures, blocked_until, 0, last_error, last_error_at,"
            " last_success_at, auth_failing from destination_state where id = 1",
            (destination,),
        )
    (before,) = conn.execute("select count(*) from outbox").fetchone()
    (instances,) = conn.execute("select count(*) from instances").fetchone()
    (deliveries,) = conn.execute("select count(*) from deliveries").fetchone()
    if not before == instances == deliveries:
        raise sqlite3.IntegrityError(
            f"rows carried over do not add up ({before} rows, {instances} instances, "
            f"{deliveries} deliveries)"
        )
    conn.execute("drop table outbox")
    conn.execute("drop table if exists destination_state")
    return int(before)


#: ``MIGRATIONS[v]`` upgrades version ``v`` to ``v + 1`` inside the caller's transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection, str], int]] = {1: _from_1}


def prepare(conn: sqlite3.Connection, *, destination: str, upgrade: bool = True) -> int:
    """Create or upgrade the schema on ``conn`` (autocommit mode, caller's lock held).

    ``destination`` receives the waiting rows of a version-1 outbox (which had one destination).
    Without ``upgrade`` (operator commands, which may run beside an agent of the earlier
    version) an older database is refused instead of upgraded. Returns the version found before
    (0 for a new database).

    Raises
    ------
    OutboxSchemaError
        The database was written by a newer version, or its upgrade failed (it is then as it
        was: the upgrade is one transaction).
    """
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise OutboxSchemaError(
            f"the outbox database has schema version {found}, written by a newer gateway-agent; "
            f"this version reads up to {SCHEMA_VERSION}: run the newer version (a downgrade "
            "would lose track of its rows)"
        )
    if 0 < found < SCHEMA_VERSION and not upgrade:
        raise OutboxSchemaError(
            f"the outbox database has schema version {found}, written by an earlier "
            "gateway-agent; the agent upgrades it when it starts: restart it (systemctl restart "
            "gateway-agent), then try again"
        )
    conn.execute("begin immediate")
    try:
        found = schema_version(conn)  # again, under the write lock
        for ddl in CURRENT:
            conn.execute(ddl)
        rows = 0
        for version in range(max(found, 1), SCHEMA_VERSION):
            if found:
                rows += MIGRATIONS[version](conn, destination)
        _columns(conn)  # no write when the columns are there
        if found != SCHEMA_VERSION:  # nothing is written to a current outbox's database
            conn.execute(f"pragma user_version = {SCHEMA_VERSION}")
    except BaseException as exc:
        if conn.in_transaction:  # SQLite rolls back by itself on a full disk or an I/O error
            conn.execute("rollback")
        if found and isinstance(exc, sqlite3.Error | OSError):
            raise OutboxSchemaError(
                f"the outbox database could not be upgraded from schema version {found} to "
                f"{SCHEMA_VERSION} ({exc}); it is unchanged: fix the cause (free disk space, "
                "stop the other process using it) and start again, or go back to the earlier "
                "version"
            ) from None
        raise
    conn.execute("commit")
    if found and found < SCHEMA_VERSION:
        log.info(
            "outbox_upgraded",
            from_version=found,
            to_version=SCHEMA_VERSION,
            instances=rows,
            destination=destination,
        )
    return found
