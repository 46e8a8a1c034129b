"""What runs in the de-identification worker processes: one file per job, errors as data."""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any, Literal

from ..._exceptions import IngestError, codec_panics
from ...dicom.files import fsync_dir

__all__ = [
    "OUTBOX_FILE_MODE",
    "FILE_CPU_SECONDS",
    "FILE_CPU_SECONDS_PER_MB",
    "FileIdentity",
    "JobResult",
    "deid_job",
    "deid_jobs",
    "identity_of",
    "init_worker",
    "warm_up",
]

#: Mode of the de-identified copies in the outbox folder (the folder itself: ``OUTBOX_DIR_MODE``).
OUTBOX_FILE_MODE = 0o600

_ENGINE: Any = None

#: What says "the same file, unchanged": device, inode, size, mtime and ctime (nanoseconds).
FileIdentity = tuple[int, int, int, int, int]

#: ``(kind, payload, detail, seconds, identity)``. ``kind``: ``ok`` (payload: the DeidResult),
#: ``error`` (payload: the reason; the input is bad), ``transient`` (the output side failed),
#: ``changed`` (the file was replaced, or changed while it was read: offer it again).
#: ``identity``: of the file the worker read (None when it could not be opened).
JobResult = tuple[
    Literal["ok", "error", "transient", "changed"], Any, str, float, FileIdentity | None
]

#: CPU time a worker may spend on one file before the kernel ends it (SIGPROF): this many
#: seconds, plus ``FILE_CPU_SECONDS_PER_MB`` per MB of input. A file that makes a library loop
#: forever (Python or compiled code) then costs a worker restart, not a worker; the pipeline
#: runs it again alone and quarantines it after ``MAX_WORKER_CRASHES`` deaths. The allowance is
#: far above any real file (a 200-frame ultrasound cine cleaned: about 30 s).
FILE_CPU_SECONDS = 600.0
FILE_CPU_SECONDS_PER_MB = 1.0

#: Where a process sees its own descriptors by path: the engine reads the very file the worker
#: opened (and checked) even if the name is given to another file meanwhile.
_FD_DIR = "/proc/self/fd"
_HAVE_FD_DIR = Path(_FD_DIR).is_dir()


def identity_of(st: os.stat_result) -> FileIdentity:
    """The identity of a file from its ``stat``."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def init_worker(engine: Any, agent_pid: int) -> None:
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


def _released(src: str, out_dir: str, released_dir: Path, refused: IngestError) -> Any:
    """De-identify a released file under ``allow``, or raise ``refused`` if it is not released."""
    import json

    from .quarantine import file_digest

    record_path = released_dir / f"{file_digest(Path(src))}.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise refused from None
    result = _ENGINE.with_burned_in("allow").deidentify_file(
        Path(src), Path(out_dir), sync_folder=False
    )
    result.audit["burned_in_released"] = {
        "quarantine_id": str(record.get("quarantine_id", "")),
        "reason": str(record.get("reason", "")),
        "refused_now": refused.reason,
    }
    record_path.unlink(missing_ok=True)  # one release, one delivery
    return result


def warm_up() -> None:
    """A no-op job: makes the pool start its worker processes ahead of the first file."""


def _written(before: os.stat_result, after: os.stat_result) -> bool:
    """True if the file's content may have changed between two ``fstat`` of one descriptor: its
    size or mtime moved, or its ctime did while its link count did not (a rewrite with the mtime
    put back). A rename over it, or its removal, changes only the ctime and the link count."""
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return True
    return before.st_ctime_ns != after.st_ctime_ns and before.st_nlink == after.st_nlink


def deid_job(src: str, out_dir: str, released_dir: str | None = None) -> JobResult:
    """Run in a worker: de-identify one file. Never raises; errors come back as data. The output
    is fsynced and renamed; its folder is fsynced by :func:`deid_jobs`, once per task.

    The file is opened once (never through a symbolic link) and the engine reads that descriptor;
    the identity of what was read comes back with the result, so the parent removes the
    original only if its name still points at that same, unchanged file. A file that changed
    while it was read is ``changed``. (IngestError carries ``reason`` outside ``args``, so it
    does not survive pickling as is.) A file refused for its pixels that an operator released
    with ``--allow-burned-in`` (its digest recorded in ``released_dir``) is de-identified under
    the ``allow`` policy instead.
    """
    t0 = time.perf_counter()
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            # Gone, or a link swapped in since it was listed: the watcher decides again.
            return "changed", None, "", time.perf_counter() - t0, None
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        return "error", "unreadable", name, time.perf_counter() - t0, None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return "changed", None, "", time.perf_counter() - t0, None
        identity = identity_of(before)
        source = f"{_FD_DIR}/{fd}" if _HAVE_FD_DIR else src
        limit = FILE_CPU_SECONDS + FILE_CPU_SECONDS_PER_MB * before.st_size / 1e6
        # SIGPROF's default action ends the process, even inside a codec's compiled loop.
        signal.setitimer(signal.ITIMER_PROF, limit)
        try:
            kind, payload, detail = _run(source, out_dir, released_dir)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        if _written(before, os.fstat(fd)):
            # Written to while we read it: whatever came out may mix two versions (the output,
            # if any, comes back for the parent to discard).
            result = payload if kind == "ok" else None
            return "changed", result, "", time.perf_counter() - t0, identity
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        return "error", "unreadable", name, time.perf_counter() - t0, None
    finally:
        os.close(fd)
    return kind, payload, detail, time.perf_counter() - t0, identity


def deid_jobs(srcs: list[str], out_dir: str, released_dir: str | None = None) -> list[JobResult]:
    """Run in a worker: :func:`deid_job` for each of ``srcs`` (one task, one round trip), then
    one fsync of ``out_dir`` for all their outputs (each output file was fsynced before its
    rename): every ``ok`` output is durable, name included, when the results go back. If that
    fsync fails, the ``ok`` results become ``transient`` (their originals stay for later)."""
    results = [deid_job(src, out_dir, released_dir) for src in srcs]
    if any(kind == "ok" for kind, *_ in results):
        try:
            fsync_dir(out_dir)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            results = [
                ("transient", "resource", name, r[3], r[4]) if r[0] == "ok" else r for r in results
            ]
    return results


def _run(
    src: str, out_dir: str, released_dir: str | None = None
) -> tuple[Literal["ok", "error", "transient"], Any, str]:
    try:
        try:
            with codec_panics():  # a codec's panic must not end the worker (or the dispatcher)
                # The folder's fsync comes once per task (deid_jobs).
                result = _ENGINE.deidentify_file(Path(src), Path(out_dir), sync_folder=False)
        except IngestError as exc:
            if not exc.reason.startswith("burned_in_") or released_dir is None:
                raise
            result = _released(src, out_dir, Path(released_dir), exc)
        # The engine's atomic write leaves outputs 0644 (a general-purpose writer); outbox
        # copies are the agent's own: 0600 (in a 0700 folder), before the row is committed.
        Path(result.path).chmod(OUTBOX_FILE_MODE)
    except IngestError as exc:
        return "error", exc.reason, exc.detail
    except MemoryError:
        return "error", "too_large", "out of memory"
    except OSError as exc:
        # The engine reports input problems as DeidError; an OSError is the output side (disk
        # full, quota, permissions): not the input's fault, so the original stays for later.
        return "transient", "resource", errno.errorcode.get(exc.errno or 0, "OSError")
    except Exception as exc:  # a bug in the engine must not stop the daemon
        return "error", "internal_error", type(exc).__name__
    return "ok", result, ""
