"""Throughput plumbing: group commit (``Outbox.add_many``, intake), batches filling (uploader)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.agent.outbox.db import OutboxRow
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.outbox.upkeep import row_from_file
from gateway_agent.agent.upload.destinations import SendResult
from gateway_agent.agent.upload.destinations.folder import FolderDestination
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.config import DestinationSettings
from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret

from ._agent_util import agent_settings, start_intake, wait_until, write_synthetic
from ._uploadkit import make_files, wait_for


def _item(uid: str, path: Path, size: int = 10) -> dict[str, Any]:
    return {
        "sop_instance_uid": uid,
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "path": path,
        "size": size,
        "audit": {"k": uid},
    }


def _row_items(paths: Sequence[Path]) -> list[dict[str, Any]]:
    return [row_from_file(p, {}) for p in paths]


# -- Outbox.add_many ----------------------------------------------------------------------------
def test_add_many_is_one_durable_idempotent_group(tmp_path: Path, outbox: Outbox) -> None:
    assert outbox.add_many([]) == []
    first = outbox.add_many([_item(f"1.9.{i}", tmp_path / f"{i}.dcm") for i in range(5)])
    assert first == [True] * 5
    # Already there, new, and a duplicate inside the group: per-item answers.
    again = outbox.add_many(
        [
            _item("1.9.0", tmp_path / "0.dcm"),
            _item("1.9.7", tmp_path / "7.dcm"),
            _item("1.9.7", tmp_path / "7b.dcm"),
        ]
    )
    assert again == [False, True, False]
    assert outbox.audit(outbox.get("1.9.7").id) == {"k": "1.9.7"}  # type: ignore[union-attr]
    outbox.close()
    reopened = Outbox(tmp_path / "state" / "outbox.db")
    try:
        assert reopened.counts()["queued"] == 6
        assert reopened.get("1.9.7").path == tmp_path / "7.dcm"  # type: ignore[union-attr]
    finally:
        reopened.close()


def test_add_many_is_all_or_nothing(tmp_path: Path, outbox: Outbox) -> None:
    bad = [_item("1.8.1", tmp_path / "a.dcm"), _item("", tmp_path / "b.dcm")]
    with pytest.raises(ValueError, match="sop_instance_uid"):
        outbox.add_many(bad)
    with pytest.raises(ValueError, match="size"):
        outbox.add_many([_item("1.8.1", tmp_path / "a.dcm"), _item("1.8.2", tmp_path, -1)])
    assert outbox.counts()["queued"] == 0
    assert outbox.add(**_item("1.8.1", tmp_path / "a.dcm")) is True


def test_due_summary_counts_due_rows_and_bytes(tmp_path: Path, outbox: Outbox) -> None:
    outbox.add_many([_item(f"1.7.{i}", tmp_path / f"{i}", size=100) for i in range(4)])
    assert outbox.queue("default").due_summary(10) == (4, 400)
    assert outbox.queue("default").due_summary(3) == (3, 300)
    outbox.queue("default").claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    assert outbox.queue("default").due_summary(10) == (3, 300)


# -- intake group commit ------------------------------------------------------------------------
class _RecordingOutbox:
    """The real outbox, recording the size of each group commit."""

    def __init__(self, real: Outbox) -> None:
        self.real = real
        self.groups: list[int] = []

    def add(self, **kw: Any) -> bool:
        self.groups.append(1)
        return self.real.add(**kw)

    def add_many(self, items: Sequence[dict[str, Any]]) -> list[bool]:
        result = self.real.add_many(items)
        self.groups.append(len(items))
        return result


def test_intake_commits_groups_before_removing_originals(tmp_path: Path, outbox: Outbox) -> None:
    secret = load_or_create_secret(tmp_path / "secret.key")
    engine = Deidentifier(secret, DeidOptions.from_settings(agent_settings(tmp_path).deid))
    recording = _RecordingOutbox(outbox)
    woken: list[int] = []
    inbox = tmp_path / "inbox"
    it = start_intake(tmp_path, engine, recording, workers=2, on_committed=lambda: woken.append(1))
    try:
        paths = write_synthetic(inbox / "s", 24)
        for p in paths:
            it.submit(p)
        assert wait_until(it.idle, timeout=120)
    finally:
        it.stop()
    assert sum(recording.groups) == 24 and len(woken) == 24 and it.committed == 24
    assert not any(p.exists() for p in paths)
    rows = outbox.rows()
    assert len(rows) == 24 and all(r.path.is_file() for r in rows)


# -- uploader: batches fill while more rows are coming ------------------------------------------
class _Recording:
    """A folder destination that records the size of every request."""

    def __init__(self, root: Path) -> None:
        self.inner = FolderDestination(root)
        self.label = "recording"
        self.batches: list[int] = []

    def send(self, items: Sequence[OutboxRow]) -> SendResult:
        self.batches.append(len(items))
        return self.inner.send(items)

    def close(self) -> None:
        pass


def _folder_settings(tmp_path: Path, **kw: Any) -> DestinationSettings:
    return DestinationSettings(kind="folder", folder=tmp_path / "dest", **kw)


def test_uploader_fills_batches_while_more_rows_are_coming(tmp_path: Path, outbox: Outbox) -> None:
    items = _row_items(make_files(tmp_path / "files", 20))
    dest = _Recording(tmp_path / "dest")
    adding = threading.Event()
    adding.set()
    up = Uploader(
        outbox,
        dest,
        _folder_settings(tmp_path, batch_max_instances=10, parallel_requests=3),
        more_coming=adding.is_set,
        linger_seconds=60.0,  # never reached: the batches fill first
    )
    up.start()
    try:
        for item in items:  # rows trickle in, as from intake
            outbox.add_many([item])
            up.wake()
        assert wait_for(lambda: outbox.counts()["sent"] == 20, 30)
    finally:
        adding.clear()
        up.stop(deadline=time.monotonic() + 10)
    assert dest.batches == [10, 10]


def test_uploader_sends_at_once_when_nothing_more_is_coming(tmp_path: Path, outbox: Outbox) -> None:
    items = _row_items(make_files(tmp_path / "files", 3))
    dest = _Recording(tmp_path / "dest")
    up = Uploader(
        outbox,
        dest,
        _folder_settings(tmp_path, batch_max_instances=10, parallel_requests=2),
        more_coming=lambda: False,
        linger_seconds=3600.0,  # would time the test out if it were waited for
    )
    up.start()
    try:
        outbox.add_many(items)
        up.wake()
        assert wait_for(lambda: outbox.counts()["sent"] == 3, 30)
    finally:
        up.stop(deadline=time.monotonic() + 10)
    assert sum(dest.batches) == 3
