"""The periodic QC job: features of newly de-identified instances, the fleet model, the report."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..._exceptions import QCError
from ...config import QCSettings
from ...logs import get_logger
from ...qc.report_file import latest_outliers as _outliers_in
from ..outbox._sqlite import connect, query, transaction
from .paths import StatePaths

if TYPE_CHECKING:
    from ...qc import ScanFeatures

# The QC code (NumPy, pydicom, matplotlib, scikit-learn) is imported by the first pass, not with
# the daemon: an agent with QC disabled never loads it.

__all__ = ["QCJob", "latest_outliers", "qc_component", "qc_report_dir"]

log = get_logger()

#: Fleet model size: the newest this many stored feature rows.
MAX_FLEET_RECORDS = 5000
#: Outbox rows read per query while catching up, and at most per pass (the rest waits).
BATCH_ROWS = 1000
MAX_ROWS_PER_RUN = 50_000
#: Nice increment of the QC thread (Linux threads have their own nice value).
NICE_INCREMENT = 10

_SCHEMA = (
    """
    create table if not exists qc_features (
        id integer primary key,
        outbox_id integer not null unique,
        sop_instance_uid text not null,
        series_instance_uid text not null,
        device text not null,
        created_at real not null,
        features text not null
    )
    """,
    "create index if not exists qc_features_series on qc_features (series_instance_uid)",
    """
    create table if not exists qc_state (
        id integer primary key check (id = 1),
        last_outbox_id integer not null default 0
    )
    """,
    "insert or ignore into qc_state (id) values (1)",
)


class _Row(Protocol):
    id: int
    series_instance_uid: str
    sop_instance_uid: str
    path: Path
    created_at: float


class _Outbox(Protocol):
    db_path: Path | None

    def rows_since(self, last_id: int, limit: int = ...) -> Sequence[Any]: ...


def qc_report_dir(state_dir: Path) -> Path:
    """Where the job writes ``report.json``, ``fleet.png`` and ``features.csv``."""
    return StatePaths(state_dir).qc_report


def latest_outliers(state_dir: Path) -> list[dict[str, Any]]:
    """Outliers of the latest QC report in ``state_dir`` (``[]`` before the first report).

    Each item has ``file``, ``sop_instance_uid``, ``series_instance_uid``, ``device``,
    ``timestamp``, ``group``, ``isolation_score`` and ``reasons`` (list of text); no PHI.
    """
    return _outliers_in(qc_report_dir(state_dir))


class QCJob:
    """Periodic QC inside the daemon, on its own low-priority thread.

    :meth:`run_once` reads outbox rows added since the last run, samples
    ``settings.slices_per_series`` instances per series (within a CPU budget of
    ``max_cpu_fraction * interval_seconds`` per pass), stores their features in the
    ``qc_features`` table of the outbox database (its own connection), refits the fleet model on
    the newest :data:`MAX_FLEET_RECORDS` rows and writes ``state_dir/qc/{report.json, fleet.png,
    features.csv}``, and publishes the per-scanner gauges of ``/metrics``. Records are grouped by
    the scanner pseudonym of their outbox row. Errors are logged and counted, never raised into
    the agent. Timestamps are the outbox rows' intake times, so "per scanner over time" shows
    real time on the box.

    Parameters
    ----------
    outbox
        The agent's :class:`~gateway_agent.agent.outbox.Outbox` (``rows_since``, ``db_path``).
    state_dir
        The agent's state folder.
    settings
        ``settings.qc``: ``interval_seconds``, ``slices_per_series``, ``n_clusters``,
        ``max_cpu_fraction``.
    nice
        Nice increment of the job's thread (0 keeps the caller's priority).
    cpu_clock
        CPU-time source of the budget (this thread's CPU time; injected by tests).
    """

    def __init__(
        self,
        outbox: _Outbox,
        state_dir: Path,
        settings: QCSettings,
        *,
        nice: int = NICE_INCREMENT,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.outbox = outbox
        self.state_dir = Path(state_dir)
        self.settings = settings
        self.report_dir = qc_report_dir(self.state_dir)
        self._cpu_clock = cpu_clock
        self._nice = nice
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        db = outbox.db_path if outbox.db_path is not None else self.report_dir / "qc.db"
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(Path(db))
        with self._tx() as c:
            for ddl in _SCHEMA:
                c.execute(ddl)
        #: Counters since start: runs, rows_seen, sampled, failed, errors, cpu_seconds, ...
        self.stats: dict[str, float] = defaultdict(float)
        #: The per-scanner gauges were published since start (a restart publishes them again).
        self._published = False

    # ------------------------------------------------------------------ plumbing
    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._conn, self._lock)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return query(self._conn, self._lock, sql, params)

    @property
    def last_outbox_id(self) -> int:
        return int(self._query("select last_outbox_id from qc_state where id = 1")[0][0])

    def stored(self) -> int:
        """Feature rows stored so far."""
        return int(self._query("select count(*) from qc_features")[0][0])

    # ------------------------------------------------------------------ work
    def run_once(self) -> dict[str, Any]:
        """One QC pass; returns a summary. Never raises (errors are logged and counted)."""
        cpu0, wall0 = self._cpu_clock(), time.perf_counter()
        summary: dict[str, Any] = {
            "rows": 0,
            "sampled": 0,
            "failed": 0,
            "skipped_budget": 0,
            "outliers": None,
        }
        try:
            self._ingest(summary, cpu0)
            if (
                summary["sampled"]
                or not self._published
                or not (self.report_dir / "report.json").exists()
            ):
                summary["outliers"] = self._refresh()
        except Exception as exc:  # a QC failure must never stop the agent
            self.stats["errors"] += 1
            summary["error"] = type(exc).__name__
            log.error("qc_run_failed", error=type(exc).__name__, exc_info=True)
        if summary["skipped_budget"]:
            log.warning("qc_budget_exhausted", skipped=summary["skipped_budget"])
        cpu = self._cpu_clock() - cpu0
        self.stats["runs"] += 1
        self.stats["cpu_seconds"] += cpu
        self.stats["wall_seconds"] += time.perf_counter() - wall0
        summary["cpu_seconds"] = round(cpu, 4)
        log.info("qc_run", **{k: v for k, v in summary.items() if v is not None})
        return summary

    def _ingest(self, summary: dict[str, Any], cpu0: float) -> None:
        from ...qc import pick_spread  # QC's libraries load with the first pass

        budget = self.settings.max_cpu_fraction * self.settings.interval_seconds
        last = self.last_outbox_id
        while not self._stop.is_set() and summary["rows"] < MAX_ROWS_PER_RUN:
            rows = list(self.outbox.rows_since(last, BATCH_ROWS))
            if not rows:
                break
            by_series: dict[str, list[Any]] = defaultdict(list)
            for row in rows:
                by_series[row.series_instance_uid].append(row)
            chosen: list[Any] = []
            for series, members in by_series.items():
                have = int(
                    self._query(
                        "select count(*) from qc_features where series_instance_uid = ?", (series,)
                    )[0][0]
                )
                # Spread over the series' new rows, as `qc --dicomweb` spreads over an archive's.
                chosen.extend(pick_spread(members, self.settings.slices_per_series - have))
            stored: list[tuple[Any, ...]] = []
            failed = skipped = 0
            for row in sorted(chosen, key=lambda r: r.id):
                if self._stop.is_set():
                    return  # nothing committed for this batch; the next run redoes it
                if self._cpu_clock() - cpu0 > budget:
                    skipped += 1  # over this pass's CPU budget: the sample thins out
                    continue
                record = self._measure(row)
                if record is None:
                    failed += 1
                    continue
                stored.append(
                    (
                        row.id,
                        row.sop_instance_uid,
                        row.series_instance_uid,
                        record.scanner_label,
                        row.created_at,
                        json.dumps(record.as_json()),
                    )
                )
                # Give the GIL back between slices: intake and upload threads come first.
                time.sleep(0.001)
            last = max(r.id for r in rows)
            with self._tx() as c:
                c.executemany(
                    "insert or ignore into qc_features (outbox_id, sop_instance_uid,"
                    " series_instance_uid, device, created_at, features) values (?, ?, ?, ?, ?, ?)",
                    stored,
                )
                c.execute("update qc_state set last_outbox_id = ? where id = 1", (last,))
            summary["rows"] += len(rows)
            summary["sampled"] += len(stored)
            summary["failed"] += failed
            summary["skipped_budget"] += skipped
            self.stats["skipped_budget"] += skipped
            self.stats["rows_seen"] += len(rows)
            self.stats["sampled"] += len(stored)
            self.stats["failed"] += failed
            if len(rows) < BATCH_ROWS:
                break  # caught up

    def _measure(self, row: _Row) -> ScanFeatures | None:
        path = Path(row.path)
        from ...qc import features_from_file

        try:
            record = features_from_file(path)
        except Exception as exc:  # QCError, OSError (file gone), anything else: skip the row
            level = log.info if isinstance(exc, QCError | OSError) else log.warning
            level("qc_skipped", sop_uid=row.sop_instance_uid, reason=_skip_reason(exc))
            return None
        record.file = path.name
        # The outbox row names the scanner (from the original device attributes); the file
        # carries the same pseudonym, which older rows without the column fall back on.
        record.scanner = getattr(row, "scanner", None) or record.scanner
        record.timestamp = datetime.fromtimestamp(row.created_at).isoformat(timespec="seconds")
        return record

    def _refresh(self) -> int:
        rows = self._query(
            "select features, created_at from qc_features order by id desc limit ?",
            (MAX_FLEET_RECORDS,),
        )
        from ...qc import ScanFeatures, analyse_fleet, write_report

        rows.reverse()
        records = [ScanFeatures.from_json(json.loads(r[0])) for r in rows]
        if not records:
            return 0
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        # One thread for scikit-learn's OpenMP/BLAS pools: QC stays on its own (niced) thread,
        # and its CPU time is what time.thread_time() counts.
        with threadpool_limits(limits=1):
            _matrix, labels, silhouette = analyse_fleet(records, self.settings.n_clusters)
        write_report(records, labels, silhouette, self.report_dir)
        outliers = sum(1 for r in records if r.outlier)
        self.publish_scanners(records, [float(r[1]) for r in rows])
        with contextlib.suppress(Exception):  # metrics are optional here
            from ..metrics import QC_OUTLIERS

            QC_OUTLIERS.set(outliers)
        sil = None if math.isnan(silhouette) else round(silhouette, 3)
        log.info("qc_report", scans=len(records), outliers=outliers, silhouette=sil)
        return outliers

    def publish_scanners(
        self, records: Sequence[ScanFeatures], measured_at: Sequence[float]
    ) -> None:
        """Publish the per-scanner gauges of ``/metrics`` from the fitted records."""
        from ...qc import scanner_states
        from ..metrics import SCANNER_QC

        SCANNER_QC.publish(
            scanner_states(records, measured_at),
            ttl_seconds=self.settings.scanner_ttl_hours * 3600.0,
            max_scanners=self.settings.max_scanners,
        )
        self._published = True

    # ------------------------------------------------------------------ thread
    def start(self) -> QCJob:
        """Start the thread (first run after ``min(interval, 30 s)``); a no-op when disabled."""
        if not self.settings.enabled or (self._thread is not None and self._thread.is_alive()):
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="qc-job", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        if self._nice:
            with contextlib.suppress(OSError):
                os.nice(self._nice)  # this thread only, on Linux
        delay = min(self.settings.interval_seconds, 30.0)
        while not self._stop.wait(delay):
            self.run_once()
            delay = self.settings.interval_seconds

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (an in-progress pass stops between slices) and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            self._conn.close()
        if self._published:
            from ..metrics import SCANNER_QC

            SCANNER_QC.clear()


def qc_component(daemon: Any) -> QCJob:
    """Factory for ``Daemon(components=[qc_component])``: the job on the daemon's outbox."""
    return QCJob(daemon.outbox, daemon.settings.state_dir, daemon.settings.qc)


def _skip_reason(exc: Exception) -> str:
    """Why an instance could not be measured, without values from the file.

    QCError messages are our own ("no pixel data", "windowing needs a grayscale image; ...");
    an OSError is named by its errno ("ENOENT": the file was sent and purged meanwhile).
    """
    if isinstance(exc, QCError):
        return str(exc)
    if isinstance(exc, OSError):
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return type(exc).__name__
