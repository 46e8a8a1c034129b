"""The upload workers of one destination: claim its due deliveries, send them, record the outcome.

The daemon runs one :class:`Uploader` per destination, each over that destination's deliveries
and circuit in the outbox (:meth:`Outbox.queue`), so one destination's outage, backoff or dead
rows never hold another back. Each worker repeats one step (:meth:`Uploader.loop_once`): ask
the destination circuit whether it may send, claim a batch (``batch_max_instances`` /
``batch_max_mb``), then send it and record the outcome (:mod:`.outcomes` says what each result
means). Workers sleep on an Event between due times (no busy polling); :meth:`wake` is called by
intake after adding rows.

Acknowledged rows are ``sent`` with their proof of storage pending. A worker with nothing to send
proves them, a page at a time (the destination's ``confirm``); while rows keep coming, a proof
is made first once one has waited :data:`PROOF_MAX_DELAY_SECONDS`. So the proof's cost stays off
the upload path during a burst, and retention never removes a copy before it.

If recording an outcome fails (the state disk is full, the database is locked), the worker retries
the writes not yet made (its :mod:`.journal`) before it claims anything new;
:meth:`Uploader.stop` tries once more and otherwise leaves the rows ``sending`` for
``requeue_stale`` at the next start (a re-send is harmless: the destination is idempotent per SOP
Instance UID). The rows' lease expiry remains the last resort.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from ...config import DestinationSettings
from ...logs import get_logger
from ..outbox.db import OutboxClosedError, OutboxRow
from ..outbox.store import DestinationQueue, Outbox
from .destinations import Destination
from .journal import RECORD_RETRY_MAX_SECONDS, Journal
from .outcomes import Outcomes

__all__ = [
    "BATCH_LINGER_SECONDS",
    "IDLE_MAX_SECONDS",
    "PROOF_MAX_DELAY_SECONDS",
    "PROOF_PAGE",
    "Uploader",
]

log = get_logger()

#: Longest sleep between checks when idle (new rows wake the workers earlier).
IDLE_MAX_SECONDS = 30.0
#: Acknowledged rows proven per storage check (DICOMweb: one query per study and 40 UIDs).
PROOF_PAGE = 200
#: An acknowledged row waits at most this long for its proof while rows keep being sent.
PROOF_MAX_DELAY_SECONDS = 30.0
#: While more rows are on their way (intake busy), a worker waits up to this long for a batch to
#: fill before it claims; one worker fills at a time while the others send.
BATCH_LINGER_SECONDS = 0.1


class Uploader:
    """Upload workers of one destination.

    Parameters
    ----------
    outbox, destination
        Where rows come from (the deliveries of the destination named ``settings.name``) and
        where they go.
    settings
        The destination's name, batch sizes, parallel requests, attempts, age and backoff
        (``DestinationSettings``).
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
        #: This destination's deliveries and circuit.
        self.outbox: DestinationQueue = outbox.queue(settings.name)
        self.name = settings.name
        self.destination = destination
        self.settings = settings
        self._clock = clock
        self._wake = threading.Event()
        self.outcomes = Outcomes(
            self.outbox,
            destination,
            settings,
            clock=clock,
            rng=rng or random.Random(),
            on_recovered=self._wake.set,
        )
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._in_flight: dict[int, list[int]] = {}
        self._in_flight_lock = threading.Lock()
        # Per worker (thread ident): an outcome whose recording failed, retried before new work.
        self._unrecorded: dict[int, Journal] = {}
        self.more_coming = more_coming
        self.linger_seconds = linger_seconds
        # One worker at a time fills and claims a batch; the others send theirs meanwhile.
        self._fill_lock = threading.Lock()
        self._arrived = threading.Condition()
        self._arrivals = 0
        self.max_bytes = max(1, int(settings.batch_max_mb * 1024 * 1024))
        # Proof of storage: one worker at a time proves a page of acknowledged rows, when there
        # is nothing to send or when a proof is overdue; a failed check waits its backoff.
        self._proving = threading.Lock()
        self._proof_lock = threading.Lock()
        self._proof_blocked_until = 0.0
        self._proof_looked_at = -1e9
        # A lease long enough for a batch, its split retries and its storage check, each request
        # within its deadline (sending a full batch at the slowest speed tolerated, then the
        # reply); claim() reclaims expired ones.
        slowest = self.max_bytes / (settings.min_kb_per_second * 1000.0)
        self.lease_seconds = settings.timeout_seconds * 8 + 2 * slowest + 60.0

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            raise RuntimeError("Uploader already started")
        self._stopping.clear()
        for i in range(self.settings.parallel_requests):
            t = threading.Thread(target=self._run, name=f"uploader-{self.name}-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        log.info(
            "uploader_started",
            destination=self.name,
            label=self.destination.label,
            workers=len(self._threads),
        )

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
            while t.is_alive():
                now_ref = time.time() if deadline > 1e9 else time.monotonic()
                if deadline <= now_ref:
                    break
                # Woken again and again: a worker that was busy when the first wake came (and
                # another one took it) would otherwise sleep its whole idle wait.
                self.wake()
                t.join(timeout=min(0.5, deadline - now_ref))
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
            log.warning("uploader_released_in_flight", destination=self.name, rows=len(leftover))
        self._threads = [t for t in self._threads if t.is_alive()]
        log.info("uploader_stopped", destination=self.name, still_running=len(self._threads))

    # -- the worker loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                backoff = self._retry_unrecorded()
                if backoff > 0:
                    self._stopping.wait(backoff)
                    continue
                handled, wait = self._step()
            except OutboxClosedError:
                # The agent stopped while this worker's request ran past the deadline: its rows
                # were released (sent again after the next start); nothing is left to record.
                log.debug("uploader_worker_ended", destination=self.name, reason="outbox_closed")
                return
            except Exception:  # never let a worker die: log and back off a little
                log.exception("uploader_step_failed", destination=self.name)
                self._stopping.wait(1.0)
                continue
            if handled:
                continue
            self._wake.wait(wait)
            if not self._stopping.is_set():  # a stop's wake is for every worker: left set
                self._wake.clear()

    def _idle_wait(self) -> float:
        due = self.outbox.next_due_at()
        wait = IDLE_MAX_SECONDS if due is None else max(0.01, due - self._clock())
        with self._proof_lock:
            blocked = self._proof_blocked_until - time.monotonic()
        if blocked > 0 and self.outbox.oldest_proof_pending_at() is not None:
            wait = min(wait, blocked + 0.01)  # a failed storage check is due again then
        return min(IDLE_MAX_SECONDS, wait)

    # -- proof of storage --------------------------------------------------------------------
    def _proof_overdue(self) -> bool:
        """Whether an acknowledged row has waited :data:`PROOF_MAX_DELAY_SECONDS` for its proof
        (looked up at most once a second): then proving comes before sending more."""
        now = time.monotonic()
        with self._proof_lock:
            if now < self._proof_looked_at + 1.0 or now < self._proof_blocked_until:
                return False
            self._proof_looked_at = now
        oldest = self.outbox.oldest_proof_pending_at()
        return oldest is not None and self._clock() - oldest >= PROOF_MAX_DELAY_SECONDS

    def _prove(self) -> int:
        """Prove one page of acknowledged rows (one worker at a time); returns rows checked."""
        if not self._proving.acquire(blocking=False):
            return 0
        try:
            with self._proof_lock:
                if time.monotonic() < self._proof_blocked_until:
                    return 0
            rows = self.outbox.awaiting_proof(PROOF_PAGE)
            if not rows:
                return 0
            journal = Journal([r.id for r in rows])
            wait = self.outcomes.prove(rows, journal)
            with self._proof_lock:
                self._proof_blocked_until = time.monotonic() + wait if wait > 0 else 0.0
            if journal.todo:
                with self._in_flight_lock:
                    self._unrecorded[threading.get_ident()] = journal
            return len(rows) if wait <= 0 else 0
        finally:
            self._proving.release()

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
        if not probing and self._proof_overdue():
            proved = self._prove()
            if proved:
                return proved, 0.0
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
            proved = 0 if probing else self._prove()  # nothing to send: prove what was sent
            return (proved, 0.0) if proved else (0, self._idle_wait())
        key = threading.get_ident()
        journal = Journal([r.id for r in rows])
        with self._in_flight_lock:
            self._in_flight[key] = journal.row_ids
        try:
            self.outcomes.deliver(rows, journal, probing=probing)
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
