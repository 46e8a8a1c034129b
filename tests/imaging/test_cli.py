"""The window, cluster and qc commands: exit status and the files they write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway_agent.cli import main
from gateway_agent.synthetic import make_ct_slice, write_series

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    return write_series([make_ct_slice(rows=96, cols=96)], tmp_path / "in")[0]


def test_window_one_preset_is_native_size(ct_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.png"
    assert main(["window", str(ct_file), "--preset", "lung", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG)
    assert int.from_bytes(data[16:20], "big") == 96  # PNG IHDR width


def test_window_panel_and_dataset_window(ct_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "panel.png"
    args = ["window", str(ct_file), "--preset", "brain", "--preset", "bone", "-o", str(out)]
    assert main(args) == 0
    assert out.read_bytes().startswith(PNG)
    assert main(["window", str(ct_file), "-o", str(tmp_path / "own.png")]) == 0
    assert main(["window", str(ct_file), "--all-presets", "-o", str(tmp_path / "all.png")]) == 0
    custom = ["window", str(ct_file), "--center", "0", "--width", "500", "--function", "SIGMOID"]
    assert main([*custom, "-o", str(tmp_path / "c.png")]) == 0


def test_window_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "PHIDOE.dcm"
    bad.write_bytes(b"junk")
    assert main(["window", str(bad), "-o", str(tmp_path / "x.png")]) == 1
    assert main(["window", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "PHIDOE" not in err and "gateway-agent window:" in err


def test_cluster(ct_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.png"
    assert main(["cluster", str(ct_file), "-k", "4", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG) and out.stat().st_size > 5000
    assert "silhouette" in capsys.readouterr().out


def test_qc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "fleet"
    for i in range(8):
        ds = make_ct_slice(
            rows=64, cols=64, noise_sd=40.0 if i == 7 else 12.0, seed=i, study_seed=f"s{i}"
        )
        write_series([ds], src / f"d{i % 2}", prefix=f"I{i}_")
    out = tmp_path / "report"
    assert main(["qc", str(src), "--report", str(out), "--no-progress"]) == 0
    for name in ("features.csv", "report.json", "fleet.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert [o["file"] for o in report["outliers"]] == ["d1/I7_0001.dcm"]
    text = capsys.readouterr().out
    assert text.startswith("QC: 8 images measured") and "noise" in text


def test_qc_on_an_empty_folder(tmp_path: Path) -> None:
    assert main(["qc", str(tmp_path), "--report", str(tmp_path / "r")]) == 1
    assert main(["qc", str(tmp_path / "nope"), "--report", str(tmp_path / "r")]) == 1
