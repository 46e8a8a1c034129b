"""Intake with the real engine, a real SQLite outbox and real files: order, originals, reasons."""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.agent.intake.pipeline import Intake
from gateway_agent.agent.intake.quarantine import ORIGINAL_NAME, REASON_FILE, Quarantine
from gateway_agent.agent.intake.watcher import InboxWatcher
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.deid import Deidentifier
from gateway_agent.synthetic import make_ct_slice

from ._agent_util import (
    EnospcEngine,
    agent_settings,
    files_under,
    running_daemon,
    start_intake,
    wait_until,
    write_synthetic,
)


class CrashingEngine:
    """The real engine, except that a file named ``*CRASH*`` kills the worker process and a file
    named ``*BUG*`` raises an unexpected exception (what a bug in the engine would do)."""

    def __init__(self, engine: Deidentifier) -> None:
        self.engine = engine

    def deidentify_file(self, src: str | Path, out_dir: str | Path, **kw: Any) -> Any:
        # The worker hands the engine its own descriptor (/proc/self/fd/N): the name is its target.
        src = str(src)
        name = Path(os.readlink(src)).name if src.startswith("/proc/") else Path(src).name
        if "CRASH" in name:
            os._exit(3)
        if "BUG" in name:
            raise RuntimeError("engine bug")
        return self.engine.deidentify_file(src, out_dir, **kw)


def _run(it: Intake, paths: list[Path], timeout: float = 60) -> None:
    for p in paths:
        it.submit(p)
    assert wait_until(it.idle, timeout=timeout)


def test_commit_then_delete(tmp_path: Path, engine: Deidentifier, outbox: Outbox) -> None:
    woken: list[int] = []
    it = start_intake(tmp_path, engine, outbox, on_committed=lambda: woken.append(1))
    try:
        paths = write_synthetic(tmp_path / "inbox" / "s", 5)
        _run(it, paths)
    finally:
        it.stop()
    assert not any(p.exists() for p in paths)
    rows = outbox.rows()
    assert len(rows) == 5 and {r.state for r in rows} == {"queued"}
    assert all(r.path.is_file() and r.path.parent == tmp_path / "state" / "outbox" for r in rows)
    assert len(woken) == 5


