"""The outbox under accidents, on a real SQLite file: an instance that arrives again (a corrected
version), a wall clock that jumps (injected wall and monotonic clocks), a damaged database."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway_agent.agent.outbox.repair import open_outbox
from gateway_agent.agent.outbox.store import Outbox

from ._uploadkit import Clocks

DAY = 86400.0


@pytest.fixture
def outbox(tmp_path: Path, clocks: Clocks) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db", clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    yield ob
    ob.close()


def _add(outbox: Outbox, uid: str, tmp_path: Path, size: int = 10) -> bool:
    return outbox.add(
        sop_instance_uid=uid,
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        path=tmp_path / f"{uid}.dcm",
        size=size,
        audit={},
    )


def _deliver(outbox: Outbox) -> None:
    """Every due delivery acknowledged, and its storage proven."""
    ids = _claim(outbox)
    outbox.queue("default").mark_sent(ids)
    outbox.queue("default").mark_proven(ids)


def _claim(outbox: Outbox, lease: float = 600.0) -> list[int]:
    return [
        r.id
        for r in outbox.queue("default").claim(
            max_items=100, max_bytes=1 << 30, lease_seconds=lease
        )
    ]


# --------------------------------------------------------------------------- received again


def test_a_delivered_instance_that_arrives_again_is_queued_again(
    outbox: Outbox, tmp_path: Path
) -> None:
    assert _add(outbox, "2.25.10", tmp_path)
    ids = _claim(outbox)
    outbox.queue("default").mark_sent(ids)
    with capture_logs() as logs:
        assert _add(outbox, "2.25.10", tmp_path, size=12) is False  # same row ...
    row = outbox.get("2.25.10")
    assert row is not None and (row.state, row.attempts, row.size) == ("queued", 0, 12)
    assert [e["event"] for e in logs] == ["outbox_received_again"]
    assert logs[0]["previous_state"] == "sent"
    assert _claim(outbox) == ids  # ... due at once


def test_an_ack_while_a_new_version_arrived_does_not_count_for_it(
    outbox: Outbox, tmp_path: Path
) -> None:
    _add(outbox, "2.25.11", tmp_path)
    _add(outbox, "2.25.12", tmp_path)
    ids = _claim(outbox)
    _add(outbox, "2.25.11", tmp_path, size=20)  # arrives again while being sent
    outbox.queue("default").mark_sent(ids)  # the ack is of the first version
    assert outbox.get("2.25.11").state == "queued"  # type: ignore[union-attr]
    assert outbox.get("2.25.12").state == "sent"  # type: ignore[union-attr]
    again = _claim(outbox)
    _add(outbox, "2.25.11", tmp_path, size=30)
    outbox.queue("default").mark_dead(
        again, error="http_400 rejected"
    )  # a refusal of the previous version
    assert outbox.get("2.25.11").state == "queued"  # type: ignore[union-attr]
    outbox.queue("default").mark_sent(_claim(outbox))
    assert outbox.counts() == {"queued": 0, "sending": 0, "sent": 2, "dead": 0}


def test_a_dead_instance_that_arrives_again_gets_a_new_chance(
    outbox: Outbox, tmp_path: Path
) -> None:
    _add(outbox, "2.25.13", tmp_path)
    outbox.queue("default").mark_dead(_claim(outbox), error="http_400 rejected")
    _add(outbox, "2.25.13", tmp_path)
    row = outbox.get("2.25.13")
    assert row is not None and row.state == "queued" and row.last_error is None


# --------------------------------------------------------------------------- clock jumps


def test_backward_jump_during_a_backoff_does_not_delay_delivery(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    _add(outbox, "2.25.20", tmp_path)
    outbox.queue("default").mark_retry(_claim(outbox), error="503", delay=30.0)
    outbox.queue("default").circuit_failure("503", delay=30.0, started_at=clocks.wall)
    clocks.jump(-DAY)  # the clock is set back a day
    clocks.advance(31.0)  # ... and the backoff runs out
    assert outbox.queue("default").circuit_acquire(probe_lease=60)[0] == 0.0
    assert _claim(outbox), "the row is due after its 30 s, not after a day"


def test_forward_jump_does_not_expire_leases_in_flight(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    for i in range(5):
        _add(outbox, f"2.25.3{i}", tmp_path)
    in_flight = _claim(outbox, lease=600.0)
    clocks.jump(DAY)
    assert _claim(outbox) == []  # nothing claimed twice
    clocks.advance(601.0)  # the lease does run out after its time
    assert sorted(_claim(outbox)) == sorted(in_flight)


def test_forward_jump_during_an_outage_does_not_age_rows(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    for i in range(3):
        _add(outbox, f"2.25.4{i}", tmp_path)
    ids = _claim(outbox)
    clocks.advance(3600.0)
    clocks.jump(4 * DAY)  # past a 72 h max_age, by the clock alone
    assert outbox.queue("default").aged_out(ids, 72 * 3600.0) == set()
    assert outbox.oldest_waiting_age() == pytest.approx(3600.0, abs=5)
    clocks.advance(72 * 3600.0)  # real time does age them
    assert outbox.queue("default").aged_out(ids, 72 * 3600.0) == set(ids)


def test_a_jump_while_the_agent_was_down_is_clamped_at_start(
    tmp_path: Path, clocks: Clocks
) -> None:
    """The clock was a day ahead when the rows were scheduled; the agent restarts with the right
    time: the next attempts, a day away now, are brought back to the backoff cap."""
    ob = Outbox(tmp_path / "outbox.db", clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    _add(ob, "2.25.50", tmp_path)
    ob.queue("default").mark_retry(_claim(ob), error="503", delay=60.0)
    ob.queue("default").circuit_failure("503", delay=60.0, started_at=clocks.wall)
    ob.close()
    clocks.wall -= DAY  # a new process: no earlier reading to compare with
    ob = Outbox(tmp_path / "outbox.db", clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    try:
        assert ob.clamp_future(longest=3600.0, cap=300.0) == 1
        due = ob.queue("default").next_due_at()
        assert due is not None and due - clocks.wall == pytest.approx(300.0)
        assert ob.queue("default").circuit_acquire(probe_lease=60)[0] <= 300.0
    finally:
        ob.close()


def test_small_steps_are_not_jumps(outbox: Outbox, clocks: Clocks, tmp_path: Path) -> None:
    _add(outbox, "2.25.60", tmp_path)
    with capture_logs() as logs:
        for _ in range(100):
            clocks.advance(10.0)
            clocks.wall += 0.5  # NTP slewing, not a jump
            outbox.now()
    assert not [e for e in logs if e["event"] == "clock_jumped"]


# --------------------------------------------------------------------------- a damaged database


def _database_with_rows(db: Path, tmp_path: Path, n: int = 300) -> None:
    ob = Outbox(db)
    for i in range(n):
        _add(ob, f"2.25.{1000 + i}", tmp_path)
    ob.checkpoint()
    ob.close()


def _damage(db: Path, how: str) -> bytes:
    """Damage ``db`` as a bad disk or a bad copy would; return the damaged bytes."""
    data = bytearray(db.read_bytes())
    rng = random.Random(how)
    if how == "truncated":
        data = data[: len(data) // 3]
    elif how == "header":
        data[:100] = rng.randbytes(100)
    else:
        for p in range(1, len(data) // 4096, 2):
            data[p * 4096 : (p + 1) * 4096] = rng.randbytes(4096)
    db.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("how", ["truncated", "header", "pages"])
def test_a_damaged_database_is_kept_aside_and_replaced(tmp_path: Path, how: str) -> None:
    db = tmp_path / "outbox.db"
    _database_with_rows(db, tmp_path)
    data = _damage(db, how)
    with capture_logs() as logs:
        ob, kept = open_outbox(db)
    try:
        assert kept is not None and kept.read_bytes() == bytes(data)  # kept as it was
        assert ob.counts() == {"queued": 0, "sending": 0, "sent": 0, "dead": 0}
        assert ob.integrity_problem() is None
    finally:
        ob.close()
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["outbox_damaged"]


def test_a_sound_database_is_left_alone_and_other_errors_are_not_damage(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    _database_with_rows(db, tmp_path, 5)
    ob, kept = open_outbox(db)
    ob.close()
    assert kept is None and not list(tmp_path.glob("*.damaged-*"))
    folder = tmp_path / "not-a-file.db"
    folder.mkdir()
    with pytest.raises(sqlite3.OperationalError):
        open_outbox(folder)
    assert folder.is_dir()


def test_retention_leaves_a_new_version_written_after_the_send(tmp_path: Path) -> None:
    """Retention picks a row sent a day ago; meanwhile its instance arrived again and its file
    was rewritten: that file is the new version's and stays."""
    clocks = Clocks()
    ob = Outbox(tmp_path / "outbox.db", clock=lambda: clocks.wall)
    try:
        for uid in ("2.25.70", "2.25.71"):
            (tmp_path / f"{uid}.dcm").write_bytes(b"first")
            _add(ob, uid, tmp_path)
        _deliver(ob)
        for uid in ("2.25.70", "2.25.71"):  # written before the send, as always
            os.utime(tmp_path / f"{uid}.dcm", (clocks.wall - 10, clocks.wall - 10))
        clocks.advance(DAY + 60)
        (tmp_path / "2.25.71.dcm").write_bytes(b"second")  # a new version, written now
        os.utime(tmp_path / "2.25.71.dcm", (clocks.wall, clocks.wall))
        assert ob.purge_sent_files(DAY) == 1
        assert not (tmp_path / "2.25.70.dcm").exists()
        assert (tmp_path / "2.25.71.dcm").read_bytes() == b"second"
    finally:
        ob.close()


