"""What a ``/metrics`` scrape costs on an outbox that keeps many delivered rows.

Run::

    uv run python benchmarks/bench_outbox_summary.py [--rows 100000] [--destinations 1]

Builds a real SQLite outbox (a file, WAL) of ``--rows`` instances, each delivered to every
destination, as retention keeps them for days: 99 % sent with their storage proven and files
gone, the rest waiting for proof, queued, sending or dead. The per-destination summary that
``/metrics``, ``/readyz`` and ``status`` read (``Outbox.destination_report``) is timed side by
side with the same summary read by counting the rows (every delivery read, on a copy of the
outbox without the kept counts and their indexes): in process (median of ``--repeat`` calls)
and as ``GET /metrics`` over HTTP (the agent's real metrics server). ``/readyz`` reads the
summary once per destination. Both ways must give the same answers (checked).

What keeping them costs: the CPU time of ``--write-rows`` instances through the outbox (added
50 at a time, claimed 10 at a time, sent, proven) with and without the counts and indexes,
best of ``--write-rounds`` runs each, on a fresh outbox in a temporary folder; and the first
open of the outbox without them (the agent counts the deliveries once and builds the indexes).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway_agent.agent.outbox.db import AWAITING_PROOF, STATES
from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.service.health import HealthServer

__all__ = ["main"]

#: The kept counts and the summary's indexes: dropped from the copy read by counting the rows.
_NEWER = (
    "drop trigger deliveries_count_added",
    "drop trigger deliveries_count_removed",
    "drop trigger deliveries_count_moved",
    "drop table delivery_counts",
    "drop index deliveries_waiting",
    "drop index deliveries_kept",
)


def _build(db: Path, rows: int, names: list[str]) -> None:
    outbox = Outbox(db, routes=[Route(n) for n in names])
    try:
        step = 10_000
        for start in range(0, rows, step):
            outbox.add_many(
                [
                    {
                        "sop_instance_uid": f"2.25.{i}",
                        "study_instance_uid": f"2.25.1.{i // 500}",
                        "series_instance_uid": f"2.25.2.{i // 100}",
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "path": db.parent / f"{i}.dcm",
                        "size": 500_000,
                        "audit": {},
                    }
                    for i in range(start, min(rows, start + step))
                ]
            )
        proven, pending, dead = int(rows * 0.99), int(rows * 0.995), int(rows * 0.999)
        with outbox._tx() as c:  # the states a busy box reaches, set directly (fast)
            c.execute(
                "update deliveries set state = 'sent', sent_at = created_at, confirmed = 1"
                " where instance_id <= ?",
                (proven,),
            )
            c.execute("update instances set file_gone = 1 where id <= ?", (proven,))
            c.execute(
                "update deliveries set state = 'sent', sent_at = created_at"
                " where instance_id > ? and instance_id <= ?",
                (proven, pending),
            )
            c.execute(
                "update deliveries set state = 'dead', last_error = 'refused'"
                " where instance_id > ? and instance_id <= ?",
                (pending, dead),
            )
            c.execute(
                "update deliveries set state = 'sending', lease_until = created_at + 600"
                " where instance_id > ? and instance_id % 10 = 0",
                (dead,),
            )
        outbox.checkpoint()
    finally:
        outbox.close()


def _by_rows(db: Path, names: list[str]) -> Callable[[], dict[str, dict[str, Any]]]:
    """The summary read from the rows: every delivery counted, each destination's rows read."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)

    def one(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return conn.execute(sql, params).fetchall()

    def report() -> dict[str, dict[str, Any]]:
        known = list(names)
        for (name,) in one("select distinct destination from deliveries order by 1"):
            if name not in known:
                known.append(name)
        counts = {n: dict.fromkeys(STATES, 0) for n in known}
        for name, state, n in one(
            "select destination, state, count(*) from deliveries group by destination, state"
        ):
            counts[name][state] = n
        now = time.time()
        out: dict[str, dict[str, Any]] = {}
        for name in known:
            proof = {"pending": (0, 0), "unproven": (0, 0)}
            for confirmed, n, size in one(
                "select d.confirmed, count(*), coalesce(sum(i.size), 0) from deliveries d"
                " join instances i on i.id = d.instance_id"
                " where d.state = 'sent' and i.file_gone = 0"
                " and (d.confirmed is null or d.confirmed = 0) and d.destination = ?"
                " group by d.confirmed",
                (name,),
            ):
                proof["pending" if confirmed is None else "unproven"] = (n, size)
            (oldest,) = one(
                "select min(created_at) from (select min(d.created_at) as created_at"  # noqa: S608
                " from deliveries d where d.state in ('queued', 'sending')"
                " and d.destination = ?1 union all"
                " select min(d.created_at) from deliveries d join instances i"
                " on i.id = d.instance_id where " + AWAITING_PROOF + " and d.destination = ?1)",
                (name,),
            )[0]
            pending, since = one(
                "select count(*), min(d.sent_at) from deliveries d"  # noqa: S608
                " join instances i on i.id = d.instance_id where d.destination = ? and "
                + AWAITING_PROOF,
                (name,),
            )[0]
            out[name] = {
                "counts": counts[name],
                "oldest_waiting_seconds": None if oldest is None else max(0.0, now - oldest),
                "proof_pending": proof["pending"],
                "unproven": proof["unproven"],
                "awaiting_proof": pending,
                "proof_pending_since": since,
            }
        return out

    return report


def _bookkeeping_cpu(rows: int, *, kept: bool) -> float:
    """CPU seconds for ``rows`` instances through a fresh outbox: added, claimed, sent, proven."""
    with tempfile.TemporaryDirectory(prefix="bench-summary-write-") as tmp:
        outbox = Outbox(Path(tmp) / "outbox.db")
        try:
            if not kept:
                for ddl in _NEWER:
                    outbox._conn.execute(ddl)
                outbox._counted = False
            q = outbox.queue("default")
            t0 = time.process_time()
            for start in range(0, rows, 50):
                outbox.add_many(
                    [
                        {
                            "sop_instance_uid": f"2.25.{i}",
                            "study_instance_uid": "2.25.1",
                            "series_instance_uid": "2.25.2",
                            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                            "path": Path(tmp) / f"{i}.dcm",
                            "size": 500_000,
                            "audit": {},
                        }
                        for i in range(start, min(rows, start + 50))
                    ]
                )
            while batch := q.claim(max_items=10, max_bytes=10**12, lease_seconds=60):
                ids = [r.id for r in batch]
                q.mark_sent(ids)
                q.mark_proven(ids)
            return time.process_time() - t0
        finally:
            outbox.close()


def _comparable(report: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """The answers both ways give (the age rounded: the clock moves between the calls)."""
    out = {}
    for name, r in report.items():
        pending, unproven = r["proof_pending"], r["unproven"]
        if isinstance(pending, dict):
            pending, unproven = (
                (pending["rows"], pending["bytes"]),
                (unproven["rows"], unproven["bytes"]),
            )
        age = r["oldest_waiting_seconds"]
        out[name] = (
            r["counts"],
            None if age is None else round(age / 60),
            tuple(pending),
            tuple(unproven),
            r["awaiting_proof"],
            r["proof_pending_since"],
        )
    return out


def _median_ms(call: Callable[[], object], repeat: int) -> float:
    call()  # warm-up (page cache, statement cache)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _scrape_ms(report: Callable[[], dict[str, dict[str, Any]]], repeat: int) -> float:
    server = HealthServer(port=0, destination_report=report).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return _median_ms(lambda: client.get("/metrics").raise_for_status(), repeat)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="instances in the outbox")
    p.add_argument("--destinations", type=int, default=1, help="each instance goes to all")
    p.add_argument("--repeat", type=int, default=50, help="timed calls per way (median)")
    p.add_argument("--write-rows", type=int, default=5000, help="instances for the write cost")
    p.add_argument("--write-rounds", type=int, default=4, help="runs per way (best taken)")
    args = p.parse_args(argv)
    names = ["pacs", "archive", "research", "backup"][: max(1, args.destinations)]
    names += [f"dest{i}" for i in range(len(names), args.destinations)]
    with tempfile.TemporaryDirectory(prefix="bench-summary-") as tmp:
        new_db = Path(tmp) / "new" / "outbox.db"
        old_db = Path(tmp) / "old" / "outbox.db"
        new_db.parent.mkdir()
        old_db.parent.mkdir()
        t0 = time.perf_counter()
        _build(new_db, args.rows, names)
        built = time.perf_counter() - t0
        shutil.copy2(new_db, old_db)
        with sqlite3.connect(old_db, isolation_level=None) as conn:
            for ddl in _NEWER:
                conn.execute(ddl)
            conn.execute("vacuum")
        conn.close()
        old_report = _by_rows(old_db, names)
        outbox = Outbox(new_db, routes=[Route(n) for n in names])
        try:
            if _comparable(outbox.destination_report()) != _comparable(old_report()):
                raise SystemExit("the two ways disagree")
            ways: list[tuple[str, Callable[[], dict[str, dict[str, Any]]]]] = [
                ("rows counted", old_report),
                ("kept counts + indexes", outbox.destination_report),
            ]
            results = [
                (label, _median_ms(call, args.repeat), _scrape_ms(call, args.repeat))
                for label, call in ways
            ]
        finally:
            outbox.close()
        t0 = time.perf_counter()
        Outbox(old_db, routes=[Route(n) for n in names]).close()  # counts once, builds indexes
        first_open = time.perf_counter() - t0
    cpu: dict[bool, float] = {}
    for _ in range(args.write_rounds):  # alternated, so that both see the same load
        for kept in (False, True):
            spent = _bookkeeping_cpu(args.write_rows, kept=kept)
            cpu[kept] = min(cpu.get(kept, spent), spent)
    deliveries = args.rows * len(names)
    print(
        f"Outbox of {args.rows} instances x {len(names)} destination(s) = {deliveries} "
        f"deliveries (99 % sent and proven), built in {built:.1f} s; median of "
        f"{args.repeat} calls\n"
    )
    print("| summary read | destination_report ms | vs rows counted | GET /metrics ms |")
    print("|---|---|---|---|")
    base = results[0][1]
    for label, report_ms, scrape_ms in results:
        ratio = f"{report_ms / base:.4f}x" if base else "-"
        print(f"| {label} | {report_ms:.2f} | {ratio} | {scrape_ms:.2f} |")
    print(
        f"\n/readyz reads the summary once per destination ({len(names)} here): "
        f"{results[0][1] * len(names):.1f} ms rows counted, "
        f"{results[1][1] * len(names):.2f} ms kept counts + indexes."
    )
    print(f"First open of the outbox without them (counted, indexes built): {first_open:.2f} s")
    per = {k: v / args.write_rows * 1e6 for k, v in cpu.items()}
    print(
        f"\nCPU per instance through the outbox (add, claim, sent, proven; {args.write_rows} "
        f"instances, best of {args.write_rounds}):\n"
    )
    print("| outbox | µs CPU per instance |")
    print("|---|---|")
    print(f"| rows counted | {per[False]:.0f} |")
    print(f"| kept counts + indexes | {per[True]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
