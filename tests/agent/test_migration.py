"""Outboxes written by gateway-agent 0.1.0 (schema 1) are upgraded in place at start-up; a failed
upgrade leaves them untouched and the agent refuses to start with one line (exit status 2)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway_agent.agent.outbox import schema
from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.schema import SCHEMA_VERSION, OutboxSchemaError
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.cli import main
from gateway_agent.deid.keys import load_or_create_secret
from tests.conftest import require

from ._agent_util import V1_DDL, agent_settings, files_under, running_daemon, wait_until

FIXTURE = Path(__file__).parent / "data" / "outbox-v1"
#: Where 0.1.0 wrote the fixture's state folder (the rows' paths start with it).
FIXTURE_STATE = "/tmp/gateway-outbox-v1/state"


def v1_state(tmp_path: Path) -> Path:
    """A copy of the 0.1.0 state folder, its rows' paths pointing at the copy."""
    state = tmp_path / "state"
    state.mkdir(parents=True)
    shutil.copy2(FIXTURE / "outbox.db", state / "outbox.db")
    shutil.copytree(FIXTURE / "outbox", state / "outbox")
    shutil.copy2(FIXTURE / "effective-settings.json", state / "effective-settings.json")
    load_or_create_secret(state / "secret.key")  # its site secret (not kept with the fixture)
    conn = sqlite3.connect(state / "outbox.db")
    with conn:
        conn.execute("update outbox set path = replace(path, ?, ?)", (FIXTURE_STATE, str(state)))
    conn.close()
    return state


