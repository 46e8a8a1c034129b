"""A 0.1 outbox from a build that kept more columns (source, calling AE, scanner, proof of
storage) keeps their values through the upgrade to schema 2."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from gateway_agent.agent.outbox import schema

FIXTURE = Path(__file__).parent / "data" / "outbox-v1" / "outbox.db"


def test_the_columns_of_later_0_1_builds_are_carried_over(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    shutil.copy2(FIXTURE, db)
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for column in ("source text", "calling_ae text", "scanner text", "confirmed integer"):
            conn.execute(f"alter table outbox add column {column}")
        conn.execute(
            "update outbox set source = 'listener', calling_ae = 'CT' || id,"
            " scanner = 'SCN-' || id, confirmed = id % 2"
        )
        ids = [int(r[0]) for r in conn.execute("select id from outbox order by id")]
        assert ids, "the 0.1.0 fixture has rows"

        assert schema.prepare(conn, destination="default") == 1

        instances = conn.execute(
            "select id, source, calling_ae, scanner from instances order by id"
        ).fetchall()
        assert instances == [(i, "listener", f"CT{i}", f"SCN-{i}") for i in ids]
        confirmed = conn.execute(
            "select instance_id, confirmed from deliveries order by instance_id"
        ).fetchall()
        assert confirmed == [(i, i % 2) for i in ids]
    finally:
        conn.close()
