"""Disk full: the state folder on a small tmpfs (or, where mounting is not permitted, an injected
ENOSPC). Intake pauses, no outbox row is corrupt, no original is removed without its committed
copy, and everything goes through once space returns."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.synthetic import make_ct_slice
from tests.agent._agent_util import EnospcEngine

from ._harness import (
    AgentRun,
    assert_no_phi,
    phi_audit,
    reached,
    record_figures,
    size,
    wait_until,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MB = 1 << 20


def _mount_tmpfs(path: Path, mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={mb}m,mode=0700", "tmpfs", str(path)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return str(conn.execute("pragma integrity_check").fetchone()[0])
    finally:
        conn.close()


def _inputs(run: AgentRun, n: int) -> dict[str, str]:
    """``n`` 256x256 CT files (~130 kB each) staged, with their expected output SOP UIDs."""
    engine = run.engine()
    scratch = run.root / "expected"
    scratch.mkdir()
    out = {}
    for i in range(n):
        ds = make_ct_slice(study_seed="diskfull", instance_number=i + 1, rows=256, cols=256)
        path = run.staging / f"PHIDOE_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[path.name] = engine.deidentify_file(path, scratch).sop_instance_uid
        for p in scratch.iterdir():
            p.unlink()
    scratch.rmdir()
    return out


def _check_invariants(run: AgentRun, expected: dict[str, str]) -> tuple[list[str], int]:
    """(originals gone without a committed, intact copy; rows whose file is missing or short)."""
    rows = {sop: (path, size_) for sop, _state, path, size_ in run.outbox_rows()}
    lost, corrupt = [], 0
    for sop, (path, size_) in rows.items():
        p = Path(path)
        if (not p.exists() and sop not in run.delivered_uids()) or (
            p.exists() and p.stat().st_size != size_
        ):
            corrupt += 1
    for name, sop in expected.items():
        if (run.inbox / name).exists() or (run.staging / name).exists():
            continue
        if sop not in rows:
            lost.append(name)
    return lost, corrupt


@pytest.mark.parametrize("guard", ["disk_guard", "enospc"])
def test_state_on_a_full_tmpfs(tmp_path: Path, agent_run: Any, guard: str) -> None:
    mnt = tmp_path / "statefs"
    if not _mount_tmpfs(mnt, 8):
        pytest.skip("mounting a tmpfs is not permitted here; see test_injected_enospc")
    try:
        _full_tmpfs_case(tmp_path, mnt, agent_run, guard)
    finally:
        _umount(mnt)


def _full_tmpfs_case(tmp_path: Path, mnt: Path, agent_run: Any, guard: str) -> None:
    n = size(90, 300)
    run = agent_run(
        state_dir=mnt / "state",
        overrides={
            "disk": {
                "min_free_mb": 2.0 if guard == "disk_guard" else 0,
                "check_interval_seconds": 1.0,
            },
        },
    )
    expected = _inputs(run, n)
    run.start()
    paused_seen = False
    try:
        for name in expected:
            run.feed(name)

        # Wait until intake stops making progress: the disk is full (or the guard paused it).
        # A stall only counts once intake has begun (took a file) or paused: on a loaded machine
        # the agent may take longer than the stall window to start at all.
        def paused_now() -> bool:
            return "gateway_intake_paused 1.0" in run.metrics_text() or any(
                "intake_paused" in line for line in run.agent.log_lines()
            )

        last, since = -1, time.monotonic()
        end = time.monotonic() + size(90, 300)
        while time.monotonic() < end:
            paused_seen = paused_seen or paused_now()
            left = len(run.inbox_files())
            if left != last:
                last, since = left, time.monotonic()
            elif (left < n or paused_seen) and time.monotonic() - since > 4:
                break
            time.sleep(0.25)
        metrics = run.metrics_text()
        paused_seen = paused_seen or paused_now()
        stuck = len(run.inbox_files())
        lost_full, corrupt_full = _check_invariants(run, expected)
        integrity_full = _integrity(run.state / "outbox.db")
        assert run.agent.alive(), "the agent died on a full disk"

        # Space returns.
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True, timeout=30)
        t_back = time.monotonic()

        def recovered() -> bool:
            counts = run.outbox_counts()
            return (
                not run.inbox_files()
                and sum(counts.values()) == n
                and counts.get("queued", 0) == 0
                and counts.get("sent", 0) >= n - counts.get("sending", 0)
            )

        recovered_in_time = reached(recovered, timeout=size(150, 600))
        recovered_s = round(time.monotonic() - t_back, 1)
        # Rows whose "sent" could not be recorded on the full disk are recorded by the worker's
        # retry soon after (see test_row_whose_outcome_could_not_be_recorded_is_retried_soon).
        at_recovery = run.outbox_counts()
        stuck_sending = at_recovery.get("sending", 0)
        all_accounted = at_recovery.get("sent", 0) + stuck_sending == n
        # Those rows are recorded by the worker's retry (0.5 s doubling to 10 s), well before
        # their lease (300 s) would requeue them.
        t_rec = time.monotonic()
        recorded = reached(lambda: run.outbox_counts().get("sending", 0) == 0, timeout=120)
        recorded_s = round(time.monotonic() - t_rec, 1)
        metrics += run.metrics_text()
    finally:
        rc = run.agent.stop()
    lost, corrupt = _check_invariants(run, expected)
    figures = {
        "method": f"tmpfs 8 MiB ({guard})",
        "files": n,
        "stuck_while_full": stuck,
        "paused_seen": paused_seen,
        "originals_lost": len(lost_full) + len(lost),
        "corrupt_rows": corrupt_full + corrupt,
        "integrity": integrity_full,
        "recovered": recovered_in_time and all_accounted,
        "left_in_inbox": len(run.inbox_files()),
        "sending_at_recovery": stuck_sending,
        "sending_recorded_s": recorded_s if recorded else None,
        "recovery_s": recovered_s,
        "quarantined": len(run.quarantined()),
    }
    record_figures("diskfull", figures)
    assert stuck > 0, ("the disk never filled up", figures)
    if guard == "disk_guard":
        assert paused_seen, figures
    assert (lost_full, lost, corrupt_full, corrupt) == ([], [], 0, 0), figures
    assert integrity_full == "ok" and _integrity(run.state / "outbox.db") == "ok"
    assert figures["quarantined"] == 0, ("a full disk must not quarantine valid inputs", figures)
    assert figures["recovered"], figures
    assert recorded, ("rows left in sending after recovery were not recorded", figures)
    assert rc == 0
    assert_no_phi(f"diskfull-{guard}", phi_audit(run, metrics=metrics))


# --------------------------------------------------------------------------- injected ENOSPC


def test_injected_enospc_keeps_originals_and_recovers(tmp_path: Path, agent_run: Any) -> None:
    """Where tmpfs cannot be mounted (containers): the same promises with ENOSPC injected at
    the engine's write, through the real Intake, Outbox and Quarantine."""
    from gateway_agent.agent.intake.pipeline import Intake
    from gateway_agent.agent.intake.quarantine import Quarantine
    from gateway_agent.agent.outbox.store import Outbox

    n = size(20, 100)
    run = agent_run()
    expected = _inputs(run, n)
    flag = tmp_path / f"enospc-{uuid.uuid4().hex}"
    flag.touch()
    outbox = Outbox(run.state / "outbox.db")
    intake = Intake(
        inbox=run.inbox,
        out_dir=run.state / "outbox",
        engine=EnospcEngine(run.engine(), flag),
        outbox=outbox,
        quarantine=Quarantine(run.state / "quarantine"),
        workers=1,
    )
    intake.start()
    try:
        paths = [run.feed(name) for name in expected]
        for p in paths:
            intake.submit(p)
        wait_until(intake.idle, timeout=60, what="intake idle under ENOSPC")
        kept = sum(p.exists() for p in paths)
        rows_full = len(outbox.rows())
        q_full = len(Quarantine(run.state / "quarantine").entries())
        flag.unlink()
        for p in paths:  # what the watcher's periodic rescan does
            intake.submit(p)
        wait_until(lambda: intake.idle() and not run.inbox_files(), timeout=60, what="recovery")
        rows = {r.sop_instance_uid for r in outbox.rows()}
    finally:
        intake.stop()
        outbox.close()
        with contextlib.suppress(FileNotFoundError):
            flag.unlink()
    figures = {
        "method": "injected ENOSPC (engine write)",
        "files": n,
        "originals_kept_while_full": kept,
        "rows_while_full": rows_full,
        "quarantined_while_full": q_full,
        "originals_lost": n - kept,
        "recovered": rows == set(expected.values()),
    }
    record_figures("diskfull", figures)
    assert (kept, rows_full, q_full) == (n, 0, 0), figures
    assert rows == set(expected.values()), figures