def _tables(db: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    finally:
        conn.close()


def _v1_rows(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(
            "select id, sop_instance_uid, state, attempts, last_error, sent_at from outbox"
            " order by id"
        ).fetchall()
    finally:
        conn.close()


def test_a_010_outbox_is_upgraded_in_place(tmp_path: Path) -> None:
    state = v1_state(tmp_path)
    db = state / "outbox.db"
    before = _v1_rows(db)
    assert [r[2] for r in before] == ["sent"] * 6 + ["queued", "sending", "dead"]
    with capture_logs() as logs:
        ob = Outbox(db)
    try:
        assert ob._query("pragma user_version")[0][0] == SCHEMA_VERSION
        assert {"instances", "deliveries", "destinations"} <= _tables(db)
        assert not {"outbox", "destination_state"} & _tables(db)
        # Every row is an instance with the same id and its delivery to the one destination.
        after = [
            (r.id, r.sop_instance_uid, r.state, r.attempts, r.last_error, r.sent_at)
            for r in ob.rows(destination="default")
        ]
        assert after == before
        assert ob.destination_names() == ["default"]
        status = ob.queue("default").destination_status()
        assert status["consecutive_failures"] == 1
        assert str(status["last_error"]).startswith("network_error")
        assert ob.rows_since(0)[-1].id == 9  # the QC job's cursor stays valid
    finally:
        ob.close()
    (event,) = [e for e in logs if e["event"] == "outbox_upgraded"]
    assert (event["from_version"], event["to_version"], event["instances"]) == (1, 2, 9)
    # Opening it again changes nothing.
    again = Outbox(db)
    assert again.counts() == {"queued": 1, "sending": 1, "sent": 6, "dead": 1}
    again.close()


def test_sent_rows_of_a_010_outbox_keep_their_files_until_proven(tmp_path: Path) -> None:
    """0.1.0 trusted acknowledgements: after the upgrade its sent rows' deliveries await their
    proof of storage, and retention keeps their files until the destination proved it."""
    state = v1_state(tmp_path)
    ob = Outbox(state / "outbox.db")
    try:
        q = ob.queue("default")
        sent = [r.id for r in ob.rows("sent", destination="default")]
        assert len(sent) == 6
        assert [r.id for r in q.awaiting_proof(100)] == sent
        assert ob.proof_summary()["pending"][0] == 6
        files = [r.path for r in ob.rows("sent")]
        for r in ob.rows("sent"):  # written before their send (a checkout dates them now)
            assert r.sent_at is not None
            os.utime(r.path, (r.sent_at - 10, r.sent_at - 10))
        assert ob.purge_sent_files(0) == 0 and all(p.exists() for p in files)
        q.mark_proven(sent[:4])
        assert ob.purge_sent_files(0) == 4
        assert [p.exists() for p in files] == [False] * 4 + [True] * 2
    finally:
        ob.close()


def test_a_proof_recorded_in_a_schema_1_outbox_is_carried_over(tmp_path: Path) -> None:
    """A 0.1 build that recorded the proof of storage (``outbox.confirmed``): kept per delivery."""
    db = tmp_path / "outbox.db"
    conn = sqlite3.connect(db)
    with conn:
        for ddl in V1_DDL:
            conn.execute(ddl)
        conn.execute("alter table outbox add column confirmed integer")
        for i, confirmed in enumerate((1, 0, None)):
            conn.execute(
                "insert into outbox (sop_instance_uid, study_instance_uid, series_instance_uid,"
                " sop_class_uid, path, size, state, created_at, sent_at, confirmed)"
                " values (?, '1.2', '1.3', '1.4', ?, 1, 'sent', 1.0, 2.0, ?)",
                (f"1.9.{i}", str(tmp_path / f"{i}.dcm"), confirmed),
            )
    conn.close()
    ob = Outbox(db)
    try:
        got = dict(ob._query("select instance_id, confirmed from deliveries order by instance_id"))
        assert got == {1: 1, 2: 0, 3: None}
        assert ob.proof_summary() == {"pending": (1, 1), "unproven": (1, 1)}
    finally:
        ob.close()


def test_rows_of_the_single_destination_go_to_the_first_configured_one(tmp_path: Path) -> None:
    """Moving from [destination] to [[destinations]] at the upgrade: the waiting rows go to the
    destination named default, else to the first of the list."""
    state = v1_state(tmp_path)
    ob = Outbox(state / "outbox.db", routes=[Route("pacs"), Route("research")])
    try:
        assert ob.counts_by_destination()["pacs"] == {
            "queued": 1,
            "sending": 1,
            "sent": 6,
            "dead": 1,
        }
        assert ob.counts("research") == {"queued": 0, "sending": 0, "sent": 0, "dead": 0}
    finally:
        ob.close()


def test_the_agent_starts_on_a_010_state_folder_and_delivers_what_waited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = v1_state(tmp_path)
    settings = agent_settings(tmp_path)
    # Before the agent restarts, operator commands leave the old outbox alone and say why.
    assert main(["status", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "destination default: folder /tmp/gateway-outbox-v1/dest" in out  # 0.1.0's record
    assert "written by an earlier gateway-agent" in out and "restart" in out
    assert main(["retry", "--state-dir", str(state)]) == 1
    assert "written by an earlier gateway-agent" in capsys.readouterr().err
    assert "outbox" in _tables(state / "outbox.db")

    with running_daemon(settings, components=[], service=False) as d:
        assert d.outbox is not None
        q = d.outbox.queue("default")
        assert wait_until(lambda: q.counts()["sent"] == 8, 30), q.counts()
        assert q.counts()["dead"] == 1
        delivered = {p.stem for p in files_under(tmp_path / "destination")}
        assert {r.sop_instance_uid for r in q.rows()[6:8]} == delivered
    assert main(["retry", "--state-dir", str(state)]) == 0
    assert "requeued 1 dead delivery" in capsys.readouterr().out


def test_a_failed_upgrade_leaves_the_outbox_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = v1_state(tmp_path)
    db = state / "outbox.db"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    real = schema.MIGRATIONS[1]

    def fails_half_way(conn: sqlite3.Connection, destination: str) -> int:
        real(conn, destination)  # every table made and filled, the old ones dropped...
        raise sqlite3.OperationalError("disk I/O error")  # ...then the disk fails

    monkeypatch.setitem(schema.MIGRATIONS, 1, fails_half_way)
    with pytest.raises(OutboxSchemaError, match="could not be upgraded from schema version 1"):
        Outbox(db)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    assert {"outbox", "destination_state"} <= _tables(db)
    assert "instances" not in _tables(db)
    monkeypatch.setitem(schema.MIGRATIONS, 1, real)
    ob = Outbox(db)  # the cause gone, the next start upgrades it
    assert ob.counts()["sent"] == 6
    ob.close()


def test_a_newer_outbox_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    Outbox(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"pragma user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(OutboxSchemaError, match="written by a newer gateway-agent"):
        Outbox(db)


def _mount_tmpfs(path: Path, kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kb}k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return proc.returncode == 0


@pytest.mark.slow
def test_agent_refuses_to_start_when_the_disk_is_too_full_to_upgrade(tmp_path: Path) -> None:
    """A real ENOSPC in the middle of the upgrade: the agent exits 2 with one line, and the
    0.1.0 outbox is as it was (readable by 0.1.0, every row there)."""
    state = tmp_path / "state"
    require(_mount_tmpfs(state, 6 * 1024), "mount -t tmpfs (root)")
    try:
        db = state / "outbox.db"
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("pragma journal_mode = wal")
        for ddl in V1_DDL:
            conn.execute(ddl)
        conn.execute("begin")
        conn.executemany(
            "insert into outbox (sop_instance_uid, study_instance_uid, series_instance_uid,"
            " sop_class_uid, path, size, state, created_at, audit) values (?, ?, ?, ?, ?, ?,"
            " 'queued', 0, ?)",
            [
                (f"2.25.{i}", "2.25.1", "2.25.2", "1.2.840.10008.5.1.4.1.1.2", f"/x/{i}", 1, "{}")
                for i in range(12_000)
            ],
        )
        conn.execute("commit")
        conn.execute("pragma wal_checkpoint(TRUNCATE)")
        conn.close()
        # Leave less room than a copy of the rows needs.
        filler = state / "filler"
        size = db.stat().st_size
        free = shutil.disk_usage(state).free
        filler.write_bytes(b"\0" * max(0, free - size // 2))
        digest = hashlib.sha256(db.read_bytes()).hexdigest()
        inbox = tmp_path / "inbox"
        inbox.mkdir()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway_agent",
                "run",
                "--inbox",
                str(inbox),
                "--state-dir",
                str(state),
                "--destination-folder",
                str(tmp_path / "dest"),
                "--no-metrics",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, proc.stderr
        assert "could not be upgraded from schema version 1 to 2" in lines[0]
        assert "it is unchanged" in lines[0] and "Traceback" not in proc.stderr
        filler.unlink()
        assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert conn.execute("select count(*) from outbox").fetchone()[0] == 12_000
        assert conn.execute("pragma user_version").fetchone()[0] == 0
        conn.close()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=30, check=False)
