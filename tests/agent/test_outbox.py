"""Outbox contract tests, run against an in-memory and a real file database; crash mid-upload."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.agent.outbox.db import STATES, OutboxRow
from gateway_agent.agent.outbox.store import DestinationQueue, Outbox

from ._uploadkit import FakeClock, add_files, make_files


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "file"])
def outbox(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[Outbox]:
    db = ":memory:" if request.param == "memory" else tmp_path / "state" / "outbox.db"
    ob = Outbox(db, clock=clock)
    yield ob
    ob.close()


def _q(ob: Outbox) -> DestinationQueue:
    """The deliveries and circuit of the one destination of these tests."""
    return ob.queue("default")


def _add(ob: Outbox, uid: str, path: Path, size: int = 100, study: str = "1.2.3") -> bool:
    return ob.add(
        sop_instance_uid=uid,
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        path=path,
        size=size,
        audit={"profile": "basic"},
    )


def test_add_is_idempotent_on_sop_uid(outbox: Outbox, tmp_path: Path) -> None:
    assert _add(outbox, "1.2.3.4", tmp_path / "a.dcm") is True
    assert _add(outbox, "1.2.3.4", tmp_path / "b.dcm") is False
    assert outbox.counts() == {"queued": 1, "sending": 0, "sent": 0, "dead": 0}
    row = outbox.get("1.2.3.4", "default")
    assert row is not None and row.path == tmp_path / "a.dcm" and row.state == "queued"
    assert outbox.audit(row.id) == {"profile": "basic"}


def test_add_validates_arguments(outbox: Outbox, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        _add(outbox, "", tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="size"):
        _add(outbox, "1.2", tmp_path / "a.dcm", size=-1)


def test_counts_has_every_state(outbox: Outbox) -> None:
    assert set(outbox.counts()) == set(STATES)
    assert outbox.oldest_waiting_age() is None
    assert _q(outbox).next_due_at() is None


def test_claim_leases_due_rows_once_and_counts_attempts(outbox: Outbox, tmp_path: Path) -> None:
    for i in range(5):
        _add(outbox, f"1.2.{i}", tmp_path / f"{i}.dcm")
    first = _q(outbox).claim(max_items=3, max_bytes=10**9, lease_seconds=60)
    assert [r.sop_instance_uid for r in first] == ["1.2.0", "1.2.1", "1.2.2"]
    assert all(r.state == "sending" and r.attempts == 1 for r in first)
    second = _q(outbox).claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    assert [r.sop_instance_uid for r in second] == ["1.2.3", "1.2.4"]
    assert _q(outbox).claim(max_items=10, max_bytes=10**9, lease_seconds=60) == []
    assert outbox.counts()["sending"] == 5


def test_claim_respects_max_bytes_but_always_takes_one(outbox: Outbox, tmp_path: Path) -> None:
    _add(outbox, "1.1", tmp_path / "a", size=600)
    _add(outbox, "1.2", tmp_path / "b", size=600)
    _add(outbox, "1.3", tmp_path / "c", size=100)
    big = _q(outbox).claim(max_items=10, max_bytes=500, lease_seconds=60)
    assert [r.sop_instance_uid for r in big] == ["1.1"]  # alone over the limit: still sent
    two = _q(outbox).claim(max_items=10, max_bytes=800, lease_seconds=60)
    assert [r.sop_instance_uid for r in two] == ["1.2", "1.3"]
    with pytest.raises(ValueError, match="max_items"):
        _q(outbox).claim(max_items=0, max_bytes=1, lease_seconds=1)


def test_retry_waits_until_due(outbox: Outbox, clock: FakeClock, tmp_path: Path) -> None:
    _add(outbox, "1.1", tmp_path / "a")
    (row,) = _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    _q(outbox).mark_retry([row.id], error="http_503", delay=30)
    again = outbox.get("1.1", "default")
    assert again is not None
    assert (again.state, again.attempts, again.last_error) == ("queued", 1, "http_503")
    assert again.next_attempt_at == clock.now + 30
    assert _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60) == []
    assert _q(outbox).next_due_at() == clock.now + 30
    clock.advance(30)
    (row2,) = _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    assert row2.attempts == 2
    _q(outbox).mark_retry([row2.id], error="outage", delay=1, refund_attempt=True)
    row3 = outbox.get("1.1", "default")
    assert row3 is not None and row3.attempts == 1


def test_sent_dead_and_retry_dead(outbox: Outbox, clock: FakeClock, tmp_path: Path) -> None:
    for i in range(3):
        _add(outbox, f"1.{i}", tmp_path / f"{i}")
    rows = _q(outbox).claim(max_items=3, max_bytes=10**9, lease_seconds=60)
    clock.advance(5)
    _q(outbox).mark_sent([rows[0].id])
    _q(outbox).mark_dead([rows[1].id, rows[0].id], error="http_415")  # a sent row stays sent
    _q(outbox).release([rows[2].id])
    assert outbox.counts() == {"queued": 1, "sending": 0, "sent": 1, "dead": 1}
    sent = outbox.get("1.0", "default")
    assert sent is not None and sent.sent_at == clock.now
    released = outbox.get("1.2", "default")
    assert released is not None and released.attempts == 0  # release is without penalty
    dead = outbox.get("1.1", "default")
    assert dead is not None and dead.last_error == "http_415"
    assert outbox.retry_dead() == 1
    back = outbox.get("1.1", "default")
    assert back is not None and (back.state, back.attempts) == ("queued", 0)
    status = _q(outbox).destination_status()
    assert status["last_success_at"] is None  # acknowledged, not yet delivered: proof pending
    assert (status["awaiting_proof"], status["proof_pending_since"]) == (1, clock.now)
    _q(outbox).mark_proven([rows[0].id])
    assert _q(outbox).destination_status()["last_success_at"] == clock.now


def test_retry_dead_selected_ids(outbox: Outbox, tmp_path: Path) -> None:
    for i in range(3):
        _add(outbox, f"1.{i}", tmp_path / f"{i}")
    rows = _q(outbox).claim(max_items=3, max_bytes=10**9, lease_seconds=60)
    _q(outbox).mark_dead([r.id for r in rows], error="x")
    assert outbox.retry_dead([rows[1].id]) == 1
    assert outbox.counts() == {"queued": 1, "sending": 0, "sent": 0, "dead": 2}


def test_expired_lease_is_claimed_again(outbox: Outbox, clock: FakeClock, tmp_path: Path) -> None:
    _add(outbox, "1.1", tmp_path / "a")
    _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    clock.advance(59)
    assert _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60) == []
    clock.advance(2)
    (row,) = _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    assert row.attempts == 2


def test_requeue_stale_brings_back_sending_rows(outbox: Outbox, tmp_path: Path) -> None:
    _add(outbox, "1.1", tmp_path / "a")
    _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=3600)
    assert outbox.requeue_stale() == 1
    assert outbox.counts()["queued"] == 1
    assert len(_q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)) == 1


def test_oldest_waiting_age_and_rows_since(
    outbox: Outbox, clock: FakeClock, tmp_path: Path
) -> None:
    _add(outbox, "1.1", tmp_path / "a")
    clock.advance(10)
    _add(outbox, "1.2", tmp_path / "b")
    clock.advance(5)
    assert outbox.oldest_waiting_age() == 15
    rows = outbox.rows_since(0)
    assert [r.sop_instance_uid for r in rows] == ["1.1", "1.2"]
    assert [r.sop_instance_uid for r in outbox.rows_since(rows[0].id)] == ["1.2"]
    assert outbox.rows_since(rows[1].id) == []
    assert [r.sop_instance_uid for r in outbox.rows("queued")] == ["1.1", "1.2"]
    with pytest.raises(ValueError, match="state"):
        outbox.rows("lost")


def _claimed(
    outbox: Outbox, clock: FakeClock, tmp_path: Path, n: int
) -> tuple[list[Path], list[OutboxRow]]:
    """``n`` one-byte files ``0.dcm``... (written now, by the outbox's clock) added as ``1.0``...
    and claimed for sending: the files and the claimed rows."""
    files = [tmp_path / f"{i}.dcm" for i in range(n)]
    for i, f in enumerate(files):
        f.write_bytes(b"x")
        os.utime(f, (clock.now, clock.now))  # written before it is sent, by the same clock
        _add(outbox, f"1.{i}", f)
    return files, _q(outbox).claim(max_items=n, max_bytes=10**9, lease_seconds=60)


def test_purge_sent_files_keeps_rows(outbox: Outbox, clock: FakeClock, tmp_path: Path) -> None:
    files, rows = _claimed(outbox, clock, tmp_path, 3)
    _q(outbox).mark_sent([rows[0].id, rows[1].id])
    _q(outbox).mark_proven([rows[0].id, rows[1].id])
    clock.advance(100)
    assert outbox.purge_sent_files(older_than_seconds=200) == 0
    assert outbox.purge_sent_files(older_than_seconds=50) == 2
    assert [f.exists() for f in files] == [False, False, True]
    assert outbox.counts()["sent"] == 2
    assert outbox.purge_sent_files(older_than_seconds=50) == 0  # already gone: counted once


def test_compact_deletes_old_sent_rows_but_never_the_newest(
    outbox: Outbox, clock: FakeClock, tmp_path: Path
) -> None:
    _, rows = _claimed(outbox, clock, tmp_path, 4)
    _q(outbox).mark_sent([r.id for r in rows[:3]])
    _q(outbox).mark_proven([r.id for r in rows[:3]])
    clock.advance(100)
    assert outbox.compact(older_than_seconds=50) == 0  # files not yet removed: kept
    outbox.purge_sent_files(older_than_seconds=50)
    assert outbox.compact(older_than_seconds=200) == 0  # not old enough
    assert outbox.compact(older_than_seconds=50) == 3
    assert outbox.counts() == {"queued": 0, "sending": 1, "sent": 0, "dead": 0}
    # The newest row is kept even when it qualifies, so ids never restart below a reader.
    _q(outbox).mark_sent([rows[3].id])
    _q(outbox).mark_proven([rows[3].id])
    clock.advance(100)
    outbox.purge_sent_files(older_than_seconds=50)
    assert outbox.compact(older_than_seconds=50) == 0
    _add(outbox, "1.9", tmp_path / "late.dcm")
    assert [r.sop_instance_uid for r in outbox.rows_since(rows[3].id)] == ["1.9"]


def test_circuit_one_probe_at_a_time(outbox: Outbox, clock: FakeClock) -> None:
    assert _q(outbox).circuit_acquire(probe_lease=60) == (0.0, False)
    started = clock.now
    clock.advance(1)
    assert _q(outbox).circuit_failure("network_error", delay=10, started_at=started) is False
    status = _q(outbox).destination_status()
    assert status["consecutive_failures"] == 1 and status["last_error"] == "network_error"
    assert _q(outbox).circuit_acquire(probe_lease=60) == (10.0, False)
    clock.advance(10)
    assert _q(outbox).circuit_acquire(probe_lease=60) == (0.0, True)  # this caller probes
    assert _q(outbox).circuit_acquire(probe_lease=60) == (60.0, False)  # the others wait
    # a second request that started before the failure was recorded: known, not counted again
    assert _q(outbox).circuit_failure("network_error", delay=5, started_at=started, probing=True)
    assert _q(outbox).destination_status()["consecutive_failures"] == 1
    clock.advance(5)
    assert _q(outbox).circuit_acquire(probe_lease=60) == (0.0, True)
    _q(outbox).circuit_release_probe()
    assert _q(outbox).circuit_acquire(probe_lease=60) == (0.0, True)
    assert _q(outbox).circuit_failure("http_401", delay=2, started_at=clock.now, auth=True)
    assert _q(outbox).destination_status()["auth_failing"] is True
    assert _q(outbox).destination_status()["consecutive_failures"] == 2
    assert _q(outbox).circuit_success() is True
    status = _q(outbox).destination_status()
    assert status["consecutive_failures"] == 0 and status["auth_failing"] is False
    # The circuit closed, but nothing was delivered: the last delivery is still unknown.
    assert status["last_success_at"] is None and status["blocked_until"] is None
    assert _q(outbox).circuit_success() is False


def test_retry_now_makes_waiting_rows_due(outbox: Outbox, clock: FakeClock, tmp_path: Path) -> None:
    _add(outbox, "1.1", tmp_path / "a")
    (row,) = _q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    _q(outbox).mark_retry([row.id], error="http_401", delay=300)
    _q(outbox).circuit_failure("http_401", delay=300, started_at=clock.now, auth=True)
    assert outbox.retry_now() == 1
    assert _q(outbox).circuit_acquire(probe_lease=60) == (0.0, True)
    assert len(_q(outbox).claim(max_items=1, max_bytes=10**9, lease_seconds=60)) == 1


def test_reconcile_files_and_rows(outbox: Outbox, tmp_path: Path) -> None:
    files_dir = tmp_path / "outbox"
    paths = make_files(files_dir / "a", 3)
    add_files(outbox, paths[:1])
    (files_dir / ".IMG9.dcm.tmp").write_bytes(b"partial")
    (files_dir / "junk.dcm").write_bytes(b"not dicom at all")
    _add(outbox, "1.9.9", files_dir / "vanished.dcm")
    result = outbox.reconcile(files_dir)
    assert result == {"added": 2, "missing": 1, "unreadable": 1, "temp": 1}
    assert outbox.counts() == {"queued": 3, "sending": 0, "sent": 0, "dead": 1}
    dead = outbox.get("1.9.9", "default")
    assert dead is not None and dead.last_error == "file_missing"
    again = outbox.reconcile(files_dir)
    assert again["added"] == 0 and again["missing"] == 0


def test_file_db_mode_wal_and_checkpoint(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    ob = Outbox(db)
    _add(ob, "1.1", tmp_path / "a")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert ob._query("pragma journal_mode")[0][0] == "wal"
    assert ob._query("pragma synchronous")[0][0] == 2  # FULL
    wal = Path(str(db) + "-wal")
    assert wal.exists() and wal.stat().st_size > 0
    assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    ob.checkpoint()
    assert wal.stat().st_size == 0
    ob.close()
    reopened = Outbox(db)
    assert reopened.counts()["queued"] == 1
    reopened.close()


def test_two_connections_never_claim_the_same_row(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    a, b = Outbox(db), Outbox(db)
    for i in range(200):
        _add(a, f"1.{i}", tmp_path / f"{i}")
    got: list[list[int]] = [[], [], [], []]

    def worker(ob: Outbox, k: int) -> None:
        while rows := _q(ob).claim(max_items=3, max_bytes=10**9, lease_seconds=60):
            got[k].extend(r.id for r in rows)

    threads = [threading.Thread(target=worker, args=(ob, k)) for k, ob in enumerate((a, b, a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for g in got for i in g]
    assert len(ids) == 200 and len(set(ids)) == 200
    a.close()
    b.close()


_CRASH_SCRIPT = """
import os, sys
from gateway_agent.agent.outbox.store import DestinationQueue, Outbox
ob = Outbox(sys.argv[1])
rows = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=3600)
print(len(rows), flush=True)
os.kill(os.getpid(), 9)   # die in the middle of the upload, lease held
"""


def test_crash_mid_upload_row_comes_back(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    ob = Outbox(db)
    paths = make_files(tmp_path / "files", 4)
    uids = add_files(ob, paths)
    ob.close()
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(db)],
        capture_output=True,
        text=True,
        check=False,
        cwd=os.getcwd(),
        timeout=60,
    )
    assert proc.returncode == -9 and proc.stdout.strip() == "4"
    restarted = Outbox(db)
    assert restarted.counts()["sending"] == 4
    assert restarted.requeue_stale() == 4
    rows = _q(restarted).claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(uids)
    restarted.close()
