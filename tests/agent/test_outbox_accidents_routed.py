"""The outbox under accidents with several destinations, on a real SQLite file: an instance that
arrives again, a wall clock that jumps, retention beside a new version, a damaged database
rebuilt, and ``status`` reading without writing, each per (instance, destination)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.agent.outbox.repair import open_outbox
from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.config import MatchSettings

from ._uploadkit import Clocks, make_files

DAY = 86400.0
ROUTES = [Route("pacs", MatchSettings(modality=["CT"])), Route("archive")]


@pytest.fixture
def outbox(tmp_path: Path, clocks: Clocks) -> Iterator[Outbox]:
    ob = Outbox(
        tmp_path / "outbox.db",
        routes=ROUTES,
        clock=lambda: clocks.wall,
        monotonic=lambda: clocks.mono,
    )
    yield ob
    ob.close()


def _add(ob: Outbox, uid: str, tmp_path: Path, *, modality: str = "CT", size: int = 10) -> bool:
    path = tmp_path / f"{uid}.dcm"
    path.write_bytes(b"x" * size)
    os.utime(path, (ob.now(), ob.now()))  # written now, by the outbox's clock
    return ob.add(
        sop_instance_uid=uid,
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=modality,
        path=path,
        size=size,
        audit={},
    )


def _claim(ob: Outbox, name: str) -> list[int]:
    return [r.id for r in ob.queue(name).claim(max_items=100, max_bytes=1 << 30, lease_seconds=600)]


def _states(ob: Outbox, uid: str) -> dict[str, str]:
    return {name: row.state for name, row in ob.deliveries_of(uid).items()}


def test_arriving_again_requeues_every_delivery_and_voids_the_one_in_flight(
    outbox: Outbox, tmp_path: Path
) -> None:
    """Sent at the PACS, being sent to the archive: a new version arrives. The PACS delivery is
    queued again at once; the archive's acknowledgement in flight is of the previous version, so
    that delivery is queued again too; the PACS's own delivery in flight is not touched."""
    assert _add(outbox, "2.25.10", tmp_path)
    outbox.queue("pacs").mark_sent(_claim(outbox, "pacs"))
    in_flight = _claim(outbox, "archive")
    assert _states(outbox, "2.25.10") == {"archive": "sending", "pacs": "sent"}
    assert _add(outbox, "2.25.10", tmp_path, size=12) is False
    assert _states(outbox, "2.25.10") == {"archive": "sending", "pacs": "queued"}
    pacs_again = _claim(outbox, "pacs")
    outbox.queue("archive").mark_sent(in_flight)  # the ack is of the first version
    outbox.queue("pacs").mark_sent(pacs_again)  # this one is of the new version
    assert _states(outbox, "2.25.10") == {"archive": "queued", "pacs": "sent"}
    outbox.queue("archive").mark_sent(_claim(outbox, "archive"))
    assert _states(outbox, "2.25.10") == {"archive": "sent", "pacs": "sent"}
    assert outbox.get("2.25.10").size == 12  # type: ignore[union-attr]


def test_arriving_again_after_dead_at_one_destination(outbox: Outbox, tmp_path: Path) -> None:
    _add(outbox, "2.25.11", tmp_path)
    outbox.queue("pacs").mark_dead(_claim(outbox, "pacs"), error="http_400 rejected")
    outbox.queue("archive").mark_sent(_claim(outbox, "archive"))
    _add(outbox, "2.25.11", tmp_path)
    rows = outbox.deliveries_of("2.25.11")
    assert {n: (r.state, r.attempts, r.last_error) for n, r in rows.items()} == {
        "archive": ("queued", 0, None),
        "pacs": ("queued", 0, None),
    }


