"""A new version of an instance arriving again, on a real SQLite file: its row describes the new
version (where it came from, its scanner, its header), and it goes where the rules send that
version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.config import MatchSettings

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
ROUTES = [
    Route("ct1", MatchSettings(inbox_folder=["ct-1"])),
    Route("push", MatchSettings(calling_ae=["CT01"])),
    Route("archive"),
]


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "outbox.db", routes=ROUTES)
    yield ob
    ob.close()


def _version(tmp_path: Path, uid: str, size: int, **where: Any) -> dict[str, Any]:
    path = tmp_path / f"{uid}.dcm"
    path.write_bytes(b"x" * size)
    return {
        "sop_instance_uid": uid,
        "study_instance_uid": "2.25.1",
        "series_instance_uid": "2.25.2",
        "sop_class_uid": CT,
        "modality": "CT",
        "path": path,
        "size": size,
        "audit": {"version": size},
        **where,
    }


def _send_all(ob: Outbox) -> None:
    for name in ob.destination_names():
        queue = ob.queue(name)
        rows = queue.claim(max_items=100, max_bytes=1 << 30, lease_seconds=600)
        queue.mark_sent([r.id for r in rows])


def _states(ob: Outbox, uid: str) -> dict[str, str]:
    return {name: row.state for name, row in ob.deliveries_of(uid).items()}


def test_the_row_describes_the_version_arrived_again(routed: Outbox, tmp_path: Path) -> None:
    """Dropped into the inbox's ``ct-1`` folder, delivered; a corrected version is pushed over
    C-STORE by another scanner: the row names the listener, its calling AE, its scanner and its
    header, and the version goes where the rules send it (``push``, ``archive``). ``ct1``,
    whose rule names the folder, keeps the previous version it was sent: not sent again."""
    first = _version(tmp_path, "2.25.10", 10, inbox_folder="ct-1", scanner="scanner-a")
    assert routed.add(**first) is True
    assert _states(routed, "2.25.10") == {"archive": "queued", "ct1": "queued"}
    _send_all(routed)
    again = _version(
        tmp_path,
        "2.25.10",
        12,
        source="listener",
        calling_ae="CT01",
        scanner="scanner-b",
        study_instance_uid="2.25.9",
        series_instance_uid="2.25.8",
        sop_class_uid=MR,
        modality="MR",
    )
    assert routed.add(**again) is False
    assert _states(routed, "2.25.10") == {"archive": "queued", "ct1": "sent", "push": "queued"}
    row = routed.deliveries_of("2.25.10")["push"]
    assert (row.source, row.calling_ae, row.inbox_folder, row.scanner) == (
        "listener",
        "CT01",
        None,
        "scanner-b",
    )
    assert (row.study_instance_uid, row.series_instance_uid, row.sop_class_uid) == (
        "2.25.9",
        "2.25.8",
        MR,
    )
    assert (row.modality, row.size) == ("MR", 12)
    assert routed.audit(row.id) == {"version": 12}


def test_a_version_not_routed_where_the_previous_one_waits(routed: Outbox, tmp_path: Path) -> None:
    """The previous version waits for ``ct1`` (queued there, refused for good elsewhere); the
    new version comes from another folder: ``ct1`` will not receive it, so its waiting delivery
    goes, and the others are queued again for the new version."""
    assert routed.add(**_version(tmp_path, "2.25.11", 10, inbox_folder="ct-1"))
    archive = routed.queue("archive")
    archive.mark_dead(
        [r.id for r in archive.claim(max_items=10, max_bytes=1 << 30, lease_seconds=60)],
        error="http_400 rejected",
    )
    assert _states(routed, "2.25.11") == {"archive": "dead", "ct1": "queued"}
    assert routed.add(**_version(tmp_path, "2.25.11", 11, inbox_folder="ct-2")) is False
    assert _states(routed, "2.25.11") == {"archive": "queued"}
    assert routed.deliveries_of("2.25.11")["archive"].inbox_folder is None  # not a named folder
    assert routed.counts()["dead"] == 0


def test_a_version_no_rule_matches_is_unrouted(tmp_path: Path) -> None:
    """Only a rule on the folder: the new version from another folder goes nowhere (the
    instance is counted as unrouted) rather than where the previous version was going."""
    ob = Outbox(tmp_path / "outbox.db", routes=[ROUTES[0]])
    try:
        assert ob.add(**_version(tmp_path, "2.25.12", 10, inbox_folder="ct-1"))
        assert ob.add(**_version(tmp_path, "2.25.12", 11, inbox_folder="elsewhere")) is False
        assert _states(ob, "2.25.12") == {}
        assert ob.unrouted_count() == 1
    finally:
        ob.close()
