"""Clean Pixel Data: burned-in text painted out, verified by readers that are not the detector."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from structlog.testing import capture_logs

from gateway_agent._exceptions import DeidError
from gateway_agent.deid import Deidentifier, DeidOptions
from gateway_agent.deid.pixels import clean, detect
from gateway_agent.synthetic_pixels import (
    FrameSpec,
    RecogniserReader,
    SyntheticObject,
    TesseractReader,
    identity_values,
    make_object,
    readable,
    write_object,
)
from tests._malformed import write_looping_jp2, write_overrunning_rle
from tests.conftest import require

SECRET = b"pixels-test-secret-0123456789abcdef"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"


def _deid(**options: object) -> Deidentifier:
    return Deidentifier(SECRET, DeidOptions(**options), station_name="EDGE01")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def readers() -> tuple[TesseractReader, RecogniserReader]:
    return TesseractReader(), RecogniserReader()


def _frames(path: Path) -> list[np.ndarray]:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    return [arr] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else list(arr)


def _assert_clean(
    obj: SyntheticObject,
    out: Path,
    readers: tuple[TesseractReader, RecogniserReader],
    *,
    frames: list[int] | None = None,
) -> None:
    """Every PHI line's drawn pixels are black in the output; neither reader reads it."""
    tess, rec = readers
    cleaned = _frames(out)
    for index in frames if frames is not None else range(len(cleaned)):
        shot, image = obj.frames[index], cleaned[index]
        texts = tess.read(image)
        for line in shot.lines:
            if not line.phi or not line.ink.any():
                continue
            x0, y0, x1, y1 = line.box
            region = image[y0:y1, x0:x1]
            black = (region == 0).all(axis=2) if region.ndim == 3 else region == 0
            assert (black & line.ink).sum() >= 0.99 * line.ink.sum(), (index, line.kind)
            values = identity_values(line, obj.identity)
            assert not readable(values, texts), (index, line.kind)
            assert not readable(values, [rec.read_box(image, line.box)]), (index, line.kind)


@pytest.mark.parametrize(
    ("kind", "syntax", "rgb", "expected_syntax"),
    [
        ("us", "native", True, "1.2.840.10008.1.2.1"),
        ("us_rect", "rle", False, RLE),
        ("screen", "jpeg", True, JPEG_LS),
        ("us", "jpeg", False, JPEG_LS),
    ],
)
def test_corpus_objects_are_cleaned_and_delivered(
    tmp_path: Path,
    readers: tuple[TesseractReader, RecogniserReader],
    kind: str,
    syntax: str,
    rgb: bool,
    expected_syntax: str,
) -> None:
    obj = make_object(FrameSpec(seed=11, kind=kind, rgb=rgb), syntax=syntax)
    src = write_object(obj, tmp_path / "in.dcm")
    result = _deid().deidentify_file(src, tmp_path / "out")
    ds = pydicom.dcmread(result.path)
    assert ds.BurnedInAnnotation == "NO"
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert "113101" in codes and "113100" in codes
    assert "Clean Pixel Data Option" in ds.DeidentificationMethod
    assert ds.PhotometricInterpretation == ("RGB" if rgb else "MONOCHROME2")
    assert (ds.Rows, ds.Columns) == obj.frames[0].pixels.shape[:2]
    if syntax == "jpeg":  # once lossy, always lossy: the history is kept
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    pixels = result.audit["pixels"]
    assert pixels["verified"] is True and pixels["frames"] == 1
    assert pixels["regions"] > 0 and 0 < pixels["painted_fraction"] < 0.3
    assert set(pixels["detectors"]) <= {"learned", "classical", "signature"}
    assert "tesseract" in pixels["engines"] and "onnxruntime" in pixels["engines"]
    text = json.dumps(result.audit)
    for value in (obj.identity.family, obj.identity.patient_id, obj.identity.accession):
        assert value not in text
    _assert_clean(obj, result.path, readers)


