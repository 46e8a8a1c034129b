"""De-identifying real files: pydicom corpus, transfer syntaxes, planted PHI, UIDs, dciodvfy."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from gateway_agent._exceptions import DeidError
from gateway_agent.deid import (
    TAGS_TO_REMOVE,
    Deidentifier,
    DeidOptions,
    anonymize_dataset,
    load_or_create_secret,
)
from gateway_agent.synthetic import PHI_MARKERS, make_ct_series, make_ct_slice, write_series
from tests.conftest import require

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CORPUS = sorted(TEST_FILES.glob("*.dcm"))
REASONS = {
    "not_dicom",
    "empty_file",
    "truncated",
    "unreadable",
    "unreadable_header",
    "no_sop_instance_uid",
    "missing_uid",
    "unsupported_transfer_syntax",
    "burned_in_annotation",
    "dicomdir",
}
SECRET = b"files-test-secret-0123456789abcdef"


def _deid(**options: object) -> Deidentifier:
    return Deidentifier(SECRET, DeidOptions(**options), station_name="EDGE01")  # type: ignore[arg-type]


def test_corpus_never_aborts(tmp_path: Path) -> None:
    assert len(CORPUS) >= 70
    for policy in ("quarantine", "allow"):
        deid = _deid(burned_in=policy)
        done = 0
        for src in CORPUS:
            out = tmp_path / policy
            out.mkdir(exist_ok=True)
            try:
                result = deid.deidentify_file(src, out)
            except DeidError as exc:
                assert exc.reason in REASONS, (src.name, exc.reason)
                continue
            done += 1
            ds = pydicom.dcmread(result.path)
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert result.path.name == f"{ds.SOPInstanceUID}.dcm"
            original = pydicom.dcmread(src)
            if "PixelData" in original:
                assert ds.PixelData == original.PixelData, src.name
            json.dumps(result.audit)
        assert done >= (60 if policy == "allow" else 25)
        assert not [p for p in (tmp_path / policy).iterdir() if p.name.startswith(".")]


def test_deflated_round_trip(tmp_path: Path) -> None:
    src = TEST_FILES / "image_dfl.dcm"
    result = _deid(burned_in="allow").deidentify_file(src, tmp_path)
    out = pydicom.dcmread(result.path)
    original = pydicom.dcmread(src)
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    assert out.PixelData == original.PixelData
    assert (out.pixel_array == original.pixel_array).all()
    assert out.PatientIdentityRemoved == "YES"


@pytest.mark.parametrize(
    "name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"]
)
def test_transfer_syntaxes_keep_pixels(tmp_path: Path, name: str) -> None:
    src = TEST_FILES / name
    result = _deid().deidentify_file(src, tmp_path)
    out = pydicom.dcmread(result.path)
    original = pydicom.dcmread(src)
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.PixelData == original.PixelData
    assert (out.pixel_array == original.pixel_array).all()
    assert out.Rows == original.Rows


def test_paths_may_be_strings_and_the_result_names_the_output(tmp_path: Path) -> None:
    result = _deid().deidentify_file(str(TEST_FILES / "CT_small.dcm"), str(tmp_path / "o"))
    assert isinstance(result.path, Path)
    assert result.path == tmp_path / "o" / result.name
    assert result.name == f"{result.sop_instance_uid}.dcm"
    assert result.path.is_file()


def _planted_series(directory: Path, n: int = 3) -> list[Path]:
    dss = make_ct_series(n, rows=32, cols=32)
    for ds in dss:
        nested = Dataset()
        nested.PatientName = "PHINESTED^PHIDOE"
        inner = Dataset()
        inner.OtherPatientIDs = "PHIOTHERID"
        nested.OtherPatientIDsSequence = Sequence([inner])
        ds.ReferencedPatientSequence = Sequence([nested])
        ds.SeriesDescription = "AXIAL PHIDOE 19450317"
        ds.add_new((0x0019, 0x0010), "LO", "PHIPRIVATE CREATOR")
        ds.add_new((0x0019, 0x1001), "SQ", Sequence([nested]))
    return write_series(dss, directory, prefix="PHIDOE_PHIMRN4711_")


def test_planted_phi_never_in_output(tmp_path: Path) -> None:
    src = _planted_series(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    deid = _deid()
    for p in src:
        assert b"PHIPREAMBLE" in p.read_bytes()
        result = deid.deidentify_file(p, out)
        blob = result.path.read_bytes()
        assert blob[:128] == b"\0" * 128
        record = json.dumps(result.audit)
        for marker in PHI_MARKERS:
            assert marker.encode().lower() not in blob.lower(), marker
            assert marker not in result.path.name
            assert marker not in record
    # error messages carry reasons, not names or values
    bad = tmp_path / "in" / "PHIDOE_truncated.dcm"
    bad.write_bytes(src[0].read_bytes()[:-100])
    with pytest.raises(DeidError) as info:
        deid.deidentify_file(bad, out)
    assert info.value.reason == "truncated"
    assert not any(m in str(info.value) for m in PHI_MARKERS)
    assert sorted(p.name.startswith(".") for p in out.iterdir()) == [False] * len(src)


def test_clean_descriptors_keeps_text_but_not_identifiers(tmp_path: Path) -> None:
    p = _planted_series(tmp_path / "in", 1)[0]
    ds = pydicom.dcmread(_deid().deidentify_file(p, tmp_path).path)
    assert ds.StudyDescription.startswith("CT CHEST for")
    assert "AXIAL" in ds.SeriesDescription
    assert "PHIDOE" not in ds.SeriesDescription and "19450317" not in ds.SeriesDescription
    off = pydicom.dcmread(_deid(clean_descriptors=False).deidentify_file(p, tmp_path).path)
    assert "StudyDescription" not in off


def test_determinism_and_key_separation(tmp_path: Path) -> None:
    src = _planted_series(tmp_path / "in", 2)[0]
    a = _deid().deidentify_file(src, tmp_path / "a")
    b = _deid().deidentify_file(src, tmp_path / "a")
    assert a.path == b.path
    assert a.path.read_bytes() == b.path.read_bytes()
    other = Deidentifier(b"another-secret-0123456789abcdef", DeidOptions()).deidentify_file(
        src, tmp_path / "b"
    )
    x, y = pydicom.dcmread(a.path), pydicom.dcmread(other.path)
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert getattr(x, kw) != getattr(y, kw)
        assert getattr(x, kw).startswith("2.25.") and len(getattr(x, kw)) <= 64
    assert x.PatientID != y.PatientID and x.PatientName != y.PatientName
    assert x.StudyDate != y.StudyDate or x.PatientID != y.PatientID


def test_uid_referential_integrity_across_a_series(tmp_path: Path) -> None:
    slices = make_ct_series(50, rows=16, cols=16)
    ref = make_ct_slice(rows=16, cols=16, series_number=2, instance_number=1)
    ref.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ref.SourceImageSequence = Sequence([_ref_item(s.SOPInstanceUID) for s in slices[:5]])
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = slices[0].SeriesInstanceUID
    series_ref.ReferencedInstanceSequence = Sequence([_ref_item(slices[7].SOPInstanceUID)])
    ref.ReferencedSeriesSequence = Sequence([series_ref])
    paths = write_series([*slices, ref], tmp_path / "in")
    deid = _deid()
    results = [deid.deidentify_file(p, tmp_path / "out") for p in paths]
    outs = [pydicom.dcmread(r.path) for r in results]
    new_slices, new_ref = outs[:-1], outs[-1]
    assert len({o.StudyInstanceUID for o in outs}) == 1
    assert len({o.SeriesInstanceUID for o in new_slices}) == 1
    assert len({o.FrameOfReferenceUID for o in outs}) == 1
    assert len({o.PatientID for o in outs}) == 1
    assert len({o.StudyDate for o in outs}) == 1
    for i, item in enumerate(new_ref.SourceImageSequence):
        assert item.ReferencedSOPInstanceUID == new_slices[i].SOPInstanceUID
        assert item.ReferencedSOPClassUID == CTImageStorage
    rs = new_ref.ReferencedSeriesSequence[0]
    assert rs.SeriesInstanceUID == new_slices[0].SeriesInstanceUID
    assert rs.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == new_slices[7].SOPInstanceUID


def _ref_item(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = uid
    return item


def test_rejections_by_reason(tmp_path: Path) -> None:
    deid = _deid()
    cases = {
        "empty_file": b"",
        "not_dicom": b"hello world" * 20,
    }
    for reason, data in cases.items():
        p = tmp_path / f"{reason}.bin"
        p.write_bytes(data)
        with pytest.raises(DeidError) as info:
            deid.deidentify_file(p, tmp_path)
        assert info.value.reason == reason
    us = make_ct_slice(rows=8, cols=8)
    us.Modality = "US"
    p = write_series([us], tmp_path / "us")[0]
    quarantine = _deid(burned_in="quarantine")
    with pytest.raises(DeidError) as info:
        quarantine.deidentify_file(p, tmp_path / "out")
    assert info.value.reason == "burned_in_annotation"
    cleaned = deid.deidentify_file(p, tmp_path / "out")  # the default policy cleans it
    assert cleaned.audit["pixels"]["verified"] is True
    assert pydicom.dcmread(cleaned.path).BurnedInAnnotation == "NO"
    allowed = _deid(burned_in="allow").deidentify_file(p, tmp_path / "out")
    assert allowed.audit["burned_in_allowed"] is True
    us.BurnedInAnnotation = "NO"  # the device's explicit statement is accepted
    p = write_series([us], tmp_path / "us_no")[0]
    assert deid.deidentify_file(p, tmp_path / "out").audit["burned_in_allowed"] is False
    ct = make_ct_slice(rows=8, cols=8)
    ct.BurnedInAnnotation = "YES"
    p = write_series([ct], tmp_path / "ct_yes")[0]
    with pytest.raises(DeidError, match="burned_in_annotation"):
        quarantine.deidentify_file(p, tmp_path / "out")
    assert deid.deidentify_file(p, tmp_path / "out").audit["pixels"]["cleaned"] is True
    ct.Modality = "XC"  # a photograph: cleaning text does not make it safe
    p = write_series([ct], tmp_path / "xc_yes")[0]
    with pytest.raises(DeidError, match="burned_in_annotation"):
        deid.deidentify_file(p, tmp_path / "out")
    assert [q for q in (tmp_path / "out").iterdir() if q.name.startswith(".")] == []


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_headers_around_the_first_read(tmp_path: Path, syntax: str) -> None:
    """The header is read with one 64 KiB pread; longer headers, a pixel data element that
    straddles that boundary and cuts after it are all handled as with the whole file."""
    from gateway_agent.dicom.files import _HEAD_READ

    deid = _deid()
    base = make_ct_slice(rows=64, cols=64)
    base.file_meta.TransferSyntaxUID = syntax
    probe = write_series([base], tmp_path / "probe")[0].read_bytes()
    pixels_at = probe.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010), little endian
    seen = set()
    # Pad with a private OB value so the pixel data element starts around the boundary
    # (every offset of its 8- or 12-byte header across it), and far past it.
    for delta in [*range(-16, 6, 2), 40_000]:  # values have even lengths: even offsets
        ds = make_ct_slice(rows=64, cols=64)
        ds.file_meta.TransferSyntaxUID = syntax
        target = _HEAD_READ + delta
        # tag(4) + VR(2) + reserved(2) + length(4) in explicit VR, 8 in implicit; plus creator.
        pad = target - pixels_at - (12 if syntax.endswith(".1") else 8) - 28
        ds.add_new((0x0029, 0x0010), "LO", "PADDING CREATOR")
        ds.add_new((0x0029, 0x1010), "OB", b"\0" * (pad + pad % 2))
        src = write_series([ds], tmp_path / f"in{delta}")[0]
        data = src.read_bytes()
        start = data.rindex(b"\xe0\x7f\x10\x00")
        seen.add(start - _HEAD_READ)
        result = deid.deidentify_file(src, tmp_path / "out")
        out = pydicom.dcmread(result.path)
        assert out.PixelData == ds.PixelData
        assert (0x0029, 0x1010) not in out  # the private padding was removed
        # Cut inside the pixel data, past the first read: refused as truncated, not uploaded.
        cut = tmp_path / f"cut{delta}.dcm"
        cut.write_bytes(data[: len(data) - 100])
        with pytest.raises(DeidError) as info:
            deid.deidentify_file(cut, tmp_path / "out")
        assert info.value.reason == "truncated"
    straddling = [d for d in seen if -12 < d < 0]  # the element header crossed the boundary
    assert len(straddling) >= 4 and max(seen) > 30_000, sorted(seen)


def test_object_without_pixels_whose_element_ends_at_the_first_read(tmp_path: Path) -> None:
    """A data set with no pixel data, cut by the 64 KiB read exactly between two elements, must
    not pass for complete: what follows the boundary is still parsed (and kept)."""
    from gateway_agent.dicom.files import _HEAD_READ

    def sr(pad: int) -> Dataset:
        ds = make_ct_slice(rows=8, cols=8)
        for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored"):
            delattr(ds, keyword)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
        ds.Modality = "SR"
        ds.add_new((0x0029, 0x0010), "LO", "PADDING CREATOR")
        ds.add_new((0x0029, 0x1010), "OB", b"\0" * pad)
        ds.ValueType = "CONTAINER"
        ds.CompletionFlag = "COMPLETE"
        return ds

    probe = write_series([sr(2)], tmp_path / "probe")[0].read_bytes()
    at = probe.index(b"\x40\x00\x40\xa0")  # (0040,A040) ValueType, the first after the pad
    src = write_series([sr(2 + _HEAD_READ - at)], tmp_path / "in")[0]
    assert src.read_bytes().index(b"\x40\x00\x40\xa0") == _HEAD_READ
    out = pydicom.dcmread(_deid().deidentify_file(src, tmp_path / "out").path)
    assert out.ValueType == "CONTAINER" and out.CompletionFlag == "COMPLETE"


def test_secret_file_created_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deep" / "secret.key"
    first = load_or_create_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_secret(path) == first and len(first) >= 32


def test_deidentifier_pickles_without_losing_keys(tmp_path: Path) -> None:
    import pickle

    p = _planted_series(tmp_path / "in", 1)[0]
    deid = _deid()
    clone = pickle.loads(pickle.dumps(deid))  # noqa: S301 - our own bytes
    assert "files-test" not in repr(deid)
    a = deid.deidentify_file(p, tmp_path / "a")
    b = clone.deidentify_file(p, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes()


def test_anonymize_dataset_prototype_api() -> None:
    ds = make_ct_slice(rows=8, cols=8)
    pixels = ds.PixelData
    anonymize_dataset(ds, station_name="EDGE01", secret=SECRET)
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.StationName == "EDGE01"
    assert "2024e" in ds.DeidentificationMethod[0]
    assert ds.PixelData == pixels
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.preamble == b"\0" * 128
    assert "OtherPatientIDs" not in ds and "PatientAddress" not in ds
    assert pydicom.tag.Tag("OtherPatientIDs") in TAGS_TO_REMOVE
    assert pydicom.tag.Tag("PatientAddress") in TAGS_TO_REMOVE
    with pytest.raises(TypeError):
        anonymize_dataset(ds, no_such_option=True)
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113105"} <= codes
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"


def _dciodvfy_errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return {re.sub(r"\s+", " ", ln.strip()) for ln in lines if ln.startswith("Error")}


def test_dciodvfy_no_new_errors(tmp_path: Path) -> None:
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    ct = write_series([make_ct_slice(rows=32, cols=32)], tmp_path / "ct")[0]
    sample = [ct] + [
        TEST_FILES / n
        for n in (
            "CT_small.dcm",
            "MR_small.dcm",
            "MR_small_jp2klossless.dcm",
            "rtplan.dcm",
            "rtdose.dcm",
        )
    ]
    deid = _deid()
    report = []
    for src in sample:
        out = deid.deidentify_file(src, tmp_path / "out").path
        new = _dciodvfy_errors(out) - _dciodvfy_errors(src)
        if new:
            report.append(f"{src.name}: {sorted(new)}")
    assert not report, "\n".join(report)


@pytest.mark.slow
def test_memory_does_not_scale_with_file_size(tmp_path: Path) -> None:
    """A scaled stand-in for the 1 GB multi-frame file: peak RSS must not follow the size."""

    def make(frames: int, name: str) -> Path:
        ds = make_ct_slice(rows=512, cols=512)
        ds.NumberOfFrames = frames
        ds.PixelData = b""
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        # Grow the (last) pixel data element in place: patch its length, extend with zeros.
        blob = bytearray(path.read_bytes())
        length = frames * 512 * 512 * 2
        at = blob.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
        blob[at + 8 : at + 12] = length.to_bytes(4, "little")
        path.write_bytes(bytes(blob))
        with path.open("r+b") as fh:
            fh.truncate(len(blob) + length)
        return path

    script = (
        "import sys; from pathlib import Path;"
        "from gateway_agent.deid import Deidentifier;"
        "Deidentifier(b'k'*32).deidentify_file(Path(sys.argv[1]), Path(sys.argv[2]), fsync=False);"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child forked
        # from a large pytest worker would report the worker's size.
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    peaks = {}
    for frames in (8, 400):  # 4 MB and 210 MB of pixel data
        src = make(frames, f"mf{frames}.dcm")
        out = tmp_path / f"out{frames}"
        out.mkdir()
        run = subprocess.run(
            [sys.executable, "-c", script, str(src), str(out)],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
            cwd=Path(__file__).parents[2],
        )
        peaks[frames] = int(run.stdout.strip())  # KiB
        (result,) = out.iterdir()
        assert result.stat().st_size > frames * 512 * 512 * 2
        os.unlink(src)
    assert peaks[400] - peaks[8] < 20_000, peaks
    assert peaks[400] < 150_000, peaks
    _ = ExplicitVRLittleEndian
