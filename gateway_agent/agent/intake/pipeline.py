"""Intake: de-identify ready inbox files in a process pool, commit them to the outbox, then dispose.

The order per file is fixed (design invariant 1): the engine writes the de-identified copy
atomically into the outbox folder, *then* the outbox row is committed, *then* the original is
removed, archived or remembered as kept. A crash at any instant leaves the original, the outbox
entry, or both. Files that cannot be processed go to the quarantine with a reason.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ...dicom.spool import source_of
from ...logs import describe_error, get_logger, short_hash
from ..metrics import FILES_RECEIVED, INTAKE_PAUSED
from .commit import GroupCommit, Job
from .originals import Originals
from .quarantine import Quarantine
from .worker import deid_jobs, init_worker, warm_up

if TYPE_CHECKING:  # the outbox's imports are not loaded for the type alone
    from ..outbox.store import Outbox

__all__ = ["DICOMDIR_NAME", "OUTBOX_DIR_MODE", "Intake"]

log = get_logger()

DICOMDIR_NAME = "DICOMDIR"
#: A file whose worker process died this many times is quarantined as ``internal_error``.
MAX_WORKER_CRASHES = 2
#: While intake is paused by its gate (disk guard), re-check the gate this often.
GATE_RECHECK_SECONDS = 5.0
#: Mode of the outbox files folder (the copies in it: ``OUTBOX_FILE_MODE``, set by the workers).
OUTBOX_DIR_MODE = 0o700
#: Tasks (one or more files each) handed to the pool per worker process at most ...
TASKS_PER_WORKER = 2
#: ... and files in one task, when more are queued than free tasks can take one by one: one
#: round trip to a worker process (the pool's threads, pickling, pipes) then serves several
#: files, while a lone file still goes alone, at once.
TASK_FILES = 4
#: Group commit: completions arriving within this long share one outbox transaction ...
GROUP_LINGER_SECONDS = 0.003
#: ... up to this many rows.
GROUP_MAX = 64
#: A file deferred for want of resources (disk full...) is offered again after this long,
#: doubling per consecutive deferral up to ``DEFER_MAX_SECONDS``.
DEFER_FIRST_SECONDS = 2.0
DEFER_MAX_SECONDS = 60.0
MAX_DEFERRALS_TRACKED = 100_000
#: Files queued at most besides those in flight: past that :meth:`Intake.submit` refuses, and
#: calls ``on_room`` once the queue is down to a quarter (memory stays bounded, whatever waits).
MAX_QUEUED = 2048


class Intake:
    """A bounded de-identification stage between the watcher and the outbox.

    Parameters
    ----------
    inbox, out_dir
        The watched inbox and the outbox files folder the engine writes into.
    engine
        A picklable ``Deidentifier``; each worker process receives it once (pool initializer).
    outbox
        Where committed rows go; ``add`` must be durable on return and idempotent.
    quarantine
        Where unprocessable inputs go.
    originals, archive_dir
        What to do with an original after its row is committed: ``delete``, ``archive``, ``keep``.
    workers
        Worker processes; at most ``TASKS_PER_WORKER * workers`` tasks of at most
        ``TASK_FILES`` files each are in flight.
    on_committed
        Called after each committed row (the daemon wakes the uploader).
    gate
        Checked before each file is taken; ``False`` pauses intake (the disk guard).
    state_dir
        Holds ``intake.db`` (the kept-originals index) when ``originals = "keep"``.
    resettle
        Called with a file that changed while it was processed (the watcher settles it again);
        by default it is simply queued again.
    retry_later
        Called with a file that could not be processed for want of resources (disk full, quota,
        no worker) and a delay: 2 s, doubling per consecutive deferral up to 60 s (the watcher
        offers it again then). Without it, the watcher's periodic scan offers it again.
    received
        The C-STORE listener's spool (``state/received``): a second inbox whose files are the
        agent's own, written durably by the listener. Their rows record ``source = "listener"``
        and the calling AE title (from the file's folder); their quarantine entries are named
        ``received/<folder>/<file>``. They are deleted after the commit (or archived under
        ``archive_dir/received/``); ``originals = "keep"`` applies to the inbox only.
    settle_seconds
        The watcher's settle time: a bad file younger than this is settled again before it is
        quarantined (it may still be written).
    monotonic
        The clock a bad file's settle time is measured on between two readings (tests inject
        one).
    """

    def __init__(
        self,
        *,
        inbox: Path,
        out_dir: Path,
        engine: Any,
        outbox: Outbox,
        quarantine: Quarantine,
        originals: Literal["delete", "archive", "keep"] = "delete",
        archive_dir: Path | None = None,
        workers: int = 1,
        on_committed: Callable[[], None] | None = None,
        gate: Callable[[], bool] | None = None,
        state_dir: Path | None = None,
        resettle: Callable[[Path], None] | None = None,
        retry_later: Callable[[Path, float], None] | None = None,
        received: Path | None = None,
        settle_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError('Argument "workers" must be at least 1.')
        self.inbox = Path(inbox).resolve()
        self.received = Path(received).resolve() if received is not None else None
        self.out_dir = Path(out_dir)
        self._engine = engine
        #: where operator releases of burned-in objects are recorded (see Quarantine.release)
        self._released = str(quarantine.released_dir)
        self._originals = Originals(
            originals, archive_dir=archive_dir, state_dir=Path(state_dir or out_dir.parent)
        )
        self._commit = GroupCommit(
            outbox=outbox,
            quarantine=quarantine,
            originals=self._originals,
            requeue=self._requeue,
            defer=self._defer,
            resettle=resettle,
            settle_seconds=settle_seconds,
            monotonic=monotonic,
        )
        self._workers = workers
        # Two tasks per worker: workers stay busy while the dispatcher commits rows.
        self._max_tasks = TASKS_PER_WORKER * workers
        self._tasks = 0  # tasks submitted and not completed
        self._on_committed = on_committed
        self._gate = gate
        self._retry_later = retry_later
        self._deferrals: dict[str, int] = {}  # path -> consecutive deferrals (bounded, see _defer)
        self._cond = threading.Condition()
        self._queue: dict[str, None] = {}
        self._inflight: dict[str, Job] = {}
        self._done: deque[Job] = deque()
        self._crashes: dict[str, int] = {}
        self._paused = False
        self._stopping = False
        self._pool: ProcessPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._refusing = False
        #: Called (from the dispatcher thread) when the queue has room again after a refusal.
        self.on_room: Callable[[], None] | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker pool and the dispatcher thread."""
        self.out_dir.mkdir(mode=OUTBOX_DIR_MODE, parents=True, exist_ok=True)
        self._pool = self._new_pool()
        # Start every worker now (engine unpickled, modules imported), not on the first files.
        for _ in range(self._workers):
            self._pool.submit(warm_up)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._thread.start()
        log.info("intake_started", workers=self._workers, originals=self._originals.policy)

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gateway_agent.deid"])
        return ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=ctx,
            initializer=init_worker,
            initargs=(self._engine, os.getpid()),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new files; let in-flight ones commit within ``timeout``; stop the pool.

        Files not committed by then stay in the inbox (their outputs, if any, are reconciled
        at the next start).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._originals.close()
        log.info("intake_stopped", committed=self.committed, quarantined=self.quarantined)

    @property
    def committed(self) -> int:
        """Rows committed (and originals disposed of) since the start."""
        return self._commit.committed

    def undeletable_originals(self) -> int:
        """Committed originals the inbox did not let intake remove (they stay, remembered)."""
        return self._originals.undeletable()

    @property
    def commit_problem(self) -> str | None:
        """Why the latest file could not be committed (EACCES on the inbox, an outbox folder
        that cannot be written...), or None when the latest file went through. Originals the
        inbox refused to give up count until they are removed (the next file's removal, or a
        scan once the inbox allows it)."""
        problem = self._commit.problem
        refused = problem is not None and problem is self._commit.refusal_problem
        if refused and not self._originals.undeletable():
            self._commit.problem = problem = None  # removed since, by a later pass
        return problem

    @property
    def quarantined(self) -> int:
        """Inputs quarantined since the start."""
        return self._commit.quarantined

    def alive(self) -> bool:
        """True while the dispatcher thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- control
    def submit(self, path: Path) -> bool:
        """Queue a complete inbox file (non-blocking; duplicates are ignored).

        Returns False when the queue is full (``MAX_QUEUED``): the caller offers it again after
        ``on_room`` is called.
        """
        key = str(path)
        with self._cond:
            if self._stopping or key in self._queue or key in self._inflight:
                return True
            if len(self._queue) >= MAX_QUEUED:
                self._refusing = True
                return False
            self._queue[key] = None
            self._cond.notify_all()
        return True

    def quarantine_deep(self, folder_fd: int, name: str, rel: str) -> None:
        """Quarantine a file whose path is too long to open by name (``path_too_long``), given
        as an open descriptor of its folder and its name (the watcher's ``on_deep``)."""
        FILES_RECEIVED.inc()
        self._commit.quarantine_at(folder_fd, name, rel)

    def set_paused(self, paused: bool) -> None:
        """Pause or resume taking new files (in-flight ones complete)."""
        with self._cond:
            self._paused = paused
            self._cond.notify_all()
        INTAKE_PAUSED.set(1 if paused else 0)
        log.info("intake_paused" if paused else "intake_resumed")

    @property
    def paused(self) -> bool:
        return self._paused

    def backlog(self) -> int:
        """Files queued or in flight."""
        with self._cond:
            return len(self._queue) + len(self._inflight) + len(self._done)

    def idle(self) -> bool:
        """Nothing queued, in flight or waiting to be committed."""
        return self.backlog() == 0

    # ----------------------------------------------------------------- dispatcher thread
    def _gate_open(self) -> bool:
        if self._paused:
            return False
        if self._gate is None:
            return True
        try:
            return bool(self._gate())
        except Exception as exc:
            log.error("intake_gate_failed", error=describe_error(exc))
            return True

    def _run(self) -> None:
        while True:
            launch: list[list[str]] = []
            with self._cond:
                while True:
                    if self._done:
                        break
                    if self._stopping:
                        if not self._inflight:
                            return
                    elif self._queue and self._tasks < self._max_tasks:
                        if self._gate_open():
                            break
                        self._cond.wait(GATE_RECHECK_SECONDS)
                        continue
                    self._cond.wait()
                done = list(self._done)
                self._done.clear()
                if not self._stopping and self._gate_open():
                    launch = self._take_batch()
                room = self._refusing and len(self._queue) <= MAX_QUEUED // 4
                if room:
                    self._refusing = False
            if room and self.on_room is not None:
                try:
                    self.on_room()
                except Exception as exc:
                    log.error("intake_on_room_failed", error=describe_error(exc))
            # Keep the workers busy first; then commit everything that completed as one group.
            for chunk in launch:
                self._launch(chunk)
            if done:
                group = self._linger(done)
                try:
                    self._finish_group(group)
                except Exception as exc:  # never let the dispatcher die; originals stay
                    log.error("intake_commit_failed", files=len(group), error=describe_error(exc))
                    self._commit.problem = f"cannot commit ({describe_error(exc)})"
                    self._release(group)

    def _take_batch(self) -> list[list[str]]:
        """Dequeue what the free tasks take, as one list of files per task (caller locks; the
        tasks are counted as running from here). Files are spread over the free tasks, at most
        ``TASK_FILES`` each; a file that crashed a worker runs alone, in a task of its own."""
        free = self._max_tasks - self._tasks
        if free <= 0 or not self._queue:
            return []
        per_task = min(TASK_FILES, max(1, -(-len(self._queue) // free)))
        chunks: list[list[str]] = []
        chunk: list[str] = []
        while self._queue and len(chunks) < free:
            path = next(iter(self._queue))
            if path in self._crashes:
                if self._inflight or chunks or chunk:
                    break
                del self._queue[path]
                chunks.append([path])
                break
            del self._queue[path]
            chunk.append(path)
            if len(chunk) == per_task:
                chunks.append(chunk)
                chunk = []
        if chunk:
            chunks.append(chunk)
        self._tasks += len(chunks)
        return chunks

    def _launch(self, paths: list[str]) -> None:
        """Hand ``paths`` to a worker process as one task (those still to be processed)."""
        jobs: list[Job] = []
        for path in paths:
            try:
                job = self._job(path)
            except Exception as exc:
                log.error("intake_launch_failed", file=short_hash(path), error=describe_error(exc))
                continue
            if job is not None:
                jobs.append(job)
        if not jobs:
            self._task_done()
            return
        assert self._pool is not None
        args = ([job.path for job in jobs], str(self.out_dir), self._released)
        try:
            try:
                future = self._pool.submit(deid_jobs, *args)
            except BrokenProcessPool:
                self._replace_pool()
                future = self._pool.submit(deid_jobs, *args)
        except Exception as exc:
            # No worker took them (e.g. none could be started on a full disk): they must not
            # stay "in flight", where every later offer of the same file would be ignored.
            log.error("intake_launch_failed", files=len(jobs), error=describe_error(exc))
            self._release(jobs)
            self._task_done()
            for job in jobs:
                self._defer(job.path)
            return
        for index, job in enumerate(jobs):
            job.future, job.index = future, index
        future.add_done_callback(functools.partial(self._completed, jobs))

    def _job(self, path: str) -> Job | None:
        """The job for ``path``, registered in flight; None when there is nothing to process
        (gone, not a regular file, already done) or it was dealt with here (DICOMDIR)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None  # already gone (processed, moved away): nothing to do
        if not stat.S_ISREG(st.st_mode):
            return None  # symlinks and specials are never taken
        origin = self._origin(path)
        if origin is None:
            log.warning("intake_outside_inbox", file=short_hash(path))
            return None
        rel, calling_ae = origin
        own = calling_ae is not None
        if not own and self._originals.already_done(Path(path), rel, st):
            return None
        FILES_RECEIVED.inc()
        if Path(path).name.upper() == DICOMDIR_NAME:
            # A media directory lists patients; it is not an instance to upload.
            self._commit.to_quarantine(
                path, rel, "dicomdir", "DICOMDIR media index is not uploaded"
            )
            return None
        job = Job(path, st.st_size, st.st_mtime_ns, rel=rel, calling_ae=calling_ae)
        with self._cond:
            self._inflight[path] = job
        return job

    def _completed(self, jobs: list[Job], _future: object = None) -> None:
        with self._cond:
            self._done.extend(jobs)
            self._tasks -= 1
            self._cond.notify_all()

    def _task_done(self) -> None:
        """A task counted as running that was not submitted after all."""
        with self._cond:
            self._tasks -= 1
            self._cond.notify_all()

    def _origin(self, path: str) -> tuple[str, str | None] | None:
        """``(name for the quarantine and archive, calling AE title)``: an inbox file has its
        inbox-relative name and no calling AE; a file of the listener's spool is
        ``received/<folder>/<file>`` with the calling AE of its folder. None: neither."""
        p = Path(path)
        for root, prefix in ((self.inbox, None), (self.received, "received")):
            if root is None:
                continue
            try:
                rel = p.relative_to(root)
                # The folder chain must stay inside the root (no symlinked folders).
                p.parent.resolve().relative_to(root)
            except (ValueError, OSError):
                continue
            if prefix is None:
                return str(rel), None
            return f"{prefix}/{rel}", source_of(p)
        return None

    def _replace_pool(self) -> None:
        old = self._pool
        self._pool = self._new_pool()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def _linger(self, done: list[Job]) -> list[Job]:
        """Under load, wait a moment (at most ``GROUP_LINGER_SECONDS``) so more completions
        share one commit. Not when nothing else is in flight (a lone file commits at once)."""
        deadline = time.monotonic() + GROUP_LINGER_SECONDS
        with self._cond:
            while (
                not self._stopping
                and len(done) + len(self._done) < GROUP_MAX
                and len(self._inflight) > len(done) + len(self._done)
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            done.extend(self._done)
            self._done.clear()
        return done

    def _release(self, jobs: list[Job]) -> None:
        with self._cond:
            for job in jobs:
                if self._inflight.get(job.path) is job:
                    del self._inflight[job.path]
            self._cond.notify_all()

    def _defer(self, path: str) -> None:
        """Have ``path`` offered again after a backoff (2 s doubling to 60 s per consecutive
        deferral), instead of waiting for the watcher's next full scan."""
        if self._retry_later is None:
            return
        if len(self._deferrals) >= MAX_DEFERRALS_TRACKED:
            self._deferrals.clear()  # bounded memory; the worst case is a shorter backoff
        n = self._deferrals.get(path, 0)
        self._deferrals[path] = min(n + 1, 16)  # 2 s * 2**16 is far past the cap already
        try:
            self._retry_later(Path(path), min(DEFER_MAX_SECONDS, DEFER_FIRST_SECONDS * 2**n))
        except Exception as exc:
            log.error("intake_retry_later_failed", error=describe_error(exc))

    def _requeue(self, path: str) -> None:
        with self._cond:
            if not self._stopping:
                self._queue[path] = None

    def _finish_group(self, jobs: list[Job]) -> None:
        """Completed jobs: worker deaths handled here, the rest committed as one group; then
        they leave the in-flight set, and the uploader is woken once per committed row."""
        survivors = [job for job in jobs if not self._worker_died(job)]
        committed = self._commit.finish(survivors)
        for job in committed:
            self._deferrals.pop(job.path, None)
            self._crashes.pop(job.path, None)
        self._release(jobs)
        # After the release, so a woken uploader sees this intake's backlog already shrunk.
        if self._on_committed is not None:
            for _ in committed:
                try:
                    self._on_committed()
                except Exception as err:
                    log.error("intake_on_committed_failed", error=describe_error(err))

    def _worker_died(self, job: Job) -> bool:
        """True if ``job``'s worker process died (the pool is broken); then the file is queued
        again, alone, or quarantined after ``MAX_WORKER_CRASHES`` deaths."""
        assert job.future is not None
        try:
            exc = job.future.exception()
        except Exception:
            return False  # the commit reports it
        if not isinstance(exc, BrokenProcessPool):
            return False
        if self._stopping:
            return True  # shutting down: the original stays in the inbox
        n = self._crashes.get(job.path, 0) + 1
        self._crashes[job.path] = n
        if self._pool is not None and getattr(self._pool, "_broken", False):
            self._replace_pool()
        log.error("intake_worker_died", file=short_hash(job.path), crashes=n)
        if n <= MAX_WORKER_CRASHES:
            self._requeue(job.path)
            return True
        self._crashes.pop(job.path, None)
        self._commit.to_quarantine(
            job.path,
            job.rel,
            "internal_error",
            "worker process died (a crash, or over the CPU time allowed per file)",
        )
        return True
