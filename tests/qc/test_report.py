"""run_qc on folders, report files, the fleet plot (a real PNG) and the text summary."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from gateway_agent.qc import (
    analyse_fleet,
    build_report,
    latest_outliers,
    plot_fleet_qc,
    run_qc,
    scan_directory,
    summary_text,
    write_report,
)
from gateway_agent.qc.run import Progress
from gateway_agent.synthetic import PHI_MARKERS

from ._fleet import anomaly, normal_datasets, records, write_fleet

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    root = tmp_path / "fleet"
    write_fleet([*normal_datasets(10, 1), anomaly("detuned"), anomaly("noisy")], root)
    # Things a QC folder also holds: a note, a picture, a broken DICOM, a nested raw dataset.
    (root / "notes.txt").write_text("not dicom")
    (root / "picture.png").write_bytes(PNG + b"\0" * 32)
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return root


def test_run_qc_on_a_folder(fleet_dir: Path) -> None:
    failures: list[tuple[str, str]] = []
    recs, matrix, labels, silhouette = run_qc(fleet_dir, workers=2, on_failures=failures.extend)
    assert len(recs) == 12 and matrix.shape == (12, 8) and labels.shape == (12,)
    assert math.isnan(silhouette) or -1 <= silhouette <= 1
    assert [f for f, _ in failures] == ["broken.dcm"]
    flagged = {r.file.split("/")[0]: r.reasons[0].split()[0] for r in recs if r.outlier}
    assert flagged == {"EDGE02": "air_mean", "EDGE03": "noise"}
    assert all("/" in r.file for r in recs)  # recursive, relative names


def test_single_worker_gives_the_same_records(fleet_dir: Path) -> None:
    a, _ = scan_directory(fleet_dir, workers=1)
    b, _ = scan_directory(fleet_dir, workers=3)
    assert [r.as_json() for r in a] == [r.as_json() for r in b]


def test_report_files(fleet_dir: Path, tmp_path: Path) -> None:
    recs, _m, labels, sil = run_qc(fleet_dir)
    out = tmp_path / "report"
    paths = write_report(recs, labels, sil, out, [("broken.dcm", "unreadable")])
    assert paths["plot"].read_bytes().startswith(PNG) and paths["plot"].stat().st_size > 10_000
    report = json.loads(paths["report"].read_text())
    assert report["scans"] == 12 and report["failed"][0]["file"] == "broken.dcm"
    assert {o["device"] for o in report["outliers"]} == {"EDGE02", "EDGE03"}
    assert sum(g["scans"] for g in report["groups"]) == 12
    assert report["devices"]["EDGE01"]["scans"] == 2
    rows = list(csv.DictReader(io.StringIO(paths["features"].read_text())))
    assert len(rows) == 12 and {"avg_density", "noise", "reasons", "outlier"} <= set(rows[0])
    everything = "".join(
        p.read_text(errors="replace") for p in (paths["report"], paths["features"])
    )
    for marker in PHI_MARKERS:
        assert marker not in everything
    assert [o["device"] for o in latest_outliers(out)] == [o["device"] for o in report["outliers"]]
    assert not list(out.glob(".*tmp"))


def test_latest_outliers_without_a_report(tmp_path: Path) -> None:
    assert latest_outliers(tmp_path) == []
    (tmp_path / "report.json").write_text("{not json")
    assert latest_outliers(tmp_path) == []


def test_plot_with_and_without_timestamps(tmp_path: Path) -> None:
    recs = records([*normal_datasets(12, 2), anomaly("noisy")])
    _m, labels, sil = analyse_fleet(recs)
    fig = plot_fleet_qc(recs, labels, sil)
    assert len(fig.axes) == 3  # scatter + noise and air over time
    fig.savefig(tmp_path / "t.png")
    for r in recs:
        r.timestamp = None
    fig = plot_fleet_qc(recs, labels, sil)
    assert len(fig.axes) == 1
    assert fig.axes[0].get_xlabel().startswith("average density")
    fig.savefig(tmp_path / "n.png")
    assert (tmp_path / "n.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError):
        plot_fleet_qc(recs, labels[:-1], sil)


def test_plot_of_an_empty_fleet(tmp_path: Path) -> None:
    fig = plot_fleet_qc([], np.zeros(0, np.int64), math.nan)
    fig.savefig(tmp_path / "e.png")
    assert build_report([], [], math.nan)["scans"] == 0


def test_summary_fits_one_screen() -> None:
    recs = records(normal_datasets(20, 3) + [anomaly("noisy", i) for i in range(12)])
    _m, labels, sil = analyse_fleet(recs)
    text = summary_text(recs, labels, sil, [("x.dcm", "no pixel data")])
    lines = text.splitlines()
    assert len(lines) <= 40 and max(len(line) for line in lines) <= 120
    assert lines[0].startswith("QC: 32 images measured, 1 skipped")
    assert "more outliers" in text


def test_real_test_files_folder(tmp_path: Path) -> None:
    src = Path(get_testdata_file("CT_small.dcm") or "").parent
    root = tmp_path / "mixed"
    root.mkdir()
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "rtdose.dcm",
        "SC_rgb_small_odd.dcm",
        "rtplan.dcm",
    ):
        (root / name).write_bytes((src / name).read_bytes())
    recs, failures = scan_directory(root)
    assert sorted(r.file for r in recs) == ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm"]
    assert sorted(f for f, _ in failures) == ["SC_rgb_small_odd.dcm", "rtplan.dcm"]


def test_progress_bar_writes_only_when_enabled() -> None:
    buf = io.StringIO()
    bar = Progress(3, stream=buf, enabled=True)
    for _ in range(3):
        bar.step()
    assert "3/3 images" in buf.getvalue()
    quiet = io.StringIO()
    Progress(3, stream=quiet).step()  # StringIO is not a TTY
    assert quiet.getvalue() == ""