# --------------------------------------------------------------------------- found: leased rows


class _FlakyOutbox:
    """The real Outbox, whose destination queues' ``mark_sent`` fails once with SQLite's
    disk-full error (what a full state disk does to the uploader's bookkeeping after the
    destination acknowledged)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.failed = False

    def queue(self, name: str) -> Any:
        return _FlakyQueue(self._inner.queue(name), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _FlakyQueue:
    """One destination's queue of a :class:`_FlakyOutbox`."""

    def __init__(self, inner: Any, owner: _FlakyOutbox) -> None:
        self._inner = inner
        self._owner = owner

    def mark_sent(self, ids: Any, **kwargs: Any) -> None:
        if not self._owner.failed:
            self._owner.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        self._inner.mark_sent(ids, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_row_whose_outcome_could_not_be_recorded_is_retried_soon(tmp_path: Path) -> None:
    from gateway_agent.agent.outbox.store import Outbox
    from gateway_agent.agent.upload.destinations.folder import FolderDestination
    from gateway_agent.agent.upload.uploader import Uploader
    from gateway_agent.config import DestinationSettings

    src = tmp_path / "one.dcm"
    ds = make_ct_slice(rows=16, cols=16, plant_phi=False)
    ds.save_as(src, enforce_file_format=True)
    real = Outbox(tmp_path / "outbox.db")
    real.add_file(src, audit={})
    flaky = _FlakyOutbox(real)
    uploader = Uploader(
        flaky,  # type: ignore[arg-type]
        FolderDestination(tmp_path / "dest"),
        DestinationSettings(backoff_base_seconds=0.1, backoff_cap_seconds=0.5),
    )
    uploader.start()
    try:
        wait_until(lambda: flaky.failed, timeout=10, what="the failed bookkeeping")
        uploader.wake()
        ok = True
        try:
            wait_until(lambda: real.counts().get("sent", 0) == 1, timeout=10, what="sent")
        except AssertionError:
            ok = False
    finally:
        uploader.stop(time.monotonic() + 5.0)  # an instant, not a duration: then joined
        real.close()
    assert ok, "the row stayed 'sending' (leased) after its outcome could not be recorded"
