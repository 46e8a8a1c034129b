"""The upload workers: claim due outbox rows, send them to the destination, record the outcome.

Each worker repeats one step (:meth:`Uploader.loop_once`): ask the destination circuit whether it
may send, claim a batch (``batch_max_instances`` / ``batch_max_mb``), send it, and map the outcome:

* acknowledged instances → ``sent``;
* a per-instance permanent failure → ``dead`` with the server's reason;
* a per-instance transient failure → ``queued`` with the row's own backoff;
* a whole-request retriable failure (network, timeout, 408, 429, 5xx) or an authentication failure
  (401/403, a redirect) → the destination circuit opens: one probe at a time, exponential backoff
  with full jitter (``Retry-After`` honoured); the rows wait without burning their attempts once the
  outage is known;
* a whole-request permanent failure (400 for a single instance, 404, 415, ...) → ``dead``.

Rows whose attempts or age are exhausted go to ``dead``. Workers sleep on an Event between due
times (no busy polling); :meth:`wake` is called by intake after adding rows.

If recording an outcome fails (the state disk is full, the database is locked), the outbox writes
not yet made are kept in memory, in order, and the worker retries them with a short backoff
(:data:`RECORD_RETRY_FIRST_SECONDS` doubling to :data:`RECORD_RETRY_MAX_SECONDS`) before it claims
anything new; :meth:`Uploader.stop` tries once more and otherwise leaves the rows ``sending`` for
``requeue_stale`` at the next start (a re-send is harmless: the destination is idempotent per SOP
Instance UID). The rows' lease expiry remains the last resort.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..._exceptions import PermanentUploadError, RetryableUploadError
from ...config import DestinationSettings
from ...logs import describe_error, get_logger
from .. import metrics
from ..outbox.db import OutboxRow
from ..outbox.store import Outbox
from .destinations import REFUSAL_STATUSES, Destination, SendResult

__all__ = ["Uploader", "full_jitter"]

log = get_logger()

#: Longest sleep between checks when idle (new rows wake the workers earlier).
IDLE_MAX_SECONDS = 30.0
#: While more rows are on their way (intake busy), a worker waits up to this long for a batch to
#: fill before it claims; one worker fills at a time while the others send.
BATCH_LINGER_SECONDS = 0.1
#: Longest wait honoured from a Retry-After header.
RETRY_AFTER_MAX_SECONDS = 3600.0
#: First wait before retrying an outcome that could not be recorded; doubles up to the max.
RECORD_RETRY_FIRST_SECONDS = 0.5
RECORD_RETRY_MAX_SECONDS = 10.0
#: Failures of the state storage (disk full, I/O error, locked): worth retrying the write later.
_STORAGE_ERRORS = (sqlite3.Error, OSError)

_T = TypeVar("_T")


def full_jitter(rng: random.Random, attempt: int, base: float, cap: float) -> float:
    """AWS "full jitter": uniform in ``[0, min(cap, base * 2**attempt)]``."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 60))))


