"""Periodic QC runs inside the daemon by default; status names the outliers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway_agent.cli.agent_cmds import collect_status
from gateway_agent.synthetic import write_series
from tests.qc._fleet import anomaly, normal_datasets

from ._agent_util import agent_settings, running_daemon, wait_until


def test_daemon_runs_qc_and_status_names_the_outlier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A generous CPU budget: the default (5 % of the interval) would thin the sample on purpose.
    settings = agent_settings(tmp_path, **{"qc.interval_seconds": 1.0, "qc.max_cpu_fraction": 0.9})
    inbox = Path(settings.inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    normals = normal_datasets(14, seed=7)
    detuned = [anomaly("detuned", i) for i in range(3)]
    with running_daemon(settings) as daemon:
        write_series(normals, tmp_path / "stage" / "normal")
        write_series(detuned, tmp_path / "stage" / "detuned", prefix="DET")
        (tmp_path / "stage").rename(inbox / "batch")
        report = Path(settings.state_dir) / "qc" / "report.json"

        def analysed() -> bool:
            if not report.exists():
                return False
            return int(json.loads(report.read_text()).get("scans", 0)) >= 17

        assert wait_until(analysed, timeout=60), "QC report never covered all 17 instances"
        assert daemon.outbox is not None
    status = collect_status(settings)
    outliers = status["qc_outliers"]
    assert outliers, "the detuned scanner (air +120 HU) was not flagged"
    assert any("air_mean" in r for o in outliers for r in o["reasons"])
    # The flagged instances are exactly the detuned slices: InstanceNumber (kept by the profile)
    # is 900+ on them, and the de-identified file is named by its output SOP Instance UID.
    detuned_uids = {
        p.stem
        for p in Path(settings.destination.folder).rglob("*.dcm")
        if int(dcmread(p, stop_before_pixels=True).InstanceNumber) >= 900
    }
    assert len(detuned_uids) == 3
    detuned_scanner = {
        str(dcmread(p, stop_before_pixels=True).DeviceSerialNumber)
        for p in Path(settings.destination.folder).rglob("*.dcm")
        if int(dcmread(p, stop_before_pixels=True).InstanceNumber) >= 900
    }
    assert len(detuned_scanner) == 1
    assert {o["sop_instance_uid"] for o in outliers} == detuned_uids
    # status names the scanner (its pseudonym), not the edge box every scan went through.
    from gateway_agent.cli.agent_cmds import _print_status

    _print_status(status)
    printed = capsys.readouterr().out
    assert all(f"  {o['scanner']} {o['sop_instance_uid']}:" in printed for o in outliers)
    assert {o["scanner"] for o in outliers} == {next(iter(detuned_scanner))}
