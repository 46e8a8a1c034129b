"""Per-scan QC features on phantoms with known mean and noise, odd inputs and real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway_agent._exceptions import QCError
from gateway_agent.qc import (
    NUMERIC_FEATURES,
    ScanFeatures,
    features_from_dataset,
    features_from_file,
)
from gateway_agent.synthetic import PHI_MARKERS, ct_phantom_hu, make_ct_slice

from .._malformed import write_looping_jp2, write_overrunning_rle
from ..imaging._images import image_dataset


@pytest.mark.parametrize("noise_sd", [8.0, 15.0, 30.0])
def test_known_mean_noise_and_air_on_a_phantom(noise_sd: float) -> None:
    size = 256
    ds = make_ct_slice(rows=size, cols=size, noise_sd=noise_sd, seed=11)
    f = features_from_dataset(ds, file="x.dcm")
    hu, labels = ct_phantom_hu(size, size)
    body = labels > 0
    assert f.hu_calibrated and f.modality == "CT"
    assert f.avg_density == pytest.approx(float(hu[body].mean()), abs=2.0)
    assert f.contrast == pytest.approx(float(np.sqrt(hu[body].var() + noise_sd**2)), rel=0.02)
    assert f.noise == pytest.approx(noise_sd, rel=0.06)
    assert f.air_mean == pytest.approx(-1000.0, abs=0.15 * noise_sd + 1)
    assert f.body_fraction == pytest.approx(float(body.mean()), abs=0.01)
    assert f.p05 < f.p50 < f.p95
    assert f.snr == pytest.approx(1040.0 / noise_sd, rel=0.1)


def test_air_offset_moves_air_mean_only() -> None:
    # Low noise: every air pixel sits below -990 HU, where make_ct_slice applies the offset.
    base = features_from_dataset(make_ct_slice(rows=128, cols=128, seed=1, noise_sd=2))
    shifted = features_from_dataset(
        make_ct_slice(rows=128, cols=128, seed=1, noise_sd=2, air_offset=100)
    )
    assert shifted.air_mean - base.air_mean == pytest.approx(100, abs=1)
    assert shifted.avg_density == pytest.approx(base.avg_density, abs=0.5)
    assert shifted.noise == pytest.approx(base.noise, rel=0.02)


def test_header_fields_and_no_phi() -> None:
    ds = make_ct_slice(rows=64, cols=64, plant_phi=True, kernel="B30f", station_name="EDGE07")
    f = features_from_dataset(ds, file="IMG0001.dcm")
    assert (f.kvp, f.exposure_mas, f.tube_current_ma, f.slice_thickness_mm) == (120, 100, 200, 1.25)
    assert f.kernel == "B30f" and f.device == "EDGE07" and f.manufacturer == "ACME Medical"
    assert f.pixel_spacing_mm == pytest.approx(360 / 64)
    assert f.timestamp == "2024-06-11T10:18:01"
    assert f.rows == f.cols == 64 and f.frames == 1
    assert not f.deidentified
    text = json.dumps(f.as_json()) + json.dumps(f.as_row())
    for marker in PHI_MARKERS:
        assert marker not in text
    names = set(ScanFeatures.field_names())
    assert not names & {"patient_name", "patient_id", "birth_date", "accession_number"}


def test_tiny_image_without_rescale_or_modality() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(90, 110, (32, 32)).astype(np.uint16)
    stored[8:24, 8:24] += 400
    f = features_from_dataset(image_dataset(stored))
    assert not f.hu_calibrated and f.modality == ""
    assert f.avg_density == pytest.approx(float(stored[8:24, 8:24].mean()), abs=1)
    assert f.air_mean == pytest.approx(float(stored[stored < 300].mean()), abs=1)
    assert math.isfinite(f.noise) and f.noise > 0
    assert f.rows == 32 and f.kvp is None and f.timestamp is None


def test_constant_image_gives_nan_not_an_error() -> None:
    f = features_from_dataset(image_dataset(np.zeros((32, 32), np.uint16)))
    assert all(math.isnan(getattr(f, n)) for n in ("avg_density", "noise", "snr"))
    assert f.as_json()["avg_density"] is None and f.as_row()["avg_density"] == ""


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "JPEG2000.dcm"])
def test_real_files(name: str) -> None:
    path = Path(get_testdata_file(name) or "")
    f = features_from_file(path, root=path.parent)
    assert f.file == name
    assert all(math.isfinite(getattr(f, n)) for n in ("avg_density", "contrast", "p50"))
    if name == "rtdose.dcm":
        assert f.frames == 15


def test_features_work_on_a_written_file_without_preamble(tmp_path: Path) -> None:
    ds = make_ct_slice(rows=32, cols=32)
    path = tmp_path / "raw"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    f = features_from_file(path)
    assert f.modality == "CT" and f.rows == 32


@pytest.mark.parametrize("name", ["SC_rgb_small_odd.dcm", "rtplan.dcm"])
def test_unmeasurable_files_raise_qcerror(name: str) -> None:
    with pytest.raises(QCError):
        features_from_file(Path(get_testdata_file(name) or ""))


def test_not_dicom_raises_qcerror(tmp_path: Path) -> None:
    p = tmp_path / "x.dcm"
    p.write_bytes(b"hello, not dicom")
    with pytest.raises(QCError):
        features_from_file(p)


def test_numeric_feature_names_exist() -> None:
    names = set(ScanFeatures.field_names())
    assert set(NUMERIC_FEATURES) <= names
    assert pydicom.__version__.startswith("3.")


def test_non_finite_float_pixels_are_background() -> None:
    from gateway_agent.qc.features import _image_features

    image = np.zeros((32, 32), np.float32)
    image[8:24, 8:24] = 100.0
    image[0, 0], image[0, 1] = np.nan, np.inf
    out = _image_features(image, hu=False, quantum=None)
    assert out["avg_density"] == pytest.approx(100.0)
    assert out["air_mean"] == pytest.approx(0.0)


def test_malformed_attributes_raise_qcerror(tmp_path: Path) -> None:
    path = tmp_path / "bad.dcm"
    make_ct_slice(rows=32, cols=32).save_as(path, enforce_file_format=True)
    slope = b"\x28\x00\x53\x10DS\x02\x001 "  # (0028,1053) Rescale Slope "1 "
    raw = path.read_bytes()
    assert raw.count(slope) == 1
    path.write_bytes(raw.replace(slope, slope[:-2] + b"x "))  # as a broken writer might leave it
    with pytest.raises(QCError, match="cannot measure"):
        features_from_file(path)


def test_codec_panic_raises_qcerror(tmp_path: Path) -> None:
    """A CT slice whose RLE pixel data makes pylibjpeg-rle panic is unmeasurable, not fatal."""
    path = write_overrunning_rle(tmp_path / "ct.dcm", modality="CT")
    with pytest.raises(QCError, match="CodecPanicError"):
        features_from_file(path)


@pytest.mark.timeout(120)
def test_looping_jpeg2000_frame_raises_qcerror(tmp_path: Path) -> None:
    """A JP2 box of length 0 made pydicom's frame parser loop forever (the QC pass hung)."""
    with pytest.raises(QCError, match="cannot decode"):
        features_from_file(write_looping_jp2(tmp_path / "ct.dcm", modality="CT"))
