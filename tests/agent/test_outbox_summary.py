"""The per-destination summary (``/metrics``, ``/readyz``, ``status``): read through indexes and
the kept counts, never by reading every delivery; the same answers as counting the rows."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.agent.outbox.db import STATES
from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.store import Outbox

from ._uploadkit import FakeClock

ROUTES = [Route("pacs"), Route("archive"), Route("research")]


def _item(i: int, tmp: Path) -> dict[str, object]:
    return {
        "sop_instance_uid": f"2.25.{i}",
        "study_instance_uid": "2.25.1",
        "series_instance_uid": f"2.25.2.{i // 50}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "path": tmp / f"{i}.dcm",
        "size": 1000 + i,
        "audit": {},
    }


def _busy(ob: Outbox, clock: FakeClock, tmp: Path, n: int = 300) -> None:
    """Deliveries in every state at every destination: sent (proven, unproven, pending, files
    gone), dead, retried, sending, queued, arrived again, compacted away."""
    ob.add_many([_item(i, tmp) for i in range(n)])
    for k, name in enumerate(r.name for r in ROUTES):
        q = ob.queue(name)
        rows = q.claim(max_items=n // 2 + 10 * k, max_bytes=10**12, lease_seconds=60)
        ids = [r.id for r in rows]
        q.mark_sent(ids[: len(ids) // 2])
        q.mark_proven(ids[: len(ids) // 4])
        q.mark_proven(ids[len(ids) // 4 : len(ids) // 3], proven=False)
        q.mark_dead(ids[len(ids) // 2 : len(ids) // 2 + 20], error="refused")
        q.mark_retry(ids[len(ids) // 2 + 20 : len(ids) // 2 + 40], error="busy", delay=5)
        q.retry_dead(ids[len(ids) // 2 : len(ids) // 2 + 5])
    ob.add_many([_item(i, tmp) for i in range(0, 40)])  # arrived again: queued again
    clock.advance(3600)
    # Files gone and old rows compacted away: the deliveries of the first instances go.
    ob._conn.execute("update instances set file_gone = 1 where id <= 10")
    ob.compact(60)


def _counted_from_rows(ob: Outbox) -> dict[str, dict[str, int]]:
    out = {name: dict.fromkeys(STATES, 0) for name in ob.destination_names()}
    for name, state, n in ob._conn.execute(
        "select destination, state, count(*) from deliveries group by 1, 2"
    ):
        out[name][state] = n
    return out


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[tuple[Outbox, FakeClock]]:
    clock = FakeClock()
    ob = Outbox(tmp_path / "outbox.db", clock=clock, routes=ROUTES)
    yield ob, clock
    ob.close()


def test_the_kept_counts_are_the_rows_counted(
    outbox: tuple[Outbox, FakeClock], tmp_path: Path
) -> None:
    ob, clock = outbox
    _busy(ob, clock, tmp_path)
    expected = _counted_from_rows(ob)
    assert {s for c in expected.values() for s, n in c.items() if n} == set(STATES)
    assert ob.counts_by_destination() == expected
    assert ob.counts() == {s: sum(c[s] for c in expected.values()) for s in STATES}
    assert ob.counts("archive") == expected["archive"]


def test_a_rolled_back_change_leaves_the_counts_as_they_were(
    outbox: tuple[Outbox, FakeClock], tmp_path: Path
) -> None:
    ob, clock = outbox
    _busy(ob, clock, tmp_path, n=60)
    before = ob.counts_by_destination()
    with pytest.raises(RuntimeError), ob._tx() as c:
        c.execute("update deliveries set state = 'dead'")
        raise RuntimeError("crash mid-transaction")
    assert ob.counts_by_destination() == before == _counted_from_rows(ob)


def test_an_outbox_of_an_earlier_build_gets_its_counts_at_the_next_open(
    tmp_path: Path,
) -> None:
    """No ``delivery_counts`` yet (an outbox written by an earlier build of this version):
    ``status`` (read-only) counts the rows; the agent's next open counts them once and keeps
    them from then on."""
    db = tmp_path / "outbox.db"
    clock = FakeClock()
    ob = Outbox(db, clock=clock, routes=ROUTES)
    _busy(ob, clock, tmp_path)
    expected = _counted_from_rows(ob)
    ob.close()
    con = sqlite3.connect(db, isolation_level=None)
    for ddl in (
        "drop trigger deliveries_count_added",
        "drop trigger deliveries_count_removed",
        "drop trigger deliveries_count_moved",
        "drop table delivery_counts",
        "drop index deliveries_waiting",
        "drop index deliveries_kept",
    ):
        con.execute(ddl)
    con.close()
    status = Outbox(db, read_only=True, routes=None)
    try:
        assert status.counts_by_destination() == expected
    finally:
        status.close()
    ob = Outbox(db, clock=clock, routes=ROUTES)
    try:
        assert ob.counts_by_destination() == expected
        q = ob.queue("pacs")
        q.mark_sent([r.id for r in q.claim(max_items=5, max_bytes=10**12, lease_seconds=60)])
        assert ob.counts_by_destination() == _counted_from_rows(ob)
    finally:
        ob.close()


#: A plan line that reads a table of the outbox row by row, or an index from end to end.
_FULL_READ = re.compile(r"^SCAN (deliveries|instances|d|i)\b")


def test_the_summary_reads_through_indexes(
    outbox: tuple[Outbox, FakeClock], tmp_path: Path
) -> None:
    """Every statement ``/metrics`` and ``/readyz`` run (``destination_report``) seeks: no
    ``SCAN`` of the deliveries or instances (an outbox keeps delivered rows for days), each
    read of the deliveries through an index."""
    ob, clock = outbox
    _busy(ob, clock, tmp_path)
    statements: list[str] = []
    ob._conn.set_trace_callback(statements.append)
    try:
        report = ob.destination_report()
        ob.counts()
    finally:
        ob._conn.set_trace_callback(None)
    assert set(report) == {r.name for r in ROUTES}
    reads = [s for s in statements if s.lstrip().lower().startswith(("select", "with"))]
    assert any("deliveries" in s for s in reads)
    for sql in reads:
        plan = [str(r[3]) for r in ob._conn.execute("explain query plan " + sql)]
        assert not [line for line in plan if _FULL_READ.match(line)], (sql, plan)
        for line in plan:
            if re.match(r"^SEARCH (deliveries|d)\b", line):
                assert re.search(r"USING (COVERING )?INDEX|USING PRIMARY KEY", line), (sql, plan)