def test_same_input_same_output(tmp_path: Path) -> None:
    obj = make_object(FrameSpec(seed=12, kind="us"), syntax="rle")
    src = write_object(obj, tmp_path / "in.dcm")
    a = _deid().deidentify_file(src, tmp_path / "a")
    b = _deid().deidentify_file(src, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes()


def test_multiframe_name_in_a_few_frames(
    tmp_path: Path, readers: tuple[TesseractReader, RecogniserReader]
) -> None:
    """Line 0 (the patient's name) is shown in frames 4 and 5 of 8 only: it is found there."""
    obj = make_object(
        FrameSpec(seed=13, kind="us", rgb=True), frames=8, syntax="jpeg", only_frames={0: (4, 5)}
    )
    assert obj.frames[0].lines[0].kind == "name" and not obj.frames[0].lines[0].ink.any()
    assert obj.frames[4].lines[0].ink.any()
    src = write_object(obj, tmp_path / "in.dcm")
    result = _deid().deidentify_file(src, tmp_path / "out")
    pixels = result.audit["pixels"]
    assert pixels["frames"] == 8 and pixels["verified"]
    assert pixels["frames_verified"] >= 3  # the first, and those where the name comes and goes
    assert len(_frames(result.path)) == 8
    _assert_clean(obj, result.path, readers, frames=[0, 3, 4, 5, 6])


def test_frame_without_text_is_not_painted(tmp_path: Path) -> None:
    obj = make_object(FrameSpec(seed=14, kind="us", text=False), syntax="native")
    src = write_object(obj, tmp_path / "in.dcm")
    result = _deid().deidentify_file(src, tmp_path / "out")
    assert result.audit["pixels"]["regions"] == 0
    assert result.audit["pixels"]["painted_fraction"] == 0.0
    assert np.array_equal(_frames(result.path)[0], obj.frames[0].pixels)


def test_monochrome1_is_painted_with_its_maximum(tmp_path: Path) -> None:
    """MONOCHROME1 displays black at its maximum: text (stored dark) is painted white-valued."""
    obj = make_object(FrameSpec(seed=15, kind="us", rgb=False), syntax="native")
    ds = obj.dataset
    display = obj.frames[0].pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (255 - display).astype(np.uint8).tobytes()
    src = write_object(obj, tmp_path / "in.dcm")
    result = _deid().deidentify_file(src, tmp_path / "out")
    stored = _frames(result.path)[0]
    for line in obj.frames[0].lines:
        if line.phi and line.ink.any():
            x0, y0, x1, y1 = line.box
            assert (stored[y0:y1, x0:x1][line.ink] == 255).mean() >= 0.99


def test_palette_colour_is_painted_with_the_darkest_entry(tmp_path: Path) -> None:
    src = TEST_FILES / "examples_palette.dcm"
    original = pydicom.dcmread(src)
    result = _deid().deidentify_file(src, tmp_path)
    out = pydicom.dcmread(result.path)
    assert out.PhotometricInterpretation == "PALETTE COLOR"
    assert out.RedPaletteColorLookupTableData == original.RedPaletteColorLookupTableData
    changed = out.pixel_array != original.pixel_array
    assert changed.any()
    values = np.unique(out.pixel_array[changed])
    from pydicom.pixels.processing import apply_color_lut

    rgb = apply_color_lut(values, out).astype(np.int64)
    assert (
        len(values) == 1
        and rgb.sum()
        == apply_color_lut(np.arange(256, dtype=np.uint8), out).astype(np.int64).sum(axis=1).min()
    )
    # the text of the Philips banner (top left) is gone
    assert result.audit["pixels"]["regions"] > 10


def test_text_left_readable_is_quarantined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector that finds nothing: the reader still reads the name, so nothing is delivered."""
    monkeypatch.setattr(detect.TextDetector, "boxes", lambda self, image: [])
    monkeypatch.setattr(clean, "classical_boxes", lambda image: [])
    obj = make_object(FrameSpec(seed=16, kind="screen"), syntax="native")
    src = write_object(obj, tmp_path / "in.dcm")
    with pytest.raises(DeidError) as info:
        _deid().deidentify_file(src, tmp_path / "out")
    assert info.value.reason == "burned_in_text_remaining"
    assert obj.identity.family not in str(info.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("SC_rgb_small_odd_big_endian.dcm", "transfer syntax"),
        ("SC_rgb_rle_32bit.dcm", "32 bits"),
        ("JPEG-lossy.dcm", "decoding failed"),  # pydicom's damaged JPEG (GDCM alone reads it)
    ],
)
def test_undecodable_is_quarantined(tmp_path: Path, name: str, detail: str) -> None:
    src = TEST_FILES / name
    deid = _deid()
    if name == "JPEG-lossy.dcm":
        # not at risk by itself (NM): state the burned-in text the way devices do
        ds = pydicom.dcmread(src)
        ds.BurnedInAnnotation = "YES"
        src = tmp_path / name
        ds.save_as(src)
    with pytest.raises(DeidError) as info:
        deid.deidentify_file(src, tmp_path / "out")
    assert info.value.reason == "burned_in_undecodable"
    assert detail in str(info.value)


def test_missing_engine_falls_back_to_quarantine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tesserocr", None)  # import fails as if not installed
    monkeypatch.setattr(clean, "_ENGINES", {})
    monkeypatch.setattr(clean, "_ERROR", {})
    obj = make_object(FrameSpec(seed=17, kind="us"), syntax="native")
    src = write_object(obj, tmp_path / "in.dcm")
    with capture_logs() as logs, pytest.raises(DeidError) as info:
        _deid().deidentify_file(src, tmp_path / "out")
    assert info.value.reason == "burned_in_annotation"
    assert "not installed" in str(info.value) and "tesserocr" in str(info.value)
    events = [e for e in logs if e["event"] == "pixel_cleaning_unavailable"]
    assert len(events) == 1 and events[0]["fallback"] == "quarantine"


def test_pydicom_corpus_quarantines_only_what_cannot_be_cleaned(tmp_path: Path) -> None:
    """Of pydicom's test files at risk, only the undecodable ones stay quarantined (by reason);
    dciodvfy finds no error in a cleaned object that it does not find in the same object
    de-identified without cleaning (header only, ``allow``)."""
    require(shutil.which("dciodvfy") is not None, "dciodvfy (Debian dicom3tools)")
    quarantine, cleaner, allow = _deid(burned_in="quarantine"), _deid(), _deid(burned_in="allow")
    at_risk, reasons, cleaned = 0, {}, []
    for src in sorted(TEST_FILES.glob("*.dcm")):
        try:
            quarantine.deidentify_file(src, tmp_path / "q")
            continue
        except DeidError as exc:
            if exc.reason != "burned_in_annotation":
                continue
        at_risk += 1
        try:
            # one folder per input: several of pydicom's files share a SOP Instance UID
            cleaned.append((src, cleaner.deidentify_file(src, tmp_path / src.stem).path))
        except DeidError as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
    assert at_risk >= 35
    assert set(reasons) <= {"burned_in_undecodable", "missing_uid"}, reasons
    assert reasons.get("burned_in_undecodable", 0) <= 7
    assert len(cleaned) >= 28
    for src, out in cleaned:
        before = _dciodvfy_errors(allow.deidentify_file(src, tmp_path / "allow" / src.stem).path)
        if src.name == "image_dfl.dcm":
            continue  # dciodvfy does not read deflated data sets (the header-only output is one)
        after = _dciodvfy_errors(out)
        assert after <= before, (src.name, sorted(after - before))


def _dciodvfy_errors(path: Path) -> set[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = set()
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("Error"):
            # values and UIDs differ between input and output: compare the messages without them
            errors.add(re.sub(r"[0-9.]{8,}", "#", line)[:160])
    return errors


def test_cli_burned_in_policies_and_preview(tmp_path: Path) -> None:
    obj = make_object(FrameSpec(seed=18, kind="us"), syntax="rle")
    src = write_object(obj, tmp_path / "in" / "us.dcm")
    key = tmp_path / "s.key"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway_agent", *args],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip

    q = run("anonymize", str(src), "-o", str(tmp_path / "q"), "--secret-file", str(key),
            "--burned-in", "quarantine")  # fmt: skip
    assert q.returncode == 1 and "burned_in_annotation: 1" in q.stdout
    c = run("anonymize", str(src), "-o", str(tmp_path / "c"), "--secret-file", str(key))
    assert c.returncode == 0, c.stdout + c.stderr
    assert "anonymized 1 of 1" in c.stdout
    png = tmp_path / "preview.png"
    p = run("pixels", str(src), "-o", str(png))
    assert p.returncode == 0, p.stdout + p.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "painted" in p.stdout
    for value in (obj.identity.family, obj.identity.given, obj.identity.patient_id):
        assert value not in p.stdout + p.stderr and value.title() not in p.stdout
    bad = run("anonymize", str(src), "-o", str(tmp_path / "x"), "--burned-in", "maybe")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_dataset_at_risk_is_not_returned_uncleaned() -> None:
    """The Dataset API cannot stream frames: an object at risk is refused, never returned with
    its pixels untouched under the clean policy."""
    obj = make_object(FrameSpec(seed=19, kind="us"), syntax="native")
    with pytest.raises(DeidError) as info:
        _deid().deidentify_dataset(obj.dataset)
    assert info.value.reason == "burned_in_annotation" and "deidentify_file" in str(info.value)
    allowed = make_object(FrameSpec(seed=19, kind="us"), syntax="native").dataset
    assert _deid(burned_in="allow").deidentify_dataset(allowed)["burned_in_allowed"] is True


def test_codec_panic_is_quarantined_not_raised(tmp_path: Path) -> None:
    """pylibjpeg-rle panics on an RLE segment that overruns the frame; the engine refuses the
    file with a reason instead of letting the panic (a BaseException) end the worker."""
    src = write_overrunning_rle(tmp_path / "us.dcm", modality="US")
    with pytest.raises(DeidError) as info:
        _deid().deidentify_file(src, tmp_path / "out")
    assert info.value.reason == "burned_in_undecodable"
    assert "CodecPanicError" in str(info.value)


@pytest.mark.timeout(120)
def test_looping_jpeg2000_frame_is_quarantined(tmp_path: Path) -> None:
    """A JP2 box of length 0 made pydicom's frame parser loop forever (the worker hung)."""
    src = write_looping_jp2(tmp_path / "us.dcm", modality="US")
    with pytest.raises(DeidError) as info:
        _deid().deidentify_file(src, tmp_path / "out")
    assert info.value.reason == "burned_in_undecodable"