class _Journal:
    """The outbox writes recording one batch's outcome, made in order; those not yet made.

    Each outbox method is one transaction: it took effect or it did not. Once a write fails with
    a storage error, it and every later write of the batch wait here (order is kept, so e.g. a
    row's ``mark_retry`` never lands before its ``mark_dead``) to be replayed by :meth:`replay`.
    """

    def __init__(self, row_ids: list[int]) -> None:
        self.row_ids = row_ids
        self.todo: deque[Callable[[], object]] = deque()
        self.tries = 0
        self.delay = RECORD_RETRY_FIRST_SECONDS

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``fn(*args, **kwargs)`` now, or (after a storage error, now or earlier) later: None."""
        if not self.todo:
            try:
                return fn(*args, **kwargs)
            except _STORAGE_ERRORS as exc:
                log.error(
                    "upload_outcome_not_recorded", rows=len(self.row_ids), error=describe_error(exc)
                )
        self.todo.append(lambda: fn(*args, **kwargs))
        return None

    def replay(self) -> bool:
        """Make the waiting writes; True when none is left. A storage error stops the replay."""
        while self.todo:
            try:
                self.todo[0]()
            except _STORAGE_ERRORS as exc:
                self.tries += 1
                log.warning(
                    "upload_outcome_retry_failed",
                    rows=len(self.row_ids),
                    tries=self.tries,
                    error=describe_error(exc),
                )
                return False
            except Exception:
                self.todo.clear()  # not a storage problem: leave the rows to their lease
                raise
            self.todo.popleft()
        return True


class Uploader:
    """Upload workers over one outbox and one destination.

    Parameters
    ----------
    outbox, destination
        Where rows come from and where they go.
    settings
        Batch sizes, parallel requests, attempts, age and backoff (``DestinationSettings``).
    clock
        Wall clock (must be the outbox's clock too).
    rng
        Source of jitter (seeded in tests).
    more_coming
        Optional: returns True while more rows are about to be added (intake busy). Then a
        worker lingers up to ``linger_seconds`` for a full batch (``batch_max_instances`` or
        ``batch_max_mb``) before claiming, instead of sending rows one by one as they trickle
        in. Without it (the default) a worker claims whatever is due at once.
    linger_seconds
        The longest such wait.
    """

    def __init__(
        self,
        outbox: Outbox,
        destination: Destination,
        settings: DestinationSettings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        more_coming: Callable[[], bool] | None = None,
        linger_seconds: float = BATCH_LINGER_SECONDS,
    ) -> None:
        self.outbox = outbox
        self.destination = destination
        self.settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._in_flight: dict[int, list[int]] = {}
        self._in_flight_lock = threading.Lock()
        # Per worker (thread ident): an outcome whose recording failed, retried before new work.
        self._unrecorded: dict[int, _Journal] = {}
        self.more_coming = more_coming
        self.linger_seconds = linger_seconds
        # One worker at a time fills and claims a batch; the others send theirs meanwhile.
        self._fill_lock = threading.Lock()
        self._arrived = threading.Condition()
        self._arrivals = 0
        self.max_bytes = max(1, int(settings.batch_max_mb * 1024 * 1024))
        # A lease long enough for a batch and its split retries; claim() reclaims expired ones.
        self.lease_seconds = settings.timeout_seconds * 8 + 60.0

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("Uploader already started")
        self._stopping.clear()
        for i in range(self.settings.parallel_requests):
            t = threading.Thread(target=self._run, name=f"uploader-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        log.info("uploader_started", workers=len(self._threads), destination=self.destination.label)

    def wake(self) -> None:
        """New rows are due: wake idle workers (and a worker waiting for its batch to fill)."""
        self._wake.set()
        with self._arrived:
            self._arrivals += 1
            self._arrived.notify_all()

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, deadline: float) -> None:
        """Stop claiming; let in-flight requests finish until ``deadline``, then release the rest.

        ``deadline`` is an absolute ``time.monotonic()`` instant (a ``time.time()`` instant is
        recognised too). Released rows go back to ``queued`` without penalty.
        """
        self._stopping.set()
        self.wake()
        for t in self._threads:
            now_ref = time.time() if deadline > 1e9 else time.monotonic()
            t.join(timeout=max(0.0, deadline - now_ref))
        running = {t.ident for t in self._threads if t.is_alive()}
        with self._in_flight_lock:
            leftover = [i for ids in self._in_flight.values() for i in ids]
            self._in_flight.clear()
            unrecorded = [(k, j) for k, j in self._unrecorded.items() if k not in running]
        for key, journal in unrecorded:  # one last try; else requeue_stale at the next start
            try:
                done = journal.replay()
            except Exception:
                log.exception("uploader_record_failed", rows=len(journal.row_ids))
                done = False
            with self._in_flight_lock:
                self._unrecorded.pop(key, None)
            if done:
                log.info("upload_outcome_recorded", rows=len(journal.row_ids), tries=journal.tries)
            else:
                log.warning("uploader_left_unrecorded", rows=len(journal.row_ids))
        if leftover:
            self.outbox.release(leftover)
            log.warning("uploader_released_in_flight", rows=len(leftover))
        self._threads = [t for t in self._threads if t.is_alive()]
        log.info("uploader_stopped", still_running=len(self._threads))

    # -- the worker loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                backoff = self._retry_unrecorded()
                if backoff > 0:
                    self._stopping.wait(backoff)
                    continue
                handled, wait = self._step()
            except Exception:  # never let a worker die: log and back off a little
                log.exception("uploader_step_failed")
                self._stopping.wait(1.0)
                continue
            if handled:
                continue
            self._wake.wait(wait)
            self._wake.clear()

    def _idle_wait(self) -> float:
        due = self.outbox.next_due_at()
        if due is None:
            return IDLE_MAX_SECONDS
        return min(IDLE_MAX_SECONDS, max(0.01, due - self._clock()))

    def loop_once(self) -> int:
        """One step in the calling thread (circuit, claim, send, record); returns rows handled.

        An earlier outcome of this thread that could not be recorded is retried first; while it
        still cannot be, nothing new is claimed (returns 0).
        """
        if self._retry_unrecorded() > 0:
            return 0
        return self._step()[0]

    def _retry_unrecorded(self) -> float:
        """Retry this worker's unrecorded outcome: 0 when none is left, else the wait before the
        next try (doubling from ``RECORD_RETRY_FIRST_SECONDS`` to ``RECORD_RETRY_MAX_SECONDS``)."""
        key = threading.get_ident()
        with self._in_flight_lock:
            journal = self._unrecorded.get(key)
        if journal is None:
            return 0.0
        try:
            done = journal.replay()
        except Exception:
            with self._in_flight_lock:
                self._unrecorded.pop(key, None)
            raise
        if done:
            with self._in_flight_lock:
                self._unrecorded.pop(key, None)
            log.info("upload_outcome_recorded", rows=len(journal.row_ids), tries=journal.tries)
            self._wake.set()
            return 0.0
        delay = journal.delay
        journal.delay = min(RECORD_RETRY_MAX_SECONDS, delay * 2.0)
        return delay

    def _step(self) -> tuple[int, float]:
        wait, probing = self.outbox.circuit_acquire(probe_lease=self.lease_seconds)
        if wait > 0:
            return 0, min(IDLE_MAX_SECONDS, wait)
        if self._stopping.is_set() and self._threads:
            if probing:
                self.outbox.circuit_release_probe()
            return 0, IDLE_MAX_SECONDS
        rows: list[OutboxRow] = []
        try:
            with self._fill_lock:
                if not probing:
                    self._fill()
                rows = self.outbox.claim(
                    max_items=self.settings.batch_max_instances,
                    max_bytes=self.max_bytes,
                    lease_seconds=self.lease_seconds,
                )
        finally:
            if probing and not rows:
                # Nothing claimed (none due, or the claim failed: database locked, disk full):
                # hand the probe back, or every worker would wait for its lease.
                self.outbox.circuit_release_probe()
        if not rows:
            return 0, self._idle_wait()
        key = threading.get_ident()
        journal = _Journal([r.id for r in rows])
        with self._in_flight_lock:
            self._in_flight[key] = journal.row_ids
        try:
            self._send(rows, journal, probing=probing)
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(key, None)
                if journal.todo:
                    self._unrecorded[key] = journal
        if probing:
            self._wake.set()  # the probe is over (either way): the others re-check the circuit
        return len(rows), 0.0

    def _fill(self) -> None:
        """Wait (bounded) until a full batch is due, or no more rows are coming, or time is up.

        Rows arrive from intake a few at a time; claiming at once would send mostly one-instance
        requests (four workers each grabbing a row), and a STOW request costs the same overhead
        whatever its size. Waiting costs at most ``linger_seconds`` of latency, and only while
        intake is busy: a lone file (intake idle after its commit) is claimed at once.
        """
        more = self.more_coming
        if more is None or self.linger_seconds <= 0:
            return
        deadline = time.monotonic() + self.linger_seconds
        while not self._stopping.is_set():
            with self._arrived:
                seen = self._arrivals
            n, size = self.outbox.due_summary(self.settings.batch_max_instances)
            if n >= self.settings.batch_max_instances or size >= self.max_bytes:
                return
            try:
                if not more():
                    return
            except Exception:
                return
            with self._arrived:
                while self._arrivals == seen and not self._stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._arrived.wait(left)

    # -- one batch ---------------------------------------------------------------------------
    def _jitter(self, attempt: int) -> float:
        with self._rng_lock:
            return full_jitter(
                self._rng,
                attempt,
                self.settings.backoff_base_seconds,
                self.settings.backoff_cap_seconds,
            )

    def _send(self, rows: list[OutboxRow], j: _Journal, *, probing: bool) -> None:
        started = self._clock()
        t0 = time.monotonic()
        try:
            result = self.destination.send(rows)
        except RetryableUploadError as exc:
            self._outage(rows, j, str(exc), exc.retry_after, started, probing=probing, auth=False)
            return
        except PermanentUploadError as exc:
            if exc.status in REFUSAL_STATUSES:
                self._outage(rows, j, str(exc), None, started, probing=probing, auth=True)
            else:
                self._dead(rows, j, str(exc))
                self._healthy(j)  # the server answered: it is not down
            return
        except Exception as exc:  # a bug or an unexpected library error: retry the rows later
            log.exception("upload_unexpected_error", rows=len(rows))
            self._retry_rows(rows, j, f"internal_error: {type(exc).__name__}")
            return
        finally:
            metrics.UPLOAD_SECONDS.observe(time.monotonic() - t0)
        self._record(rows, j, result)

    def _record(self, rows: list[OutboxRow], j: _Journal, result: SendResult) -> None:
        by_uid = {r.sop_instance_uid: r for r in rows}
        sent = [by_uid[u] for u in dict.fromkeys(result.sent) if u in by_uid]
        if sent:
            j.call(self.outbox.mark_sent, [r.id for r in sent])
            metrics.UPLOAD_ATTEMPTS.labels(result="sent").inc(len(sent))
            metrics.BYTES_SENT.inc(sum(r.size for r in sent))
            metrics.LAST_UPLOAD_SUCCESS.set(time.time())
        dead: dict[str, list[OutboxRow]] = {}
        retry: dict[str, list[OutboxRow]] = {}
        sent_ids = {r.id for r in sent}
        for uid, (permanent, reason) in result.failed.items():
            row = by_uid.get(uid)
            if row is None or row.id in sent_ids:
                continue
            (dead if permanent else retry).setdefault(reason, []).append(row)
        for reason, group in dead.items():
            self._dead(group, j, reason)
        for reason, group in retry.items():
            self._retry_rows(group, j, reason)
        handled = sent_ids | {r.id for g in (*dead.values(), *retry.values()) for r in g}
        unanswered = [r for r in rows if r.id not in handled]
        if unanswered:  # a destination that says nothing about an instance: try it again later
            self._retry_rows(unanswered, j, "not_acknowledged")
        self._healthy(j)
        log.info(
            "upload_batch",
            destination=self.destination.label,
            rows=len(rows),
            sent=len(sent),
            dead=sum(len(g) for g in dead.values()),
            retry=sum(len(g) for g in retry.values()) + len(unanswered),
            bytes=sum(r.size for r in sent),
        )

    def _healthy(self, j: _Journal) -> None:
        if j.call(self.outbox.circuit_success):
            log.info("destination_recovered", destination=self.destination.label)
            self._wake.set()

    def _exhausted(self, row: OutboxRow, now: float) -> bool:
        return (
            row.attempts >= self.settings.max_attempts
            or now - row.created_at >= self.settings.max_age_hours * 3600.0
        )

    def _dead(self, rows: Sequence[OutboxRow], j: _Journal, reason: str) -> None:
        j.call(self.outbox.mark_dead, [r.id for r in rows], error=reason)
        metrics.UPLOAD_ATTEMPTS.labels(result="dead").inc(len(rows))
        log.warning(
            "upload_dead",
            rows=len(rows),
            reason=reason,
            sop_uids=[r.sop_instance_uid for r in rows][:5],
        )

    def _retry_rows(self, rows: Sequence[OutboxRow], j: _Journal, reason: str) -> None:
        """Per-row backoff (a transient failure of these instances, not of the destination)."""
        now = self._clock()
        gone = [r for r in rows if self._exhausted(r, now)]
        if gone:
            self._dead(gone, j, f"gave_up after {max(r.attempts for r in gone)} attempts: {reason}")
        for r in rows:
            if r not in gone:
                j.call(self.outbox.mark_retry, [r.id], error=reason, delay=self._jitter(r.attempts))
        if len(gone) < len(rows):
            metrics.UPLOAD_ATTEMPTS.labels(result="retry").inc(len(rows) - len(gone))

    def _outage(
        self,
        rows: list[OutboxRow],
        j: _Journal,
        reason: str,
        retry_after: float | None,
        started: float,
        *,
        probing: bool,
        auth: bool,
    ) -> None:
        """The destination failed as a whole: open (or keep open) the circuit; rows wait for it."""
        try:
            failures = self.outbox.consecutive_failures()
        except _STORAGE_ERRORS:
            failures = 0
        if retry_after is not None:
            delay = min(max(0.0, retry_after), RETRY_AFTER_MAX_SECONDS)
        else:
            delay = self._jitter(failures + 1)
        recorded = j.call(
            self.outbox.circuit_failure,
            reason,
            delay=delay,
            started_at=started,
            auth=auth,
            probing=probing,
        )
        # Not recorded yet: whether the outage was known is unknown; do not burn attempts.
        known = True if recorded is None else recorded
        # Attempts count only for the request that found an outage; credentials/redirect
        # problems never burn them (they are not the rows' fault). Age always applies.
        refund = probing or known or auth
        now = self._clock()
        max_age = self.settings.max_age_hours * 3600.0
        gone = [
            r
            for r in rows
            if (not refund and self._exhausted(r, now)) or now - r.created_at >= max_age
        ]
        if gone:
            self._dead(gone, j, f"gave_up: {reason}")
        waiting = [r.id for r in rows if r not in gone]
        if waiting:
            j.call(
                self.outbox.mark_retry, waiting, error=reason, delay=delay, refund_attempt=refund
            )
            metrics.UPLOAD_ATTEMPTS.labels(result="retry").inc(len(waiting))
        log.warning(
            "destination_failing",
            destination=self.destination.label,
            reason=reason,
            auth=auth,
            retry_in=round(delay, 3),
            consecutive_failures=failures + (0 if known else 1),
        )