def test_a_clock_jump_moves_every_destinations_deliveries_and_circuit(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    _add(outbox, "2.25.20", tmp_path)
    for name in ("pacs", "archive"):
        queue = outbox.queue(name)
        queue.mark_retry(_claim(outbox, name), error="503", delay=30.0)
        queue.circuit_failure("503", delay=30.0, started_at=clocks.wall)
    clocks.jump(DAY)  # NTP corrects a clock a day behind
    clocks.advance(31)
    for name in ("pacs", "archive"):
        assert outbox.queue(name).circuit_acquire(probe_lease=60)[0] == 0.0, name
        assert _claim(outbox, name), f"{name}: due after its 30 s, not after a day"


def test_clamp_at_start_up_covers_every_destination(tmp_path: Path, clocks: Clocks) -> None:
    ob = Outbox(tmp_path / "outbox.db", routes=ROUTES, clock=lambda: clocks.wall)
    _add(ob, "2.25.30", tmp_path)
    for name in ("pacs", "archive"):
        ob.queue(name).mark_retry(_claim(ob, name), error="503", delay=60.0)
    ob.close()
    clocks.jump(-DAY)  # set back while the agent was down
    ob = Outbox(tmp_path / "outbox.db", routes=ROUTES, clock=lambda: clocks.wall)
    try:
        assert ob.clamp_future(longest=3600.0, cap=300.0) == 2
        for name in ("pacs", "archive"):
            due = ob.queue(name).next_due_at()
            assert due is not None and due <= clocks.wall + 300.0
    finally:
        ob.close()


def test_age_is_per_destination(outbox: Outbox, clocks: Clocks, tmp_path: Path) -> None:
    """A delivery queued again by ``retry`` counts its age from then; the other's does not."""
    _add(outbox, "2.25.40", tmp_path)
    ids = _claim(outbox, "pacs")
    outbox.queue("archive").mark_dead(_claim(outbox, "archive"), error="http_400 rejected")
    clocks.advance(3600)
    assert outbox.queue("archive").retry_dead() == 1
    assert outbox.queue("pacs").aged_out(ids, 1800.0) == set(ids)
    assert outbox.queue("archive").aged_out(ids, 1800.0) == set()


def _deliver(outbox: Outbox, name: str) -> None:
    """The destination's due deliveries acknowledged, and their storage proven."""
    ids = _claim(outbox, name)
    outbox.queue(name).mark_sent(ids)
    outbox.queue(name).mark_proven(ids)


def test_retention_keeps_a_file_written_after_its_first_delivery(
    outbox: Outbox, clocks: Clocks, tmp_path: Path
) -> None:
    """Delivered to the PACS (acknowledged and proven), then a new version is written under the
    name (its row not committed yet), then the archive acknowledges: retention (ten minutes)
    must not take the new version (younger than an hour)."""
    _add(outbox, "2.25.50", tmp_path)
    _deliver(outbox, "pacs")
    clocks.advance(60)
    name = tmp_path / "2.25.50.dcm"
    name.write_bytes(b"second")
    os.utime(name, (clocks.wall, clocks.wall))
    clocks.advance(60)
    _deliver(outbox, "archive")
    clocks.advance(601)
    assert outbox.purge_sent_files(600) == 0
    assert name.read_bytes() == b"second"
    assert _add(outbox, "2.25.50", tmp_path, size=6) is False  # its row, at last
    assert _states(outbox, "2.25.50") == {"archive": "queued", "pacs": "queued"}
    for q in ("pacs", "archive"):
        _deliver(outbox, q)
    clocks.advance(DAY + 1)
    assert outbox.purge_sent_files(DAY) == 1 and not name.exists()


def test_a_damaged_database_is_rebuilt_with_every_delivery(tmp_path: Path) -> None:
    files = tmp_path / "outbox"
    made = make_files(files, 3)
    db = tmp_path / "outbox.db"
    ob = Outbox(db, routes=ROUTES)
    for path in made:
        ob.add_file(path, audit={})
    ob.checkpoint()
    ob.close()
    db.write_bytes(b"\0" * 4096)
    ob, kept = open_outbox(db, routes=ROUTES)
    try:
        assert kept is not None
        assert ob.reconcile(files)["added"] == 3
        assert ob.counts_by_destination() == {
            "pacs": {"queued": 3, "sending": 0, "sent": 0, "dead": 0},
            "archive": {"queued": 3, "sending": 0, "sent": 0, "dead": 0},
        }
    finally:
        ob.close()


def test_a_read_only_outbox_writes_nothing(tmp_path: Path) -> None:
    """``status`` opens the outbox read-only: a destination it names that the outbox does not
    know yet is reported (empty) without a row being made, and the file is unchanged."""
    db = tmp_path / "outbox.db"
    ob = Outbox(db, routes=[Route("pacs")])
    _add(ob, "2.25.60", tmp_path)
    ob.checkpoint()
    ob.close()
    before = db.read_bytes()
    ro = Outbox(db, routes=[Route("pacs"), Route("archive")], read_only=True)
    try:
        report = ro.destination_report()
        assert report["archive"]["counts"]["queued"] == 0
        assert report["pacs"]["counts"]["queued"] == 1
        with pytest.raises(sqlite3.OperationalError):
            ro.queue("pacs").retry_now()
    finally:
        ro.close()
    assert db.read_bytes() == before
