"""The periodic QC job against a real Outbox on a tmp SQLite file."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.service.qcjob import QCJob, latest_outliers, qc_component
from gateway_agent.config import QCSettings
from gateway_agent.deid import anonymize_dataset
from gateway_agent.synthetic import PHI_MARKERS, Patient, make_ct_series, write_series


def _add_series(
    outbox: Outbox, root: Path, name: str, n: int, station: str, **kwargs: Any
) -> list[Path]:
    datasets = make_ct_series(n, study_seed=name, rows=64, cols=64, **kwargs)
    patient = Patient(name=f"PHIDOE^{name.upper()}")
    out = []
    for ds in datasets:
        ds.PatientName = patient.name
        anonymize_dataset(ds, station_name=station, secret=b"qc-test-secret" * 2)
    for path in write_series(datasets, root / name):
        outbox.add_file(path, audit={})
        out.append(path)
    return out


@pytest.fixture
def state(tmp_path: Path) -> tuple[Outbox, Path]:
    state_dir = tmp_path / "state"
    outbox = Outbox(state_dir / "outbox.db")
    yield outbox, state_dir
    outbox.close()


def test_run_once_samples_stores_and_reports(state: tuple[Outbox, Path]) -> None:
    outbox, state_dir = state
    files = state_dir / "outbox"
    for i in range(3):
        _add_series(outbox, files, f"normal{i}", 12, f"EDGE0{i % 2 + 1}", noise_sd=12.0)
    _add_series(outbox, files, "noisy", 12, "EDGE02", noise_sd=45.0)
    job = QCJob(outbox, state_dir, QCSettings(slices_per_series=3, n_clusters=2), nice=0)
    try:
        summary = job.run_once()
        assert summary["rows"] == 48 and summary["sampled"] == 12 and summary["failed"] == 0
        assert job.stored() == 12 and job.last_outbox_id == 48
        outliers = latest_outliers(state_dir)
        assert len(outliers) == 3
        assert all(o["reasons"][0].startswith("noise") for o in outliers)
        assert {o["device"] for o in outliers} == {"EDGE02"}
        for name in ("report.json", "fleet.png", "features.csv"):
            assert (state_dir / "qc" / name).stat().st_size > 0
        # Nothing new: nothing sampled, report kept.
        assert job.run_once()["sampled"] == 0
        # More slices of a series already sampled three times: not sampled again.
        _add_series(outbox, files, "normal0", 3, "EDGE01", noise_sd=12.0)
        assert job.run_once()["sampled"] == 0
    finally:
        job.stop()
    # The table lives in the outbox's own SQLite file, and holds no PHI.
    with sqlite3.connect(state_dir / "outbox.db") as conn:
        dump = "\n".join(conn.iterdump())
    assert "qc_features" in dump
    report = (state_dir / "qc" / "report.json").read_text() + (
        state_dir / "qc" / "features.csv"
    ).read_text()
    for marker in PHI_MARKERS:
        assert marker not in dump.split("CREATE TABLE qc_features", 1)[1]
        assert marker not in report
    assert json.loads((state_dir / "qc" / "report.json").read_text())["scans"] == 12


def test_missing_and_bad_files_are_counted_not_raised(state: tuple[Outbox, Path]) -> None:
    outbox, state_dir = state
    paths = _add_series(outbox, state_dir / "outbox", "s", 2, "EDGE01")
    paths[0].unlink()
    paths[1].write_bytes(b"garbage")
    job = QCJob(outbox, state_dir, QCSettings(slices_per_series=5), nice=0)
    try:
        summary = job.run_once()
        assert job.last_outbox_id == 2
    finally:
        job.stop()
    assert summary["failed"] == 2 and summary["sampled"] == 0 and "error" not in summary


class _BrokenOutbox:
    db_path = None

    def rows_since(self, last_id: int, limit: int = 1000) -> list[Any]:
        raise RuntimeError("database is on fire")


def test_a_failing_pass_is_logged_never_raised(tmp_path: Path) -> None:
    job = QCJob(_BrokenOutbox(), tmp_path, QCSettings(), nice=0)  # type: ignore[arg-type]
    try:
        summary = job.run_once()
    finally:
        job.stop()
    assert summary["error"] == "RuntimeError" and job.stats["errors"] == 1


def test_thread_runs_on_the_interval_and_stops(state: tuple[Outbox, Path]) -> None:
    outbox, state_dir = state
    _add_series(outbox, state_dir / "outbox", "t", 4, "EDGE01")
    settings = QCSettings(interval_seconds=0.05, slices_per_series=2)
    job = QCJob(outbox, state_dir, settings, cpu_clock=lambda: 0.0)  # budget never runs out
    job.start()
    try:
        deadline = time.monotonic() + 30
        while job.stats["runs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        job.stop()
    assert job.stats["runs"] >= 2 and job.stats["sampled"] == 2
    assert job._thread is not None and not job._thread.is_alive()
    assert (state_dir / "qc" / "report.json").exists()


def test_disabled_job_does_not_start(state: tuple[Outbox, Path]) -> None:
    outbox, state_dir = state
    job = QCJob(outbox, state_dir, QCSettings(enabled=False))
    job.start()
    assert job._thread is None
    job.stop()


def test_component_factory(state: tuple[Outbox, Path]) -> None:
    outbox, state_dir = state

    class _Daemon:
        def __init__(self) -> None:
            from gateway_agent.config import Settings

            self.outbox = outbox
            self.settings = Settings(state_dir=state_dir)

    job = qc_component(_Daemon())
    assert isinstance(job, QCJob) and job.report_dir == state_dir / "qc"
    job.stop()


def test_cpu_budget_thins_the_sample(state: tuple[Outbox, Path]) -> None:
    outbox, state_dir = state
    for i in range(3):
        _add_series(outbox, state_dir / "outbox", f"b{i}", 3, "EDGE01")
    ticks = iter(range(1000))
    # Each slice "costs" one CPU second; the budget is 0.5 * 5 s: two slices, then skip.
    settings = QCSettings(interval_seconds=5.0, max_cpu_fraction=0.5, slices_per_series=3)
    job = QCJob(outbox, state_dir, settings, nice=0, cpu_clock=lambda: float(next(ticks)))
    try:
        summary = job.run_once()
        assert summary["sampled"] == 2 and summary["skipped_budget"] == 7
        assert job.last_outbox_id == 9 and job.stored() == 2
    finally:
        job.stop()


def test_skipped_instances_are_logged_with_their_reason(state: tuple[Outbox, Path]) -> None:
    """An instance QC cannot measure is skipped, and the log line says why (not just "QCError")."""
    from structlog.testing import capture_logs

    from gateway_agent.logs import configure

    configure("json", "info")  # info events pass, whatever an earlier test configured
    outbox, state_dir = state
    files = state_dir / "outbox"
    paths = _add_series(outbox, files, "s", 3, "EDGE01")
    paths[1].write_bytes(b"\0" * 128 + b"DICM")  # no data set at all
    paths[2].unlink()  # sent and purged meanwhile
    job = QCJob(outbox, state_dir, QCSettings(slices_per_series=3, n_clusters=1), nice=0)
    try:
        with capture_logs() as logs:
            job.run_once()
    finally:
        job.stop()
    reasons = sorted(e["reason"] for e in logs if e["event"] == "qc_skipped")
    assert reasons == ["no pixel data", "unreadable DICOM (FileNotFoundError)"]