_FS_CALLS = ("stat", "lstat", "rename", "replace", "unlink", "link")


def _retention_with_a_new_version_at(
    folder: Path, at: int, monkeypatch: pytest.MonkeyPatch
) -> bool:
    """One retention pass over a sent row whose instance arrives again (its new version renamed
    onto the name) just before the pass's ``at``-th file-system call on the outbox folder; then
    intake commits it. False if the pass made fewer calls (nothing arrived)."""
    real = {fn: getattr(os, fn) for fn in _FS_CALLS}
    clocks = Clocks()
    ob = Outbox(folder / "outbox.db", clock=lambda: clocks.wall)
    name = folder / "2.25.80.dcm"
    name.write_bytes(b"first")
    os.utime(name, (clocks.wall - 10, clocks.wall - 10))
    _add(ob, "2.25.80", folder)
    _deliver(ob)
    clocks.advance(DAY + 60)
    calls = 0

    def arrive() -> None:
        tmp = folder / "2.25.80.dcm.tmp"
        tmp.write_bytes(b"second")
        os.utime(tmp, (clocks.wall, clocks.wall))
        real["replace"](tmp, name)

    def hooked(fn: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            if args and str(args[0]).startswith(str(folder)) and ".db" not in str(args[0]):
                calls += 1
                if calls == at:
                    arrive()
            return real[fn](*args, **kwargs)

        return call

    try:
        with monkeypatch.context() as m:
            for fn in _FS_CALLS:
                m.setattr(os, fn, hooked(fn))
            ob.purge_sent_files(DAY)
        if calls < at:
            return False
        assert _add(ob, "2.25.80", folder, size=6) is False  # intake commits the new version
        row = ob.get("2.25.80")
        assert row is not None and row.state == "queued", at
        assert name.read_bytes() == b"second", at
        ob.purge_sent_files(DAY)  # queued: nothing to do
        assert name.read_bytes() == b"second", at
        return True
    finally:
        ob.close()


def test_retention_never_removes_a_version_that_takes_the_name_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version of a sent instance is renamed onto its outbox name (as a worker does) at
    every point of a retention pass in turn (before each file-system call it makes on the outbox
    folder): once intake commits its row, the new version is there and queued, whatever the
    instant; a file left aside by a stop is removed at the next start-up."""
    instants = 0
    for at in range(1, 20):
        (tmp_path / str(at)).mkdir()
        if not _retention_with_a_new_version_at(tmp_path / str(at), at, monkeypatch):
            break  # every instant of the pass was tried
        instants += 1
    assert instants >= 2
    left = tmp_path / "left"
    left.mkdir()
    (left / ".2.25.81.dcm.retention").write_bytes(b"sent")
    ob = Outbox(left / "outbox.db")
    try:
        assert ob.reconcile(left)["temp"] == 1
    finally:
        ob.close()
    assert not list(left.glob("*.retention"))


@pytest.mark.parametrize("how", ["truncated", "header", "pages"])
@pytest.mark.parametrize("ids", [[], ["5"], ["--dead", "7", "9"]], ids=["all", "one", "some"])
def test_retry_on_a_damaged_database_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, ids: list[str]
) -> None:
    """``retry`` (all dead rows, or named ones) on a damaged outbox: one line, exit 1, the
    database left as it is for the agent to keep aside; ``status`` still answers."""
    from gateway_agent.cli import main

    state = tmp_path / "state"
    state.mkdir()
    db = state / "outbox.db"
    _database_with_rows(db, tmp_path)
    data = _damage(db, how)
    assert main(["retry", "--state-dir", str(state), "--inbox", str(tmp_path), *ids]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gateway-agent retry: outbox database damaged"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert db.read_bytes() == data
    assert main(["status", "--state-dir", str(state), "--inbox", str(tmp_path)]) == 0
    capsys.readouterr()
