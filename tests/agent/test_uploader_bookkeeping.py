"""The uploader when recording an outcome fails (state disk full): retried in order before new
work; at stop, left ``sending`` for ``requeue_stale``; nothing lost."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations.folder import FolderDestination
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.config import DestinationSettings

from ._uploadkit import add_files, make_files, wait_for


class _FullDiskOutbox:
    """The real Outbox whose destination's ``mark_sent`` and ``circuit_success`` fail with
    SQLite's disk-full error while ``full`` is set (other writes, e.g. ``claim``, work)."""

    def __init__(self, inner: Outbox) -> None:
        self._outbox = inner
        self._inner = inner.queue("default")
        self.full = True
        self.failures = 0
        self.calls: list[str] = []

    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.full:
            self.failures += 1
            raise sqlite3.OperationalError("database or disk is full")
        self.calls.append(name)
        return getattr(self._inner, name)(*args, **kwargs)

    def mark_sent(self, ids: Any, **kwargs: Any) -> None:
        self._write("mark_sent", ids, **kwargs)

    def circuit_success(self) -> Any:
        return self._write("circuit_success")

    def queue(self, name: str) -> Any:
        assert name == "default"
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _counts(outbox: Outbox) -> dict[str, int]:
    return {state: n for state, n in outbox.counts().items() if n}


def _uploader(outbox: Any, dest: Path, n: int) -> Uploader:
    settings = DestinationSettings(kind="folder", batch_max_instances=n)
    return Uploader(outbox, FolderDestination(dest), settings)


def test_loop_once_claims_nothing_new_until_the_outcome_is_recorded(tmp_path: Path) -> None:
    real = Outbox(tmp_path / "outbox.db")
    try:
        add_files(real, make_files(tmp_path / "in", 3, seed="book-1"))
        full = _FullDiskOutbox(real)
        up = _uploader(full, tmp_path / "dest", 2)
        assert up.loop_once() == 2  # sent, but not recorded
        assert _counts(real) == {"sending": 2, "queued": 1}
        assert up.loop_once() == 0  # the retry fails again: no new claim
        assert full.failures == 2 and _counts(real) == {"sending": 2, "queued": 1}
        full.full = False
        assert up.loop_once() == 1  # recorded first (in order), then the next batch
        assert full.calls[:1] == ["mark_sent"]
        assert _counts(real) == {"sent": 3}
    finally:
        real.close()


def test_stop_leaves_unrecorded_rows_for_requeue_stale(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    real = Outbox(db)
    try:
        uids = add_files(real, make_files(tmp_path / "in", 2, seed="book-2"))
        full = _FullDiskOutbox(real)
        up = _uploader(full, tmp_path / "dest", 2)
        up.start()
        try:
            wait_for(lambda: full.failures >= 1, 10)
        finally:
            # Tries once more (still full), then leaves the rows 'sending'.
            up.stop(time.monotonic() + 10)
        assert full.failures >= 2
        assert _counts(real) == {"sending": 2}
    finally:
        real.close()
    # The next start: requeued, re-sent (harmless, the destination is idempotent), recorded.
    again = Outbox(db)
    try:
        assert again.requeue_stale() == 2
        up = _uploader(again, tmp_path / "dest", 2)
        assert up.loop_once() == 2
        assert _counts(again) == {"sent": 2}
        assert {r.sop_instance_uid for r in again.rows()} == set(uids)
    finally:
        again.close()
