"""Retention of delivered outbox files when the wall clock is set (forward or back) while the
agent runs: files go after the retention period of real time, never early, never never."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.agent.outbox.store import Outbox

from ._uploadkit import Clocks

DAY = 86400.0


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def outbox(tmp_path: Path, clocks: Clocks) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db", clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    yield ob
    ob.close()


def _written(outbox: Outbox, clocks: Clocks, folder: Path, uid: str, data: bytes) -> Path:
    """An outbox file written now (its mtime by the wall clock, as the kernel sets it) and its
    row committed."""
    path = folder / f"{uid}.dcm"
    path.write_bytes(data)
    os.utime(path, (clocks.wall, clocks.wall))
    outbox.add(
        sop_instance_uid=uid,
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        path=path,
        size=len(data),
        audit={},
    )
    return path


def _deliver(outbox: Outbox) -> None:
    """Every due delivery acknowledged, and its storage proven."""
    queue = outbox.queue("default")
    ids = [r.id for r in queue.claim(max_items=100, max_bytes=1 << 30, lease_seconds=600)]
    queue.mark_sent(ids)
    queue.mark_proven(ids)


def test_a_forward_jump_does_not_remove_delivered_files_early(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    """Delivered an hour ago, then the clock is set four days on: with a retention of a day the
    file stays until a day of real time has passed since it was sent."""
    path = _written(outbox, clocks, tmp_path, "2.25.1", b"first")
    _deliver(outbox)
    clocks.advance(3600.0)
    clocks.jump(4 * DAY)
    assert outbox.purge_sent_files(DAY) == 0
    assert path.exists()
    clocks.advance(DAY - 3600.0 + 60.0)
    assert outbox.purge_sent_files(DAY) == 1
    assert not path.exists()


def test_a_file_written_before_a_backward_jump_is_still_removed(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    """Written, then the clock is set back ten minutes, then sent: the file's time is later
    than its send by the clock now, as for a new version written after the send. It goes all
    the same once the retention period has passed since it was written, by the clock now (not
    never); a new version written after the send still stays."""
    path = _written(outbox, clocks, tmp_path, "2.25.2", b"first")
    clocks.jump(-600.0)
    clocks.advance(1.0)
    _deliver(outbox)
    kept = _written(outbox, clocks, tmp_path, "2.25.3", b"first")
    _deliver(outbox)
    clocks.advance(DAY + 60.0)
    kept.write_bytes(b"second")  # a new version, its row not committed yet
    os.utime(kept, (clocks.wall, clocks.wall))
    assert outbox.purge_sent_files(DAY) == 0  # the first: written less than a day ago (by now)
    clocks.advance(600.0)
    assert outbox.purge_sent_files(DAY) == 1
    assert not path.exists()
    assert kept.read_bytes() == b"second"


def test_a_backward_jump_keeps_delivered_files_no_longer_than_it_set_the_clock(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    """Sent, then the clock is set back an hour: the file stays at most the retention period
    and the hour (its own time is the clock's before the jump)."""
    path = _written(outbox, clocks, tmp_path, "2.25.4", b"first")
    _deliver(outbox)
    clocks.advance(60.0)
    clocks.jump(-3600.0)
    clocks.advance(DAY + 3600.0)
    assert outbox.purge_sent_files(DAY) == 1
    assert not path.exists()
