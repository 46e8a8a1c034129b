"""QC of a folder on real-world files: pydicom's warnings never break the progress line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from structlog.testing import capture_logs

from gateway_agent.logs import configure
from gateway_agent.qc import scan_directory
from gateway_agent.synthetic import make_ct_series


def _explicit_meta_implicit_body(folder: Path, n: int) -> None:
    """Files whose meta says explicit VR but whose data set is implicit (pydicom warns)."""
    folder.mkdir()
    for i, ds in enumerate(make_ct_series(n, rows=32, cols=32)):
        meta = DicomBytesIO()
        meta.is_little_endian, meta.is_implicit_VR = True, False
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        body = DicomBytesIO()
        body.is_little_endian, body.is_implicit_VR = True, True
        write_dataset(body, ds)
        (folder / f"x{i}.dcm").write_bytes(
            b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue()
        )


def test_read_warnings_are_counted_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _explicit_meta_implicit_body(tmp_path / "in", 3)
    configure("json", "info")
    with capture_logs() as logs:
        records, failures = scan_directory(tmp_path / "in", progress=True, workers=2)
    assert len(records) == 3 and not failures
    err = capsys.readouterr().err
    assert "Warning" not in err and "implicit" not in err
    assert err.endswith("qc [##############################] 3/3 images\n")
    counted = [e for e in logs if e["event"] == "qc_read_warnings"]
    assert counted == [
        {"event": "qc_read_warnings", "log_level": "info", "count": 3,
         "categories": {"UserWarning": 3}}
    ]  # fmt: skip
