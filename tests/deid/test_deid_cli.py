"""``gateway-agent anonymize`` and ``inspect`` end to end (real files, real worker processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydicom
import pytest

from gateway_agent.cli import main
from gateway_agent.synthetic import PHI_MARKERS, make_ct_series, write_series


def test_anonymize_folder_in_parallel(
    tmp_path: Path, ct_series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nested = ct_series_dir / "sub"
    write_series(make_ct_series(3, rows=16, cols=16, study_seed="other"), nested, prefix="PHIDOE")
    out = tmp_path / "out"
    secret = tmp_path / "state" / "secret.key"
    audit = tmp_path / "audit.jsonl"
    argv = [
        "anonymize",
        str(ct_series_dir),
        "-o",
        str(out),
        "-j",
        "2",
        "--secret-file",
        str(secret),
    ]
    assert main([*argv, "--audit", str(audit)]) == 0
    text = capsys.readouterr().out
    assert "anonymized 13 of 13 files" in text
    files = sorted(out.iterdir())
    assert len(files) == 13
    ds = pydicom.dcmread(files[0])
    assert ds.StationName == "EDGE01"
    assert len(audit.read_text().splitlines()) == 13
    first = {p.name: p.read_bytes() for p in files}
    # idempotent: the same secret gives the same files again
    assert main(argv) == 0
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first
    for marker in PHI_MARKERS:
        assert marker not in text
        assert all(marker not in name for name in first)


def test_anonymize_says_when_inputs_share_an_instance(
    tmp_path: Path, ct_series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two copies of one instance make one output: the summary says so, not a short folder."""
    first = sorted(ct_series_dir.glob("*.dcm"))[0]
    (ct_series_dir / "copy").mkdir()
    (ct_series_dir / "copy" / "again.dcm").write_bytes(first.read_bytes())
    out = tmp_path / "out"
    argv = ["anonymize", str(ct_series_dir), "-o", str(out), "-j", "2"]
    assert main([*argv, "--secret-file", str(tmp_path / "secret.key")]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = len(list(ct_series_dir.rglob("*.dcm")))
    assert lines[0].startswith(f"anonymized {total} of {total} files")
    assert lines[1:] == [
        "same SOP Instance UID as another input: 1 (one output per instance, the last written)"
    ]
    assert len(list(out.iterdir())) == total - 1


def test_anonymize_reports_rejections_by_reason(
    tmp_path: Path, ct_series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (ct_series_dir / "PHIDOE_notes.txt").write_text("PHIDOE PHIMRN4711")
    first = sorted(ct_series_dir.glob("*.dcm"))[0]
    (ct_series_dir / "PHIDOE_cut.dcm").write_bytes(first.read_bytes()[:-10])
    out = tmp_path / "out"
    status = main(
        [
            "anonymize",
            str(ct_series_dir),
            "-o",
            str(out),
            "-j",
            "1",
            "--secret-file",
            str(tmp_path / "s.key"),
            "--no-clean-descriptors",
            "--retain-uids",
        ]
    )
    assert status == 1
    text = capsys.readouterr().out
    assert "quarantined: 2" in text and "not_dicom: 1" in text and "truncated: 1" in text
    assert "PHIDOE" not in text
    ds = pydicom.dcmread(next(out.iterdir()))
    assert "StudyDescription" not in ds  # --no-clean-descriptors: descriptions removed
    originals = {pydicom.dcmread(p).SOPInstanceUID for p in ct_series_dir.glob("IMG*.dcm")}
    assert ds.SOPInstanceUID in originals  # --retain-uids


def test_inspect_marks_identifying_attributes(
    ct_series_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = sorted(ct_series_dir.glob("*.dcm"))[0]
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["patient"]["PatientID"] == "PHIMRN4711"
    assert info["series"]["Modality"] == "CT"
    assert info["file"]["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert info["instance"]["Rows"] == 64
    marks = {a["keyword"]: a["identifying"] for a in info["attributes"]}
    assert marks["PatientName"] and marks["StudyInstanceUID"] and marks["Private"]
    assert not marks["Rows"] and not marks["Modality"]
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Transfer" in text and "* (0010,0010)" in text


def test_inspect_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"nope")
    assert main(["inspect", str(bad)]) == 1
    assert "not_dicom" in capsys.readouterr().err


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`gateway-agent inspect F | head -1`: the reader goes away; no traceback, status 141."""
    import subprocess
    import sys

    (src,) = write_series(make_ct_series(1, rows=8, cols=8), tmp_path / "in")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway_agent", "inspect", str(src)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes anything
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_console_anonymize_reports_through_a_pipe_and_exits_with_its_status(
    tmp_path: Path,
) -> None:
    """The console command ends without the interpreter's teardown: stdout must still arrive."""
    import subprocess
    import sys

    src = tmp_path / "in"
    write_series(make_ct_series(3, rows=8, cols=8), src)
    (src / "notes.txt").write_text("not dicom")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env.pop("PYTHONUNBUFFERED", None)  # block-buffered, as stdout into a pipe normally is
    env["GATEWAY_STATE_DIR"] = str(tmp_path / "state")
    argv = [sys.executable, "-m", "gateway_agent", "anonymize", str(src), "-o", str(tmp_path / "o")]
    done = subprocess.run([*argv, "-j", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0].startswith("anonymized 3 of 4 files")
    assert done.stdout.splitlines()[1] == "quarantined: 1 (not_dicom: 1)"
    (src / "notes.txt").unlink()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the summary is written
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err, err
