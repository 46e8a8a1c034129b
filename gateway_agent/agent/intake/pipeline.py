"""Intake: de-identify ready inbox files in a process pool, commit them to the outbox, then dispose.

The order per file is fixed (design invariant 1): the engine writes the de-identified copy
atomically into the outbox folder, *then* the outbox row is committed, *then* the original is
removed, archived or remembered as kept. A crash at any instant leaves the original, the outbox
entry, or both. Files that cannot be processed go to the quarantine with a reason.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import multiprocessing
import os
import select
import signal
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ..._exceptions import IngestError
from ...logs import describe_error, get_logger, short_hash
from ..metrics import DEID_SECONDS, DEIDENTIFIED, FILES_RECEIVED, INTAKE_PAUSED
from .quarantine import Quarantine, move_file

__all__ = [
    "DICOMDIR_NAME",
    "OUTBOX_DIR_MODE",
    "OUTBOX_FILE_MODE",
    "Intake",
    "OutboxSink",
]

log = get_logger()

DICOMDIR_NAME = "DICOMDIR"
#: A file whose worker process died this many times is quarantined as ``internal_error``.
MAX_WORKER_CRASHES = 2
#: While intake is paused by its gate (disk guard), re-check the gate this often.
GATE_RECHECK_SECONDS = 5.0
#: Mode of the de-identified copies in the outbox folder, and of that folder.
OUTBOX_FILE_MODE = 0o600
OUTBOX_DIR_MODE = 0o700
#: Group commit: completions arriving within this long share one outbox transaction ...
GROUP_LINGER_SECONDS = 0.003
#: ... up to this many rows.
GROUP_MAX = 64
#: A file deferred for want of resources (disk full...) is offered again after this long,
#: doubling per consecutive deferral up to ``DEFER_MAX_SECONDS``.
DEFER_FIRST_SECONDS = 2.0
DEFER_MAX_SECONDS = 60.0
MAX_DEFERRALS_TRACKED = 100_000


class OutboxSink(Protocol):
    """The part of the outbox intake needs (``gateway_agent.agent.outbox.Outbox``)."""

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
    ) -> bool: ...


# ----------------------------------------------------------------------------- worker side
_ENGINE: Any = None

_JobResult = tuple[Literal["ok", "error", "transient"], Any, str, float]


def _init_worker(engine: Any, agent_pid: int) -> None:
    """Pool initializer: keep the (picklable) Deidentifier for every job of this process."""
    global _ENGINE
    _ENGINE = engine
    # Signals are the parent's business: it drains the pool on SIGTERM/SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_agent(agent_pid)


def _die_with_agent(agent_pid: int) -> None:
    """If the agent is killed (-9), its pool workers must not linger and write on their own.

    The workers are children of the forkserver, which itself waits for them, so nobody would
    ever tell them: a thread blocks on a pidfd of the agent (no polling) and exits the worker
    when the agent is gone. Where pidfds are unavailable it checks once a second.
    """
    try:
        fd: int | None = os.pidfd_open(agent_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the agent has exited
        else:
            while True:
                try:
                    os.kill(agent_pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="agent-watch", daemon=True).start()


def _warm_up() -> None:
    """A no-op job: makes the pool start its worker processes ahead of the first file."""


def _deid_job(src: str, out_dir: str) -> _JobResult:
    """Run in a worker: de-identify one file. Never raises; errors come back as data.

    (IngestError carries ``reason`` outside ``args``, so it does not survive pickling as is.)
    """
    t0 = time.perf_counter()
    try:
        result = _ENGINE.deidentify_file(Path(src), Path(out_dir))
        # The engine's atomic write leaves outputs 0644 (a general-purpose writer); outbox
        # copies are the agent's own: 0600 (in a 0700 folder), before the row is committed.
        Path(result.path).chmod(OUTBOX_FILE_MODE)
    except IngestError as exc:
        return "error", exc.reason, exc.detail, time.perf_counter() - t0
    except MemoryError:
        return "error", "too_large", "out of memory", time.perf_counter() - t0
    except OSError as exc:
        # The engine reports input problems as DeidError; an OSError is the output side (disk
        # full, quota, permissions): not the input's fault, so the original stays for later.
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        return "transient", "resource", name, time.perf_counter() - t0
    except Exception as exc:  # a bug in the engine must not stop the daemon
        return "error", "internal_error", type(exc).__name__, time.perf_counter() - t0
    return "ok", result, "", time.perf_counter() - t0


# ----------------------------------------------------------------------------- parent side
@dataclass
class _Job:
    path: str
    size: int
    mtime_ns: int
    future: Future[_JobResult] | None = None
    started: float = field(default_factory=time.perf_counter)
    rel: str | None = None  # the inbox-relative name, checked when the job was launched


class _KeptIndex:
    """Inputs already processed under ``originals = "keep"``: path hash, size, mtime (SQLite)."""

    def __init__(self, db_path: Path) -> None:
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.execute("pragma journal_mode=wal")
        self._conn.execute(
            "create table if not exists kept (key text primary key, created real not null)"
        )
        self._lock = threading.Lock()

    @staticmethod
    def key(rel: str, size: int, mtime_ns: int) -> str:
        return hashlib.sha256(f"{rel}\0{size}\0{mtime_ns}".encode()).hexdigest()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            row = self._conn.execute("select 1 from kept where key = ?", (key,)).fetchone()
        return row is not None

    def add(self, key: str) -> None:
        with self._lock:
            self._conn.execute(
                "insert or ignore into kept (key, created) values (?, ?)", (key, time.time())
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


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
        Worker processes; at most ``4 * workers`` files are in flight.
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
    """

    def __init__(
        self,
        *,
        inbox: Path,
        out_dir: Path,
        engine: Any,
        outbox: OutboxSink,
        quarantine: Quarantine,
        originals: Literal["delete", "archive", "keep"] = "delete",
        archive_dir: Path | None = None,
        workers: int = 1,
        on_committed: Callable[[], None] | None = None,
        gate: Callable[[], bool] | None = None,
        state_dir: Path | None = None,
        resettle: Callable[[Path], None] | None = None,
        retry_later: Callable[[Path, float], None] | None = None,
    ) -> None:
        if originals == "archive" and archive_dir is None:
            raise ValueError('Argument "archive_dir" is required when originals is "archive".')
        if workers < 1:
            raise ValueError('Argument "workers" must be at least 1.')
        self.inbox = Path(inbox).resolve()
        self.out_dir = Path(out_dir)
        self._engine = engine
        self._outbox = outbox
        self._quarantine = quarantine
        self._originals = originals
        self._archive_dir = Path(archive_dir) if archive_dir is not None else None
        self._workers = workers
        # A few per worker: workers stay busy while the dispatcher commits rows.
        self._max_inflight = 4 * workers
        self._on_committed = on_committed
        self._gate = gate
        self._resettle = resettle
        self._retry_later = retry_later
        self._deferrals: dict[str, int] = {}  # path -> consecutive deferrals (bounded, see _defer)
        self._kept = (
            _KeptIndex(Path(state_dir or out_dir.parent) / "intake.db")
            if originals == "keep"
            else None
        )
        self._cond = threading.Condition()
        self._queue: dict[str, None] = {}
        self._inflight: dict[str, _Job] = {}
        self._done: deque[_Job] = deque()
        self._crashes: dict[str, int] = {}
        self._paused = False
        self._stopping = False
        self._pool: ProcessPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self.committed = 0
        self.quarantined = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker pool and the dispatcher thread."""
        self.out_dir.mkdir(mode=OUTBOX_DIR_MODE, parents=True, exist_ok=True)
        self._pool = self._new_pool()
        # Start every worker now (engine unpickled, modules imported), not on the first files.
        for _ in range(self._workers):
            self._pool.submit(_warm_up)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._thread.start()
        log.info("intake_started", workers=self._workers, originals=self._originals)

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gateway_agent.deid"])
        return ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=ctx,
            initializer=_init_worker,
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
        if self._kept is not None:
            self._kept.close()
        log.info("intake_stopped", committed=self.committed, quarantined=self.quarantined)

    def alive(self) -> bool:
        """True while the dispatcher thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- control
    def submit(self, path: Path) -> None:
        """Queue a complete inbox file (non-blocking; duplicates are ignored)."""
        key = str(path)
        with self._cond:
            if self._stopping or key in self._queue or key in self._inflight:
                return
            self._queue[key] = None
            self._cond.notify_all()

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
            launch: list[str] = []
            with self._cond:
                while True:
                    if self._done:
                        break
                    if self._stopping:
                        if not self._inflight:
                            return
                    elif self._queue and len(self._inflight) < self._max_inflight:
                        if self._gate_open():
                            break
                        self._cond.wait(GATE_RECHECK_SECONDS)
                        continue
                    self._cond.wait()
                done = list(self._done)
                self._done.clear()
                if not self._stopping and self._gate_open():
                    launch = self._take_batch()
            # Keep the workers busy first; then commit everything that completed as one group.
            for path in launch:
                try:
                    self._launch(path)
                except Exception as exc:
                    log.error(
                        "intake_launch_failed", file=short_hash(path), error=describe_error(exc)
                    )
            if done:
                group = self._linger(done)
                try:
                    self._finish_group(group)
                except Exception as exc:  # never let the dispatcher die; originals stay
                    log.error("intake_commit_failed", files=len(group), error=describe_error(exc))
                    self._release(group)

    def _take_batch(self) -> list[str]:
        """Dequeue what fits in the pool; a file that crashed a worker runs alone (caller locks)."""
        batch: list[str] = []
        room = self._max_inflight - len(self._inflight)
        while self._queue and room > 0:
            path = next(iter(self._queue))
            if path in self._crashes:
                if self._inflight or batch:
                    break
                del self._queue[path]
                return [path]
            del self._queue[path]
            batch.append(path)
            room -= 1
        return batch

    def _launch(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            return  # already gone (processed, moved away): nothing to do
        if not stat.S_ISREG(st.st_mode):
            return  # symlinks and specials are never taken
        rel = self._relative(path)
        if rel is None:
            log.warning("intake_outside_inbox", file=short_hash(path))
            return
        if self._kept is not None and _KeptIndex.key(rel, st.st_size, st.st_mtime_ns) in self._kept:
            return
        FILES_RECEIVED.inc()
        if Path(path).name.upper() == DICOMDIR_NAME:
            # A media directory lists patients; it is not an instance to upload.
            self._to_quarantine(path, rel, "dicomdir", "DICOMDIR media index is not uploaded")
            return
        job = _Job(path, st.st_size, st.st_mtime_ns, rel=rel)
        with self._cond:
            self._inflight[path] = job
        assert self._pool is not None
        try:
            try:
                job.future = self._pool.submit(_deid_job, path, str(self.out_dir))
            except BrokenProcessPool:
                self._replace_pool()
                job.future = self._pool.submit(_deid_job, path, str(self.out_dir))
        except BaseException:
            # No worker took it (e.g. none could be started on a full disk): it must not stay
            # "in flight", where every later offer of the same file would be ignored.
            self._release([job])
            self._defer(path)
            raise
        job.future.add_done_callback(functools.partial(self._completed, job))

    def _completed(self, job: _Job, _future: object = None) -> None:
        with self._cond:
            self._done.append(job)
            self._cond.notify_all()

    def _relative(self, path: str) -> str | None:
        p = Path(path)
        try:
            rel = p.relative_to(self.inbox)
            # The folder chain must stay inside the inbox (no symlinked folders).
            p.parent.resolve().relative_to(self.inbox)
        except (ValueError, OSError):
            return None
        return str(rel)

    def _replace_pool(self) -> None:
        old = self._pool
        self._pool = self._new_pool()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def _linger(self, done: list[_Job]) -> list[_Job]:
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

    def _release(self, jobs: list[_Job]) -> None:
        with self._cond:
            for job in jobs:
                if self._inflight.get(job.path) is job:
                    del self._inflight[job.path]
            self._cond.notify_all()

    def _finish_group(self, jobs: list[_Job]) -> None:
        """Classify completed jobs; commit the good ones in ONE outbox transaction; dispose.

        Invariant 1 holds per file: every output was made durable by its worker (temp, fsync,
        rename, folder fsync) before the job completed; the group's rows are committed (one
        ``BEGIN IMMEDIATE`` ... ``COMMIT`` with ``synchronous=FULL``) before any original of the
        group is removed. A failed commit keeps every original of the group.
        """
        ready: list[tuple[_Job, str, Any, float]] = []
        handled: list[_Job] = []
        for job in jobs:
            try:
                item = self._prepare(job)
            except Exception as exc:
                # Unexpected (file system): keep the original; the next scan retries it.
                log.error(
                    "intake_commit_failed", file=short_hash(job.path), error=describe_error(exc)
                )
                item = None
            if item is None:
                handled.append(job)
            else:
                ready.append((job, *item))
        committed = 0
        if ready:
            try:
                added = self._add_rows([r[2] for r in ready])
            except Exception as exc:
                for job, *_ in ready:
                    log.error(
                        "intake_commit_failed",
                        file=short_hash(job.path),
                        error=describe_error(exc),
                    )
                handled += [r[0] for r in ready]
                ready = []
                added = []
            # Only now, with the rows committed, may the originals go.
            for (job, rel, result, seconds), new in zip(ready, added, strict=True):
                try:
                    self._dispose(job, rel)
                except Exception as exc:
                    log.error(
                        "intake_commit_failed",
                        file=short_hash(job.path),
                        error=describe_error(exc),
                    )
                    continue
                committed += 1
                self.committed += 1
                self._deferrals.pop(job.path, None)
                DEIDENTIFIED.inc()
                DEID_SECONDS.observe(seconds)
                self._crashes.pop(job.path, None)
                log.debug(
                    "deidentified",
                    sop_instance_uid=result.sop_instance_uid,
                    new=new,
                    seconds=round(seconds, 4),
                )
        self._release(handled + [r[0] for r in ready])
        # After the release, so a woken uploader sees this intake's backlog already shrunk.
        if self._on_committed is not None:
            for _ in range(committed):
                try:
                    self._on_committed()
                except Exception as err:
                    log.error("intake_on_committed_failed", error=describe_error(err))

    def _add_rows(self, results: list[Any]) -> list[bool]:
        rows = [
            {
                "sop_instance_uid": r.sop_instance_uid,
                "study_instance_uid": r.study_instance_uid,
                "series_instance_uid": r.series_instance_uid,
                "sop_class_uid": r.sop_class_uid,
                "path": r.path,
                "size": r.size,
                "audit": r.audit,
            }
            for r in results
        ]
        add_many = getattr(self._outbox, "add_many", None)
        if add_many is not None:
            return list(add_many(rows))
        return [self._outbox.add(**row) for row in rows]  # a sink without group commit

    def _unchanged(self, job: _Job) -> bool:
        try:
            st = os.lstat(job.path)
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (job.size, job.mtime_ns)

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

    def _prepare(self, job: _Job) -> tuple[str, Any, float] | None:
        """Deal with a completed job, except its commit: ``(rel, result, seconds)`` when it is
        to be committed, None when it was handled here (crash, error, deferred, changed)."""
        assert job.future is not None
        exc = job.future.exception()
        if isinstance(exc, BrokenProcessPool):
            if self._stopping:
                return None  # shutting down: the original stays in the inbox
            n = self._crashes.get(job.path, 0) + 1
            self._crashes[job.path] = n
            if self._pool is not None and getattr(self._pool, "_broken", False):
                self._replace_pool()
            log.error("intake_worker_died", file=short_hash(job.path), crashes=n)
            if n <= MAX_WORKER_CRASHES:
                self._requeue(job.path)
                return None
            rel = job.rel or self._relative(job.path) or Path(job.path).name
            self._crashes.pop(job.path, None)
            self._to_quarantine(job.path, rel, "internal_error", "worker process died")
            return None
        if exc is not None:
            raise exc
        kind, payload, detail, seconds = job.future.result()
        rel = job.rel or self._relative(job.path) or Path(job.path).name
        if kind == "transient":
            log.error("intake_deferred", file=short_hash(job.path), cause=detail)
            self._defer(job.path)
            return None  # the original stays and is offered again later
        if not self._unchanged(job):
            # Rewritten (or removed) while we read it: never act on bytes we did not process;
            # let it settle again.
            if self._resettle is not None and Path(job.path).exists():
                self._resettle(Path(job.path))
            else:
                self._requeue(job.path)
            return None
        if kind == "error":
            self._to_quarantine(job.path, rel, str(payload), detail)
            return None
        return rel, payload, seconds

    def _dispose(self, job: _Job, rel: str) -> None:
        src = Path(job.path)
        if self._originals == "delete":
            with contextlib.suppress(FileNotFoundError):
                src.unlink()
        elif self._originals == "archive":
            assert self._archive_dir is not None
            dst = self._archive_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst = dst.with_name(f"{dst.name}.{int(time.time() * 1000)}")
            move_file(src, dst)
        else:
            assert self._kept is not None
            self._kept.add(_KeptIndex.key(rel, job.size, job.mtime_ns))

    def _to_quarantine(self, path: str, rel: str, reason: str, detail: str) -> None:
        try:
            self._quarantine.put(Path(path), reason, detail, original_name=rel)
        except FileNotFoundError:
            return
        self.quarantined += 1
