"""Per-scanner QC in /metrics: the QC job groups by scanner (not by edge box) and publishes one
set of gauges per scanner pseudonym and modality, bounded by a TTL and a cap, free of PHI."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway_agent.agent.metrics import REGISTRY, SCANNER_QC, ScannerQCCollector
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.service.qcjob import QCJob
from gateway_agent.config import QCSettings
from gateway_agent.deid import Deidentifier
from gateway_agent.qc import ScannerState
from gateway_agent.synthetic import PHI_MARKERS, make_fleet_series, synthetic_fleet, write_series

SECRET = b"scanner-metrics-secret-0123456789"


def _state(scanner: str, last: float, **kw: object) -> ScannerState:
    values: dict[str, object] = {
        "modality": "CT",
        "noise": 12.0,
        "air_mean": -1000.0,
        "snr": 80.0,
        "density": -120.0,
        "instances": 9,
        "outlier": False,
        "reasons": (),
        "last_measured": last,
    }
    values.update(kw)
    return ScannerState(scanner=scanner, **values)  # type: ignore[arg-type]


def _samples(collector: ScannerQCCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_ttl_and_cap_bound_the_label_sets() -> None:
    now = [1_000_000.0]
    collector = ScannerQCCollector(clock=lambda: now[0])
    states = [_state(f"SCN-00000000000{i}", now[0] - 3600 * i) for i in range(1, 6)]
    states.append(_state("SCN-0000000000FF", now[0] - 10, outlier=True, reasons=("air_mean",)))
    states.append(_state("SCN-0000000000EE", now[0] - 10, noise=math.nan))
    collector.publish(states, ttl_seconds=4.5 * 3600, max_scanners=5)
    got = _samples(collector)
    scanners = [labels["scanner"] for labels, _ in got["gateway_qc_scanner_outlier"]]
    # Measured 5 h ago: beyond the TTL. Of the six left, the five newest; one dropped by the cap.
    assert sorted(scanners) == sorted(
        ["SCN-0000000000FF", "SCN-0000000000EE", *(f"SCN-00000000000{i}" for i in (1, 2, 3))]
    )
    assert got["gateway_qc_scanners"] == [({}, 5.0)]
    assert got["gateway_qc_scanners_dropped"] == [({}, 1.0)]
    assert got["gateway_qc_scanner_outlier_reason"] == [
        ({"scanner": "SCN-0000000000FF", "modality": "CT", "reason": "air_mean"}, 1.0)
    ]
    noise = {labels["scanner"] for labels, _ in got["gateway_qc_scanner_noise"]}
    assert "SCN-0000000000EE" not in noise  # NaN: no sample rather than a NaN
    now[0] += 3 * 3600  # time passes: the scanners measured 2 and 3 hours ago drop out too
    later = _samples(collector)
    assert {labels["scanner"] for labels, _ in later["gateway_qc_scanner_outlier"]} == {
        "SCN-0000000000FF",
        "SCN-0000000000EE",
        "SCN-000000000001",
    }


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    ob = Outbox(tmp_path / "state" / "outbox.db")
    yield ob
    ob.close()


def _arrive(outbox: Outbox, root: Path, box: Deidentifier, datasets: list, name: str) -> None:  # type: ignore[type-arg]
    scanner = ""
    for ds in datasets:
        box.deidentify_dataset(ds)
        scanner = str(ds.DeviceSerialNumber)
    for path in write_series(datasets, root / name):
        outbox.add_file(path, audit={})
    assert scanner.startswith("SCN-")


def test_the_job_tells_scanners_behind_one_edge_box_apart_and_publishes_them(
    outbox: Outbox, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    box = Deidentifier(SECRET, station_name="EDGE01")  # one edge box, five scanners behind it
    fleet = synthetic_fleet(5, detuned=(4,))
    for i, scanner in enumerate(fleet):
        for j in range(1 if scanner.detuned else 2):
            series = make_fleet_series(scanner, j, slices=4, rows=48, cols=48)
            _arrive(outbox, state / "outbox", box, series, f"s{i}-{j}")
    settings = QCSettings(slices_per_series=3, max_cpu_fraction=1.0, scanner_ttl_hours=24)
    job = QCJob(outbox, state, settings, nice=0)
    try:
        summary = job.run_once()
        assert summary["sampled"] == 9 * 3
        report = json.loads((state / "qc" / "report.json").read_text())
        # Five scanners, not one edge box: the report and the model group by pseudonym.
        assert len(report["scanners"]) == 5 and set(report["devices"]) == {"EDGE01"}
        flagged = {o["scanner"] for o in report["outliers"]}
        assert len(flagged) == 1
        detuned = flagged.pop()
        assert report["scanners"][detuned]["reasons"].get("air_mean") == 3
        assert {r.scanner for r in outbox.rows_since(0)} == set(report["scanners"])

        text = generate_latest(REGISTRY).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        outlier = {
            s.labels["scanner"]: s.value for s in families["gateway_qc_scanner_outlier"].samples
        }
        assert set(outlier) == set(report["scanners"]) and outlier[detuned] == 1.0
        assert sum(outlier.values()) == 1.0
        reasons = families["gateway_qc_scanner_outlier_reason"].samples
        assert {(s.labels["scanner"], s.labels["reason"]) for s in reasons} == {
            (detuned, "air_mean")
        }
        air = {
            s.labels["scanner"]: s.value for s in families["gateway_qc_scanner_air_mean"].samples
        }
        assert air[detuned] > -950 and all(v < -980 for k, v in air.items() if k != detuned)
        measured = families["gateway_qc_scanner_measured_instances"].samples
        assert sorted(s.value for s in measured) == [3.0, 6.0, 6.0, 6.0, 6.0]
        for marker in (*PHI_MARKERS, "SN-00700", "CT01", "ACME", "Borealis"):
            assert marker not in text
    finally:
        job.stop()
    assert SCANNER_QC.current()[0] == []  # a stopped job leaves no gauges behind


def test_a_restarted_job_publishes_the_gauges_again(outbox: Outbox, tmp_path: Path) -> None:
    state = tmp_path / "state"
    box = Deidentifier(SECRET, station_name="EDGE01")
    scanner = synthetic_fleet(1, detuned=())[0]
    _arrive(outbox, state / "outbox", box, make_fleet_series(scanner, 0, rows=32, cols=32), "a")
    settings = QCSettings(max_cpu_fraction=1.0)
    first = QCJob(outbox, state, settings, nice=0)
    first.run_once()
    first.stop()
    again = QCJob(outbox, state, settings, nice=0)
    try:
        assert again.run_once()["sampled"] == 0  # nothing new...
        states, _dropped = SCANNER_QC.current()
        assert [s.instances for s in states] == [3]  # ...yet the gauges are back
    finally:
        again.stop()
