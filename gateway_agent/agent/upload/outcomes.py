"""What a batch's result means: rows to ``sent``, ``dead`` or back to ``queued``; the circuit.

The mapping follows the destination contract (``destinations/__init__.py``):

* acknowledged instances → ``sent`` (with the destination's warning, if any, kept on the row),
  their proof of storage pending; :meth:`Outcomes.prove` later asks the destination's
  ``confirm``: proven → ``confirmed``; not found → sent again a few times, then ``dead``
  (``not_stored_after_ack``); no proof possible → kept unproven;
* a per-instance permanent failure → ``dead`` with the server's reason;
* a per-instance transient failure → ``queued`` with the row's own backoff;
* a whole-request retriable failure (network, timeout, 408, 429, 5xx, a reply that is not an
  answer), a refusal of the agent (401/403, a redirect), or a wrong address (404/405/501 to the
  request: no such service or bucket) → the destination circuit opens: one probe at a time,
  exponential backoff with full jitter (``Retry-After`` honoured); the rows wait without burning
  their attempts once the outage is known (never, for a refusal or wrong address);
* a whole-request permanent failure (400 for a single instance, 415, ...) → ``dead``.

Rows whose attempts or age are exhausted go to ``dead``. Every outbox write goes through the
batch's :class:`~gateway_agent.agent.upload.journal.Journal`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence

from ..._exceptions import PermanentUploadError, RetryableUploadError, UploadError
from ...config import DestinationSettings
from ...logs import get_logger
from .. import metrics
from ..outbox.db import OutboxRow
from ..outbox.store import DestinationQueue
from .destinations import (
    MISCONFIGURED_STATUSES,
    NOT_STORED_MAX_ATTEMPTS,
    NOT_STORED_RETRY_SECONDS,
    REFUSAL_STATUSES,
    Destination,
    SendResult,
)
from .journal import STORAGE_ERRORS, Journal

__all__ = ["NOT_STORED", "RETRY_AFTER_MAX_SECONDS", "Outcomes", "full_jitter"]

log = get_logger()

#: Longest wait honoured from a Retry-After header.
RETRY_AFTER_MAX_SECONDS = 3600.0
#: The reason of an instance the destination acknowledged but its storage check did not find.
NOT_STORED = "not_stored_after_ack"


def full_jitter(rng: random.Random, attempt: int, base: float, cap: float) -> float:
    """AWS "full jitter": uniform in ``[0, min(cap, base * 2**attempt)]``."""
    return rng.uniform(0.0, min(cap, base * (2.0 ** min(attempt, 60))))


class Outcomes:
    """Send one batch and record its outcome in the outbox (rows and destination circuit).

    Parameters
    ----------
    outbox
        The destination's deliveries and circuit.
    destination, settings
        As the :class:`~gateway_agent.agent.upload.uploader.Uploader`'s.
    clock
        Wall clock (the outbox's).
    rng
        Source of jitter (seeded in tests).
    on_recovered
        Called when an answer closed an open circuit (the uploader wakes its waiting workers).
    """

    def __init__(
        self,
        outbox: DestinationQueue,
        destination: Destination,
        settings: DestinationSettings,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        on_recovered: Callable[[], None],
    ) -> None:
        self.outbox = outbox
        self.name = outbox.name
        self.destination = destination
        self.settings = settings
        self._clock = clock
        self._rng = rng
        self._rng_lock = threading.Lock()
        self._on_recovered = on_recovered
        self._check_failures = 0
        self._unprovable_said = False

    def jitter(self, attempt: int) -> float:
        """A backoff for ``attempt``: full jitter within the settings' base and cap."""
        with self._rng_lock:
            return full_jitter(
                self._rng,
                attempt,
                self.settings.backoff_base_seconds,
                self.settings.backoff_cap_seconds,
            )

    def deliver(self, rows: list[OutboxRow], j: Journal, *, probing: bool) -> None:
        """Send ``rows`` to the destination and record the outcome (every write through ``j``)."""
        started = self._clock()
        t0 = time.monotonic()
        try:
            result = self.destination.send(rows)
        except UploadError as exc:
            self.request_failed(rows, j, exc, started, probing=probing)
            return
        except Exception as exc:  # a bug or an unexpected library error: retry the rows later
            log.exception("upload_unexpected_error", rows=len(rows))
            self.retry(rows, j, f"internal_error: {type(exc).__name__}")
            return
        finally:
            metrics.UPLOAD_SECONDS.labels(destination=self.name).observe(time.monotonic() - t0)
        self.record(rows, j, result)

    def request_failed(
        self, rows: list[OutboxRow], j: Journal, exc: UploadError, started: float, *, probing: bool
    ) -> None:
        """A whole request failed: an outage, a refusal, a wrong address, or bad bytes."""
        reason = str(exc)
        if isinstance(exc, RetryableUploadError):
            self.outage(rows, j, reason, exc.retry_after, started, probing=probing, auth=False)
        elif isinstance(exc, PermanentUploadError) and exc.status in REFUSAL_STATUSES:
            self.outage(rows, j, reason, None, started, probing=probing, auth=True)
        elif isinstance(exc, PermanentUploadError) and exc.status in MISCONFIGURED_STATUSES:
            # A wrong address: the rows are not at fault, and it will not pass by itself.
            self.outage(
                rows, j, reason, None, started, probing=probing, auth=False, refund_always=True
            )
        else:
            self.dead(rows, j, reason)
            self.healthy(j)  # the server answered: it is not down

    def record(self, rows: list[OutboxRow], j: Journal, result: SendResult) -> None:
        by_uid = {r.sop_instance_uid: r for r in rows}
        sent = [by_uid[u] for u in dict.fromkeys(result.sent) if u in by_uid]
        if sent:
            warned: dict[str, list[int]] = {}
            for r in sent:
                note = result.warnings.get(r.sop_instance_uid)
                if note:
                    warned.setdefault(note, []).append(r.id)
            plain = [r.id for r in sent if not result.warnings.get(r.sop_instance_uid)]
            if plain:
                j.call(self.outbox.mark_sent, plain)  # proof of storage pending
            for note, ids in warned.items():
                # Stored, with the destination's warning kept on the row (e.g. coercion).
                j.call(self.outbox.mark_sent, ids, warning=note)
                log.warning("upload_warning", destination=self.name, rows=len(ids), warning=note)
            metrics.UPLOAD_ATTEMPTS.labels(destination=self.name, result="sent").inc(len(sent))
            metrics.BYTES_SENT.labels(destination=self.name).inc(sum(r.size for r in sent))
            metrics.LAST_UPLOAD_SUCCESS.labels(destination=self.name).set(time.time())
        dead: dict[str, list[OutboxRow]] = {}
        retry: dict[str, list[OutboxRow]] = {}
        sent_ids = {r.id for r in sent}
        for uid, (permanent, reason) in result.failed.items():
            row = by_uid.get(uid)
            if row is None or row.id in sent_ids:
                continue
            (dead if permanent else retry).setdefault(reason, []).append(row)
        for reason, group in dead.items():
            self.dead(group, j, reason)
        for reason, group in retry.items():
            self.retry(group, j, reason)
        handled = sent_ids | {r.id for g in (*dead.values(), *retry.values()) for r in g}
        unanswered = [r for r in rows if r.id not in handled]
        if unanswered:  # a destination that says nothing about an instance: try it again later
            self.retry(unanswered, j, "not_acknowledged")
        self.healthy(j)
        log.info(
            "upload_batch",
            destination=self.name,
            rows=len(rows),
            sent=len(sent),
            dead=sum(len(g) for g in dead.values()),
            retry=sum(len(g) for g in retry.values()) + len(unanswered),
            bytes=sum(r.size for r in sent),
        )

    # -- proof of storage ----------------------------------------------------------------------
    def prove(self, rows: list[OutboxRow], j: Journal) -> float:
        """Ask the destination to prove it holds ``rows`` (sent, proof pending) and record it.

        Proven rows become ``confirmed``; rows it did not find go back to be sent again, or to
        ``dead`` (:meth:`not_stored`); a destination that cannot prove storage (``confirm``
        returns None, or has none) leaves them unproven, kept. Returns 0, or after a failed
        check the seconds to wait before the next (the failure is noted for ``status``).
        """
        confirm = getattr(self.destination, "confirm", None)
        try:
            proven = None if confirm is None else confirm(rows)
        except Exception as exc:
            if not isinstance(exc, UploadError):
                log.exception("storage_check_unexpected_error", rows=len(rows))
            retry_after = exc.retry_after if isinstance(exc, UploadError) else None
            with self._rng_lock:
                self._check_failures += 1
                failures = self._check_failures
            delay = retry_after if retry_after is not None else self.jitter(failures)
            j.call(self.outbox.circuit_note, f"storage_check {exc}")
            log.warning(
                "storage_check_failed",
                destination=self.name,
                rows=len(rows),
                error=str(exc)[:200],
                retry_in=round(delay, 3),
            )
            return max(delay, self.settings.backoff_base_seconds)
        with self._rng_lock:
            self._check_failures = 0
        if proven is None:
            j.call(self.outbox.mark_proven, [r.id for r in rows], proven=False)
            if not self._unprovable_said:
                self._unprovable_said = True
                log.warning(
                    "storage_not_provable",
                    destination=self.name,
                    detail="acknowledged instances count as delivered without proof; their "
                    "outbox files are kept unless disk.keep_unconfirmed is false",
                )
            return 0.0
        found = [r for r in rows if r.sop_instance_uid in proven]
        missing = [r for r in rows if r.sop_instance_uid not in proven]
        if found:
            j.call(self.outbox.mark_proven, [r.id for r in found])
            metrics.UPLOAD_ATTEMPTS.labels(destination=self.name, result="proven").inc(len(found))
        if missing:
            self.not_stored(missing, j)
        log.info(
            "storage_proven",
            destination=self.name,
            rows=len(rows),
            proven=len(found),
            not_stored=len(missing),
        )
        return 0.0

    def not_stored(self, rows: Sequence[OutboxRow], j: Journal) -> None:
        """Acknowledged, yet the storage check did not find them: send again a few times (at
        least :data:`NOT_STORED_RETRY_SECONDS` apart), then ``dead``; ``status`` shows it."""
        limit = min(NOT_STORED_MAX_ATTEMPTS, self.settings.max_attempts)
        aged = self.aged_out(rows)
        gone = [r for r in rows if r.attempts >= limit or r.id in aged]
        again = []
        for r in rows:
            if r not in gone:
                with self._rng_lock:
                    again.append((r.id, NOT_STORED_RETRY_SECONDS * (1.0 + self._rng.random())))
        j.call(self.outbox.mark_not_stored, again, [r.id for r in gone], error=NOT_STORED)
        metrics.UPLOAD_ATTEMPTS.labels(destination=self.name, result="not_stored").inc(len(rows))
        j.call(
            self.outbox.circuit_note,
            f"{NOT_STORED}: acknowledged {len(rows)} instance(s) the storage check did not find",
        )
        log.warning(
            "upload_not_stored",
            destination=self.name,
            rows=len(rows),
            dead=len(gone),
            sop_uids=[r.sop_instance_uid for r in rows][:5],
        )
        if again:
            self._on_recovered()  # wake the workers' timers for the rows sent again

    def healthy(self, j: Journal) -> None:
        if j.call(self.outbox.circuit_success):
            log.info("destination_recovered", destination=self.name)
            self._on_recovered()

    def aged_out(self, rows: Sequence[OutboxRow]) -> set[int]:
        """The rows waiting for ``max_age_hours`` or more, asked of the outbox (whose clock
        follows a wall clock that was set: a jump never makes rows old); from the rows as
        claimed when the outbox cannot answer."""
        max_age = self.settings.max_age_hours * 3600.0
        try:
            return self.outbox.aged_out([r.id for r in rows], max_age)
        except STORAGE_ERRORS:
            now = self._clock()
            return {r.id for r in rows if now - r.created_at >= max_age}

    def dead(self, rows: Sequence[OutboxRow], j: Journal, reason: str) -> None:
        j.call(self.outbox.mark_dead, [r.id for r in rows], error=reason)
        metrics.UPLOAD_ATTEMPTS.labels(destination=self.name, result="dead").inc(len(rows))
        log.warning(
            "upload_dead",
            destination=self.name,
            rows=len(rows),
            reason=reason,
            sop_uids=[r.sop_instance_uid for r in rows][:5],
        )

    def retry(self, rows: Sequence[OutboxRow], j: Journal, reason: str) -> None:
        """Per-row backoff (a transient failure of these instances, not of the destination)."""
        aged = self.aged_out(rows)
        gone = [r for r in rows if r.attempts >= self.settings.max_attempts or r.id in aged]
        if gone:
            self.dead(gone, j, f"gave_up after {max(r.attempts for r in gone)} attempts: {reason}")
        for r in rows:
            if r not in gone:
                j.call(self.outbox.mark_retry, [r.id], error=reason, delay=self.jitter(r.attempts))
        if len(gone) < len(rows):
            metrics.UPLOAD_ATTEMPTS.labels(destination=self.name, result="retry").inc(
                len(rows) - len(gone)
            )

    def outage(
        self,
        rows: list[OutboxRow],
        j: Journal,
        reason: str,
        retry_after: float | None,
        started: float,
        *,
        probing: bool,
        auth: bool,
        refund_always: bool = False,
    ) -> None:
        """The destination failed as a whole: open (or keep open) the circuit; rows wait for it.

        ``auth`` (refused credentials) and ``refund_always`` (a wrong address) never burn the
        rows' attempts: they are not the rows' fault and will not pass by themselves."""
        try:
            failures = self.outbox.consecutive_failures()
        except STORAGE_ERRORS:
            failures = 0
        if retry_after is not None:
            delay = min(max(0.0, retry_after), RETRY_AFTER_MAX_SECONDS)
        else:
            delay = self.jitter(failures + 1)
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
        refund = probing or known or auth or refund_always
        aged = self.aged_out(rows)
        gone = [
            r
            for r in rows
            if (not refund and r.attempts >= self.settings.max_attempts) or r.id in aged
        ]
        if gone:
            self.dead(gone, j, f"gave_up: {reason}")
        waiting = [r.id for r in rows if r not in gone]
        if waiting:
            j.call(
                self.outbox.mark_retry, waiting, error=reason, delay=delay, refund_attempt=refund
            )
            metrics.UPLOAD_ATTEMPTS.labels(destination=self.name, result="retry").inc(len(waiting))
        log.warning(
            "destination_failing",
            destination=self.name,
            reason=reason,
            auth=auth,
            retry_in=round(delay, 3),
            consecutive_failures=failures + (0 if known else 1),
        )
