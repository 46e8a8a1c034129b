"""The outbox row keeps the scanner pseudonym of its instance, from intake to QC."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.dicom.scanner import is_scanner_pseudonym
from gateway_agent.synthetic import make_ct_series, write_series

from ._agent_util import V1_OUTBOX_TABLE, agent_settings, running_daemon, wait_until


def _row(uid: str, path: Path, scanner: str | None) -> dict[str, object]:
    return {
        "sop_instance_uid": uid,
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "path": path,
        "size": 10,
        "audit": {},
        "scanner": scanner,
    }


def test_rows_keep_the_scanner(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    try:
        assert ob.add(**_row("1.1", tmp_path / "a.dcm", "SCN-0123456789AB"))  # type: ignore[arg-type]
        assert ob.add_many([_row("1.2", tmp_path / "b.dcm", None)]) == [True]
        rows = ob.rows_since(0)
        assert [(r.sop_instance_uid, r.scanner) for r in rows] == [
            ("1.1", "SCN-0123456789AB"),
            ("1.2", None),
        ]
    finally:
        ob.close()


def test_a_database_from_before_the_column_gets_it(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    with sqlite3.connect(db) as conn:
        conn.execute(V1_OUTBOX_TABLE)
        conn.execute(
            "insert into outbox (sop_instance_uid, study_instance_uid, series_instance_uid,"
            " sop_class_uid, path, size, created_at) values ('9.9', '1', '1.1', '1.2', 'x', 1, 0)"
        )
    ob = Outbox(db)
    try:
        assert ob.get("9.9") is not None and ob.get("9.9").scanner is None  # type: ignore[union-attr]
        assert ob.add(**_row("1.1", tmp_path / "a.dcm", "SCN-0123456789AB"))  # type: ignore[arg-type]
        assert ob.get("1.1").scanner == "SCN-0123456789AB"  # type: ignore[union-attr]
    finally:
        ob.close()
    ob = Outbox(db)  # opening it again changes nothing
    ob.close()


def test_intake_commits_the_scanner_of_each_instance(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, **{"qc.enabled": False})
    inbox = Path(settings.inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    stage = tmp_path / "stage"
    for serial in ("SN-A", "SN-B"):
        write_series(
            make_ct_series(2, rows=16, cols=16, study_seed=serial, device_serial=serial),
            stage / serial,
        )
    with running_daemon(settings) as daemon:
        stage.rename(inbox / "batch")
        assert wait_until(lambda: daemon.outbox.counts()["sent"] == 4, timeout=60)
        rows = daemon.outbox.rows_since(0)
    scanners = {}
    for row in rows:
        out = next(Path(settings.destination.folder).rglob(f"{row.sop_instance_uid}.dcm"))
        carried = str(pydicom.dcmread(out, stop_before_pixels=True).DeviceSerialNumber)
        assert row.scanner == carried and is_scanner_pseudonym(carried)
        scanners.setdefault(row.series_instance_uid, set()).add(row.scanner)
    # One pseudonym per scanner (two scanners, one series each), none of them a serial number.
    assert sorted(len(s) for s in scanners.values()) == [1, 1]
    assert len(set().union(*scanners.values())) == 2


def test_reconcile_reads_the_scanner_from_the_file(tmp_path: Path) -> None:
    from gateway_agent.deid import Deidentifier

    ds = make_ct_series(1, rows=16, cols=16)[0]
    deid = Deidentifier(b"reconcile-test-secret-0123456789")
    files = tmp_path / "outbox"
    result = deid.deidentify_dataset(ds)
    assert result
    files.mkdir()
    ds.save_as(files / "x.dcm", enforce_file_format=True)
    ob = Outbox(tmp_path / "outbox.db")
    try:
        assert ob.reconcile(files)["added"] == 1
        assert ob.rows_since(0)[0].scanner == str(ds.DeviceSerialNumber)
    finally:
        ob.close()
