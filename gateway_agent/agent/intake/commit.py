"""The group commit: completed de-identifications become outbox rows, then their originals go.

Invariant 1 holds per file: every output was made durable by its worker (temp, fsync, rename,
and the folder's fsync once per task) before the job completed; the group's rows are committed
(one ``BEGIN IMMEDIATE`` ... ``COMMIT`` with ``synchronous=FULL``) before any original of the
group is removed, archived or remembered as kept. A failed commit keeps every original of the
group.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..._exceptions import REASONS
from ...logs import describe_error, get_logger, short_hash
from ..metrics import DEID_SECONDS, DEIDENTIFIED
from .originals import Originals
from .quarantine import Quarantine
from .worker import FileIdentity, JobResult, identity_of

if TYPE_CHECKING:  # the outbox's imports are not loaded for the type alone
    from ..outbox.store import Outbox

__all__ = ["GroupCommit", "Job", "inbox_folder"]

log = get_logger()

#: What the ``originals`` policy does with an original, for the readiness detail.
_DISPOSE_VERB = {
    "delete": "remove originals from the inbox",
    "archive": "move originals from the inbox to the archive",
    "keep": "record kept originals",
}
#: Files found bad but possibly still being written, remembered to be quarantined only if they
#: come back unchanged (bounded: past this many, the oldest are forgotten).
MAX_SUSPECTS = 10_000


@dataclass
class Job:
    """One input handed to a worker: its size and mtime when taken, its inbox-relative name (or
    ``received/...`` for the listener's), and the calling AE title when it came over C-STORE."""

    path: str
    size: int
    mtime_ns: int
    rel: str
    future: Future[list[JobResult]] | None = None
    started: float = field(default_factory=time.perf_counter)
    calling_ae: str | None = None

    @property
    def source(self) -> str:
        """``"listener"`` for an instance received over C-STORE, else ``"inbox"``."""
        return "inbox" if self.calling_ae is None else "listener"

    #: Of the file the worker read (device, inode, size, mtime, ctime); set from its result.
    identity: FileIdentity | None = None
    #: Where this job's result is in its task's list of results (``future`` is the task's).
    index: int = 0

    def result(self) -> JobResult:
        """The worker's result for this file (the job must be done)."""
        assert self.future is not None
        return self.future.result()[self.index]


def inbox_folder(rel: str) -> str:
    """The sub-folder of the inbox a file was dropped into (its first folder), ``""`` for the
    inbox itself: what routing rules on ``inbox_folder`` match."""
    head, sep, _ = rel.partition("/")
    return head if sep else ""


class GroupCommit:
    """What completed jobs become: outbox rows (one transaction per group), quarantine entries, or
    files offered again; then the originals of the committed rows are disposed of.

    Parameters
    ----------
    outbox
        Where committed rows go; ``add`` must be durable on return and idempotent (``add_many``,
        when the sink has it, commits a group in one transaction).
    quarantine
        Where unprocessable inputs go.
    originals
        What to do with an original once its row is committed.
    requeue
        Queue a file again at once (it changed while it was processed and nobody re-settles it).
    defer
        Have a file offered again after a backoff (it could not be processed for want of
        resources).
    resettle
        Called with a file that changed while it was processed, or was found bad while it may
        still be written (the watcher settles it again); without it the file is requeued.
    settle_seconds
        A bad file modified less than this long ago may still be growing (a writer that appends
        in rounds): it is settled again, and quarantined only if it comes back unchanged after
        at least this long (or its modification time is that old).
    clock
        Wall clock, compared with the files' modification times.
    monotonic
        The clock the time between two readings of a suspect file is measured on.
    """

    def __init__(
        self,
        *,
        outbox: Outbox,
        quarantine: Quarantine,
        originals: Originals,
        requeue: Callable[[str], None],
        defer: Callable[[str], None],
        resettle: Callable[[Path], None] | None = None,
        settle_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._quarantine = quarantine
        self._originals = originals
        self._requeue = requeue
        self._defer = defer
        self._resettle = resettle
        self._settle = settle_seconds
        self._clock = clock
        self._monotonic = monotonic
        #: Bad files that may still be written: their identity, and when they were first found so.
        self._suspects: dict[str, tuple[FileIdentity, float]] = {}
        self.committed = 0
        self.quarantined = 0
        #: Why the latest file could not be committed, or None when the latest file went through
        #: (committed, or quarantined). Free of paths and PHI; ``/readyz`` reports it.
        self.problem: str | None = None
        #: The ``problem`` set when the inbox refused to give up originals (it clears once they
        #: are removed).
        self.refusal_problem: str | None = None

    def finish(self, jobs: list[Job]) -> list[Job]:
        """Classify completed jobs; commit the good ones in ONE outbox transaction; dispose of
        their originals. Returns the jobs committed (rows durable, originals disposed of)."""
        ready: list[tuple[Job, Any, float]] = []
        for job in jobs:
            try:
                item = self._prepare(job)
            except Exception as exc:
                # Unexpected (file system): keep the original; the next scan retries it.
                log.error(
                    "intake_commit_failed", file=short_hash(job.path), error=describe_error(exc)
                )
                self.problem = f"cannot take files from the inbox ({describe_error(exc)})"
                item = None
            if item is not None:
                ready.append((job, *item))
        if not ready:
            return []
        try:
            added = self._add_rows([(job, result) for job, result, _ in ready])
        except Exception as exc:
            for job, *_ in ready:
                log.error(
                    "intake_commit_failed", file=short_hash(job.path), error=describe_error(exc)
                )
            self.problem = f"cannot commit to the outbox ({describe_error(exc)})"
            return []
        committed: list[Job] = []
        # Only now, with the rows committed, may the originals go.
        for (job, result, seconds), new in zip(ready, added, strict=True):
            try:
                disposed = self._originals.dispose(
                    Path(job.path), job.rel, job.identity, own=job.calling_ae is not None
                )
            except Exception as exc:
                log.error(
                    "intake_commit_failed", file=short_hash(job.path), error=describe_error(exc)
                )
                self.problem = (
                    f"cannot {_DISPOSE_VERB[self._originals.policy]} "
                    f"({describe_error(exc)}): check the inbox's owner and mode"
                )
                continue
            if disposed == "refused":
                # Committed, but the inbox keeps the original (read-only, permissions): it is
                # remembered and not processed again; not ready until removals work again.
                self.problem = (
                    f"cannot {_DISPOSE_VERB[self._originals.policy]} "
                    f"({self._originals.refusal}): check the inbox's owner, mode and mount; "
                    "the originals stay and are not processed again"
                )
                self.refusal_problem = self.problem
            else:
                self.problem = None
            if disposed == "changed":
                # Its name now holds another file (replaced while this one was committed): that
                # one is offered again; the one processed is committed.
                self._offer_again(job.path)
            committed.append(job)
            self.committed += 1
            DEIDENTIFIED.inc()
            DEID_SECONDS.observe(seconds)
            log.debug(
                "deidentified",
                sop_instance_uid=result.sop_instance_uid,
                new=new,
                seconds=round(seconds, 4),
            )
        return committed

    def to_quarantine(
        self, path: str, rel: str, reason: str, detail: str, identity: FileIdentity | None = None
    ) -> None:
        """Move an input to the quarantine with its reason (gone already: nothing to do). With
        ``identity``, only that file: a file that took its name meanwhile is offered again."""
        if identity is not None and not _same(path, identity):
            self._offer_again(path)
            return
        try:
            self._quarantine.put(Path(path), reason, detail, original_name=rel)
        except FileNotFoundError:
            return
        self.quarantined += 1
        self.problem = None

    def quarantine_at(self, folder_fd: int, name: str, rel: str) -> None:
        """Quarantine a file too deep to open by name (``path_too_long``), by its folder's
        descriptor."""
        try:
            self._quarantine.put_at(
                folder_fd,
                name,
                "path_too_long",
                REASONS["path_too_long"],
                original_name=rel,
            )
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("intake_quarantine_failed", error=describe_error(exc))
            return
        self.quarantined += 1

    def _offer_again(self, path: str) -> None:
        """Let the watcher settle ``path`` again (or queue it again at once without one)."""
        if self._resettle is not None:
            if os.path.lexists(path):
                self._resettle(Path(path))
        else:
            self._requeue(path)

    def _prepare(self, job: Job) -> tuple[Any, float] | None:
        """Deal with a completed job, except its commit: ``(result, seconds)`` when it is to be
        committed, None when it was handled here (error, deferred, changed)."""
        kind, payload, detail, seconds, identity = job.result()
        job.identity = identity
        if kind == "transient":
            log.error("intake_deferred", file=short_hash(job.path), cause=detail)
            self.problem = f"cannot write de-identified files to the outbox folder ({detail})"
            self._defer(job.path)
            return None  # the original stays and is offered again later
        if kind == "changed" or (identity is None and not self._unchanged(job)):
            # Rewritten while we read it (or gone, or a link now): never act on bytes that may
            # mix two versions; let it settle again. (A file read whole and unchanged is
            # committed even if another took its name since: that one is left for the next
            # pass when the original is disposed of.)
            if kind == "changed" and payload is not None:
                self._discard_output(payload)
            self._offer_again(job.path)
            return None
        if kind == "error":
            if not self._settled(job):
                # Bad, but written a moment ago: maybe a writer that appends in rounds (a close
                # is no proof of completeness). Offered again once it stayed unchanged.
                self._offer_again(job.path)
                return None
            self.to_quarantine(job.path, job.rel, str(payload), detail, identity=identity)
            return None
        self._suspects.pop(job.path, None)
        return payload, seconds

    def _discard_output(self, result: Any) -> None:
        """Remove an output made from a file that changed while it was read, unless a row
        refers to it (then the next pass writes it again)."""
        get = getattr(self._outbox, "get", None)
        if get is not None and get(result.sop_instance_uid) is not None:
            return
        with contextlib.suppress(OSError):
            Path(result.path).unlink()

    def _settled(self, job: Job) -> bool:
        """True if a bad file may be quarantined: unchanged for the settle time (by its mtime, or
        found bad with this same identity at least the settle time before); otherwise it is
        remembered as a suspect. Two readings of one state moments apart are common: the close
        event of a writer's round can arrive after a read, started by the previous round's
        event, already saw that round's bytes. (A file that changed since it was read is never
        quarantined from that reading: ``to_quarantine`` checks.)"""
        identity = job.identity
        if identity is None:
            return True  # could not even be opened: nothing is being written into it
        now = self._monotonic()
        seen = self._suspects.pop(job.path, None)
        # Without a watcher to settle it again, a file is offered again at once: a second
        # reading of the same state is all the evidence there will be.
        waited = self._settle if self._resettle is not None else 0.0
        if seen is not None and seen[0] == identity and now - seen[1] >= waited:
            return True
        if self._clock() - identity[3] / 1e9 >= self._settle:
            return True
        if len(self._suspects) >= MAX_SUSPECTS:
            self._suspects.pop(next(iter(self._suspects)))
        self._suspects[job.path] = (
            seen if seen is not None and seen[0] == identity else (identity, now)
        )
        return False

    def _add_rows(self, done: list[tuple[Job, Any]]) -> list[bool]:
        rows = [
            {
                "sop_instance_uid": r.sop_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "series_instance_uid": r.series_instance_uid,
                "sop_class_uid": r.sop_class_uid,
                "path": r.path,
                "size": r.size,
                "audit": r.audit,
                "scanner": getattr(r, "scanner", None) or None,
                "source": job.source,
                "calling_ae": job.calling_ae,
                "modality": r.modality,
                "inbox_folder": inbox_folder(job.rel),
            }
            for job, r in done
        ]
        add_many = getattr(self._outbox, "add_many", None)
        if add_many is not None:
            return list(add_many(rows))
        return [self._outbox.add(**row) for row in rows]  # a sink without group commit

    @staticmethod
    def _unchanged(job: Job) -> bool:
        if job.identity is not None:
            return _same(job.path, job.identity)
        try:
            st = os.lstat(job.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (job.size, job.mtime_ns)


def _same(path: str, identity: FileIdentity) -> bool:
    """True if ``path`` still names the file with ``identity`` (same inode, size, times)."""
    try:
        return identity_of(os.lstat(path)) == identity
    except OSError:
        return False