def test_outbox_failure_keeps_the_original(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    """If the row cannot be committed, the original must stay (design invariant 1)."""
    outbox.close()  # every add() now fails like a broken database would
    it = start_intake(tmp_path, engine, outbox)
    try:
        paths = write_synthetic(tmp_path / "inbox" / "s", 3)
        before = [p.read_bytes() for p in paths]
        _run(it, paths)
    finally:
        it.stop()
    assert [p.read_bytes() for p in paths] == before
    assert not (tmp_path / "state" / "quarantine").exists() or not any(
        (tmp_path / "state" / "quarantine").iterdir()
    )


def test_quarantine_layout_and_reason(tmp_path: Path, engine: Deidentifier, outbox: Outbox) -> None:
    it = start_intake(tmp_path, engine, outbox)
    inbox = tmp_path / "inbox"
    bad = inbox / "sub" / "report.txt"
    bad.parent.mkdir()
    bad.write_text("hello")
    dicomdir = inbox / "DICOMDIR"
    dicomdir.write_bytes(b"DICM")
    try:
        _run(it, [bad, dicomdir])
    finally:
        it.stop()
    assert not bad.exists() and not dicomdir.exists()
    q = Quarantine(tmp_path / "state" / "quarantine")
    entries = {e.reason: e for e in q.entries()}
    assert set(entries) >= {"dicomdir"} and len(entries) == 2
    other = next(e for r, e in entries.items() if r != "dicomdir")
    assert other.original_name == "sub/report.txt"
    assert other.original_size == 5
    assert (other.path / ORIGINAL_NAME).read_text() == "hello"
    assert stat.S_IMODE(other.path.stat().st_mode) == 0o700
    assert stat.S_IMODE((other.path / ORIGINAL_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((other.path / REASON_FILE).stat().st_mode) == 0o600
    info = json.loads((other.path / REASON_FILE).read_text())
    assert set(info) >= {"reason", "detail", "time", "original_size", "original_name"}
    # What status shows carries no original name.
    assert "report" not in json.dumps(q.summary())
    assert outbox.counts()["queued"] == 0


def test_worker_crash_and_engine_bug_are_quarantined(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    it = start_intake(tmp_path, CrashingEngine(engine), outbox, workers=2)
    inbox = tmp_path / "inbox"
    good = write_synthetic(inbox / "good", 6)
    crash = inbox / "CRASH.dcm"
    bug = inbox / "BUG.dcm"
    make_ct_slice(rows=32, cols=32, study_seed="c").save_as(crash, enforce_file_format=True)
    make_ct_slice(rows=32, cols=32, study_seed="b").save_as(bug, enforce_file_format=True)
    try:
        _run(it, [crash, *good, bug], timeout=120)
        assert it.alive()
    finally:
        it.stop()
    reasons = sorted(e.reason for e in Quarantine(tmp_path / "state" / "quarantine").entries())
    assert reasons == ["internal_error", "internal_error"]
    assert outbox.counts()["queued"] == 6, "innocent files in flight with the crasher survive"
    assert not any(p.exists() for p in [*good, crash, bug])


def test_archive_originals(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, originals="archive", archive_dir=tmp_path / "archive")
    with running_daemon(settings) as d:
        paths = write_synthetic(settings.inbox / "study", 4)
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
    archived = files_under(tmp_path / "archive")
    assert sorted(p.relative_to(tmp_path / "archive") for p in archived) == sorted(
        p.relative_to(settings.inbox) for p in paths
    )
    assert len(files_under(settings.destination.folder)) == 4


def test_keep_originals_are_not_reprocessed(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, originals="keep")
    paths = write_synthetic(tmp_path / "inbox" / "study", 4)
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and d.outbox.counts()["sent"] == 4, 60)
        assert d.intake is not None
        assert d.intake.committed == 4
    assert all(p.exists() for p in paths)
    with running_daemon(settings) as d:
        time.sleep(1.0)  # start-up scan sees the kept files again
        assert wait_until(d.drained, 30)
        assert d.intake is not None
        assert d.intake.committed == 0
        assert d.outbox.counts()["sent"] == 4


def test_a_job_no_worker_took_is_not_held(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the pool refuses a job (no worker could be started: ENOSPC, EMFILE...), the file
    must not stay "in flight", where every later offer of it would be ignored for good."""
    it = start_intake(tmp_path, engine, outbox)
    try:
        (path,) = write_synthetic(tmp_path / "inbox" / "s", 1)
        assert it._pool is not None
        real_submit = it._pool.submit
        refused: list[int] = []

        def submit(*args: Any, **kwargs: Any) -> Any:
            if not refused:
                refused.append(1)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_submit(*args, **kwargs)

        monkeypatch.setattr(it._pool, "submit", submit)
        it.submit(path)
        assert wait_until(lambda: bool(refused) and it.idle(), timeout=10)
        assert path.exists()  # not taken, not lost
        it.submit(path)  # the next offer (the watcher's retry or scan)
        assert wait_until(lambda: not path.exists(), timeout=30)
    finally:
        it.stop()
    assert len(outbox.rows()) == 1


def test_deferred_files_are_offered_again_soon_not_at_the_next_scan(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    """A file deferred for want of space is retried after a short backoff (2 s, doubling) by the
    real watcher, long before its periodic full scan (here 10 minutes away)."""
    flag = tmp_path / "disk-is-full"
    flag.touch()
    offered: list[float] = []
    watcher: InboxWatcher | None = None

    def retry_later(path: Path, delay: float) -> None:
        offered.append(delay)
        assert watcher is not None
        watcher.retry_later(path, delay)

    it = start_intake(tmp_path, EnospcEngine(engine, flag), outbox, retry_later=retry_later)
    watcher = InboxWatcher(tmp_path / "inbox", it.submit, settle_seconds=0.2, rescan_seconds=600)
    watcher.start()
    try:
        paths = write_synthetic(tmp_path / "staged", 3)
        for p in paths:
            p.rename(tmp_path / "inbox" / p.name)
        assert wait_until(lambda: len(offered) >= 6, timeout=30)  # two rounds: 2 s, then 4 s
        assert sorted(set(offered))[:2] == [2.0, 4.0]
        assert all((tmp_path / "inbox" / p.name).exists() for p in paths)
        flag.unlink()  # space is back
        t0 = time.monotonic()
        assert wait_until(lambda: len(outbox.rows()) == 3, timeout=30)
        assert time.monotonic() - t0 < 20  # the backoff (at most 8 s here), not the 600 s scan
        assert wait_until(lambda: not any((tmp_path / "inbox").iterdir()), timeout=10)
    finally:
        watcher.stop()
        it.stop()


def test_deferral_backoff_stays_at_its_cap(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    """A disk full for a day defers a file ~1,500 times: the delay stays at 60 s (no overflow)."""
    delays: list[float] = []
    it = start_intake(tmp_path, engine, outbox, retry_later=lambda _p, d: delays.append(d))
    try:
        for _ in range(2000):
            it._defer(str(tmp_path / "inbox" / "x.dcm"))
    finally:
        it.stop()
    assert delays[:7] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert len(delays) == 2000 and delays[-1] == 60.0


def test_queued_files_go_to_the_workers_several_per_task_a_lone_file_alone(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    """A backlog is handed out a few files per task (one round trip to a worker process for
    several files); a lone file, or a short queue, goes one file per task, spread over the free
    tasks; a file that crashed a worker goes alone."""
    from gateway_agent.agent.intake.pipeline import TASK_FILES, TASKS_PER_WORKER

    it = Intake(
        inbox=tmp_path / "inbox",
        out_dir=tmp_path / "state" / "outbox",
        engine=engine,
        outbox=outbox,
        quarantine=Quarantine(tmp_path / "state" / "quarantine"),
        workers=2,
        state_dir=tmp_path / "state",
    )  # not started: only the dispatcher's bookkeeping is exercised
    free = TASKS_PER_WORKER * 2

    def take(paths: list[str]) -> list[list[str]]:
        for p in paths:
            it.submit(Path(p))
        with it._cond:
            chunks = it._take_batch()
            it._tasks = 0  # as if they completed
        return chunks

    assert take(["a"]) == [["a"]]
    assert take(["b", "c"]) == [["b"], ["c"]]
    names = [f"f{i:02d}" for i in range(free * TASK_FILES + 3)]
    chunks = take(names)
    assert chunks == [names[i : i + TASK_FILES] for i in range(0, free * TASK_FILES, TASK_FILES)]
    assert list(it._queue) == names[free * TASK_FILES :]  # the rest waits for a free task
    it._queue.clear()
    it._crashes["x"] = 1
    assert take(["x", "y", "z"]) == [["x"]]


def test_one_folder_fsync_per_task_and_a_failed_one_keeps_the_originals(
    tmp_path: Path, engine: Deidentifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker fsyncs each output, renames it, and fsyncs the outbox folder once for the
    task's outputs before answering. If that fsync fails (an I/O error cannot be had from a real
    disk here: it is injected), the task's outputs count as not written: ``transient``, so their
    originals stay in the inbox and are offered again."""
    from gateway_agent.agent.intake import worker

    srcs = [str(p) for p in write_synthetic(tmp_path / "inbox", 3)]
    out = tmp_path / "outbox"
    out.mkdir()
    synced: list[str] = []
    real = worker.fsync_dir

    def counting(directory: str) -> None:
        synced.append(str(directory))
        real(directory)

    monkeypatch.setattr(worker, "_ENGINE", engine)
    monkeypatch.setattr(worker, "fsync_dir", counting)
    results = worker.deid_jobs([*srcs, str(tmp_path / "gone.dcm")], str(out))
    assert [r[0] for r in results] == ["ok", "ok", "ok", "changed"]
    assert synced == [str(out)]  # one fsync of the folder for the three outputs

    def failing(directory: str) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(worker, "fsync_dir", failing)
    results = worker.deid_jobs(srcs, str(out))
    assert [(r[0], r[1], r[2]) for r in results] == [("transient", "resource", "EIO")] * 3
