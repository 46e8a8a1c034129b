"""Screen captures and dose screens saved as CT/MR/PT images: at risk, cleaned or quarantined."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from gateway_agent._exceptions import DeidError
from gateway_agent.deid import Deidentifier, DeidOptions
from gateway_agent.deid.pixels.policy import HEADER_TAGS, header_risk, pixel_risk
from gateway_agent.deid.pixels.signatures import (
    SIGNATURE_TAGS,
    load_signatures,
    match_header,
    match_signature,
)
from gateway_agent.dicom.codec import Element
from gateway_agent.dicom.dictionary import vr_of
from gateway_agent.synthetic import make_ct_slice, write_series
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

SECRET = b"screens-test-secret-0123456789abcdef"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
XA_IMAGE = "1.2.840.10008.5.1.4.1.1.12.1"
ENHANCED_XRF = "1.2.840.10008.5.1.4.1.1.12.2.1"
RDSR = "1.2.840.10008.5.1.4.1.1.88.67"


def _deid(policy: str = "clean") -> Deidentifier:
    return Deidentifier(SECRET, DeidOptions(burned_in=policy), station_name="EDGE01")


def _element(tag: int, value: str) -> Element:
    vr = vr_of(tag)
    if vr == "US":
        return Element(tag, vr, struct.pack("<H", int(value)))
    raw = value.encode("latin-1")
    return Element(tag, vr, raw + b" " * (len(raw) % 2))


def _top(**attrs: str) -> dict[int, Element]:
    from pydicom.datadict import tag_for_keyword

    top = {}
    for keyword, value in attrs.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        top[tag] = _element(tag, value)
    return top


_CT = {"SOPClassUID": CT_IMAGE, "Modality": "CT", "Rows": "512", "Columns": "512"}
_XA = {"SOPClassUID": XA_IMAGE, "Modality": "XA"}
_PRIMARY = {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}


@pytest.mark.parametrize(
    ("attrs", "detail"),
    [
        ({"ImageType": "DERIVED\\SECONDARY\\SCREEN SAVE"}, "ImageType SCREEN SAVE"),
        ({"ImageType": "DERIVED\\SECONDARY\\SCREENSAVE"}, "ImageType SCREEN SAVE"),
        ({"ImageType": "ORIGINAL\\SECONDARY\\DOSE_INFO"}, "ImageType DOSE_INFO"),
        (
            {"ImageType": "DERIVED\\SECONDARY\\SCREEN SAVE", "BurnedInAnnotation": "NO"},
            "ImageType SCREEN SAVE",
        ),
        (
            {"Manufacturer": "GE MEDICAL SYSTEMS", "SeriesDescription": "Dose Report"},
            'device signature "GE / CT Dose Series"',
        ),
        (
            {"SeriesDescription": "Dose Report", "BurnedInAnnotation": "NO"},
            'device signature "GE / CT Dose Series"',
        ),
        (
            {"Manufacturer": "GE MEDICAL SYSTEMS", "CommentsOnRadiationDose": "DLP 812.4"},
            'device signature "GE / CT Dose Series"',
        ),
        (
            {
                "Manufacturer": "SIEMENS",
                "ImageType": "DERIVED\\SECONDARY\\OTHER",
                "Rows": "860",
                "Columns": "1132",
            },
            'device signature "SIEMENS / CT Dose Series"',
        ),
        (
            {"Manufacturer": "Philips", "ImageType": "DERIVED\\SECONDARY\\DOSE_MOD"},
            'device signature "PHILIPS"',
        ),
        (
            {
                "Manufacturer": "TOSHIBA",
                "ManufacturerModelName": "Aquilion ONE",
                "ImageType": "DERIVED\\SECONDARY",
                "WindowWidth": "1",
            },
            'device signature "Toshiba Aquilion One CT Dose Series"',
        ),
        # the SC Equipment module in an image class: a secondary capture
        ({**_PRIMARY, "ConversionType": "WSD"}, "ConversionType WSD without BurnedInAnnotation NO"),
        ({"ConversionType": "SI"}, "ConversionType SI without BurnedInAnnotation NO"),
        (
            {"ConversionType": "DOE JOHN"},  # not a defined term: not shown
            "ConversionType (not a defined term) without BurnedInAnnotation NO",
        ),
        # screen saves and dose pages named only by their series, whatever BurnedInAnnotation
        ({**_PRIMARY, "SeriesDescription": "Screen Save"}, 'SeriesDescription "SCREEN SAVE"'),
        (
            {**_PRIMARY, "SeriesDescription": "SCREENSAVE", "BurnedInAnnotation": "NO"},
            'SeriesDescription "SCREEN SAVE"',
        ),
        (
            {**_PRIMARY, "SeriesDescription": "screen_capture  2"},
            'SeriesDescription "SCREEN CAPTURE"',
        ),
        ({**_PRIMARY, "SeriesDescription": "DOSE_INFO"}, 'SeriesDescription "DOSE INFO"'),
        (
            {**_PRIMARY, "SeriesDescription": "Patient Protocol", "Manufacturer": "SIEMENS"},
            'SeriesDescription "PATIENT PROTOCOL"',
        ),
        (  # the raw description (here with a name in it) never reaches the detail
            {**_PRIMARY, "SeriesDescription": "Screen Save DOE^JOHN 19450317"},
            'SeriesDescription "SCREEN SAVE"',
        ),
        # derived and secondary X-ray angiography and fluoroscopy images
        (
            {**_XA, "ImageType": "DERIVED\\PRIMARY\\SINGLE PLANE"},
            "XA ImageType DERIVED without BurnedInAnnotation NO",
        ),
        (
            {**_XA, "ImageType": "DERIVED\\SECONDARY"},
            "XA ImageType DERIVED\\SECONDARY without BurnedInAnnotation NO",
        ),
        (
            {"Modality": "RF", "SOPClassUID": ENHANCED_XRF, "ImageType": "ORIGINAL\\SECONDARY"},
            "RF ImageType SECONDARY without BurnedInAnnotation NO",
        ),
        (  # by modality alone (a secondary capture class is at risk by its class already)
            {"Modality": "RF", "ImageType": "DERIVED\\PRIMARY", "BurnedInAnnotation": ""},
            "RF ImageType DERIVED without BurnedInAnnotation NO",
        ),
    ],
)
def test_screen_saves_and_signatures_are_at_risk_and_cleanable(
    attrs: dict[str, str], detail: str
) -> None:
    top = _top(**{**_CT, **attrs})
    assert header_risk(top, None) == (True, detail)


@pytest.mark.parametrize(
    "attrs",
    [
        {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL", "Manufacturer": "GE MEDICAL SYSTEMS"},
        {"ImageType": "DERIVED\\SECONDARY\\MPR", "Manufacturer": "SIEMENS"},
        {
            "ImageType": "ORIGINAL\\PRIMARY\\AXIAL",
            "Manufacturer": "TOSHIBA",
            "ManufacturerModelName": "Aquilion ONE",
            "WindowWidth": "400\\1500",
        },
        {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL", "Manufacturer": "Philips"},
        # the device states there is no burned-in text: accepted for these three rules
        {**_PRIMARY, "ConversionType": "WSD", "BurnedInAnnotation": "NO"},
        {**_XA, "ImageType": "DERIVED\\SECONDARY", "BurnedInAnnotation": "NO"},
        # an XA / RF acquisition (ORIGINAL\\PRIMARY) stays header-only (see deidentification.md)
        {**_XA, "ImageType": "ORIGINAL\\PRIMARY\\SINGLE PLANE"},
        {"Modality": "RF", "SOPClassUID": ENHANCED_XRF, "ImageType": "ORIGINAL\\PRIMARY"},
        {"ImageType": "DERIVED\\SECONDARY\\MPR", "Modality": "CT"},  # not XA / RF
        # "dose" or "screen" as a word of an ordinary series or protocol is not a screen save
        {**_PRIMARY, "SeriesDescription": "Low dose CT chest"},
        {**_PRIMARY, "SeriesDescription": "CHEST_LOW_DOSE 1.25mm"},
        {**_PRIMARY, "SeriesDescription": "Lung screening"},
        {**_PRIMARY, "SeriesDescription": "Screen"},
        {**_PRIMARY, "SeriesDescription": "DoseReduction Info"},
        {**_PRIMARY, "ProtocolName": "LOW DOSE REPORT PROTOCOL", "SeriesDescription": "Axial"},
        # a dose structured report in the "Dose Report" series has no pixels (no Rows)
        {"SOPClassUID": RDSR, "Modality": "SR", "Rows": "", "SeriesDescription": "Dose Report"},
    ],
)
def test_ordinary_objects_are_not_at_risk(attrs: dict[str, str]) -> None:
    values = {**_CT, **attrs}
    if not values["Rows"]:
        del values["Rows"], values["Columns"]
    assert header_risk(_top(**values), None) is None


def test_memo_key_holds_every_attribute_the_rules_read() -> None:
    """Two headers equal but for SeriesDescription (or ConversionType) get their own answers:
    the memo, keyed by HEADER_TAGS, does not give one series the answer of the other."""
    assert {0x0008103E, 0x00080064} <= HEADER_TAGS
    plain = _top(**_CT, **_PRIMARY, SeriesDescription="Axial 5mm", BurnedInAnnotation="NO")
    screen = _top(**_CT, **_PRIMARY, SeriesDescription="Screen Save", BurnedInAnnotation="NO")
    for first, second in ((plain, screen), (screen, plain)):
        assert header_risk(first, None) != header_risk(second, None)
        assert header_risk(first, None) != header_risk(second, None)  # both answers memoised
    assert header_risk(screen, None) == (True, 'SeriesDescription "SCREEN SAVE"')
    bare = _top(**_CT, **_PRIMARY)
    captured = _top(**_CT, **_PRIMARY, ConversionType="WSD")
    assert header_risk(bare, None) is None
    assert header_risk(captured, None) == (True, "ConversionType WSD without BurnedInAnnotation NO")
    assert header_risk(bare, None) is None


def test_photographs_stay_uncleanable() -> None:
    """A screen-save ImageType does not make text cleaning enough for a photograph."""
    assert pixel_risk("XC", "", "", "", image_type="DERIVED\\SECONDARY\\SCREEN SAVE") == (
        False,
        "ImageType SCREEN SAVE",
    )
    assert pixel_risk("CT", CT_IMAGE, "", "YES", signature="GE / CT Dose Series") == (
        False,
        "RecognizableVisualFeatures is YES",
    )


def test_signature_tags_are_those_of_the_packaged_list() -> None:
    tags: set[int] = set()

    def walk(node: dict[str, Any]) -> None:
        if "args" in node or "arg" in node:
            for arg in node.get("args") or [node["arg"]]:
                walk(arg)
        else:
            group, element = node["tag"].strip("()").split(",")
            tags.add(int(group, 16) << 16 | int(element, 16))

    for sig in load_signatures():
        walk(sig.condition)
    assert {t for t in tags if t >> 16 != 0x0002} == SIGNATURE_TAGS
    assert SIGNATURE_TAGS - {0x60000022} <= HEADER_TAGS  # the engine looks them up


def _satisfy(node: dict[str, Any], values: dict[int, str]) -> None:
    """Values that make ``node`` (and / or / atoms) hold."""
    if node.get("op") == "and":
        for arg in node["args"]:
            _satisfy(arg, values)
    elif node.get("op") == "or":
        _satisfy(node["args"][0], values)
    else:
        assert "op" not in node, node
        group, element = node["tag"].strip("()").split(",")
        tag = int(group, 16) << 16 | int(element, 16)
        want = node["value"]
        values[tag] = f"{values[tag]} {want}" if tag in values else want


@pytest.mark.parametrize("sig", load_signatures(), ids=lambda s: str(s.index))
def test_pre_filter_never_hides_a_matching_signature(sig: Any) -> None:
    """For every signature, a header that satisfies it is matched by ``match_header`` as by
    ``match_signature`` on the whole data set (the pre-filter drops no signature)."""
    values: dict[int, str] = {}
    _satisfy(sig.condition, values)
    top = {tag: _element(tag, value) for tag, value in values.items()}
    found = match_signature(list(top.values()), [], None)
    assert found is not None and found.index <= sig.index
    assert match_header(top, None) == found


# -- whole files ----------------------------------------------------------------------------


def dose_screen(tmp_path: Path, seed: int = 31, **attrs: Any) -> tuple[SyntheticObject, Path]:
    """A CT Image Storage dose screen: 512x512, 16-bit monochrome, identity drawn as text."""
    obj = make_object(
        FrameSpec(seed=seed, kind="screen", rows=512, cols=512, rgb=False),
        sop_class=CT_IMAGE,
    )
    ds = obj.dataset
    pixels = obj.frames[0].pixels.astype(np.uint16) * 16  # 12 bits stored, as a CT slice
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    ds.SeriesDescription = "Dose Report"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.BurnedInAnnotation = "NO"  # as such devices write it
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    ds.WindowCenter, ds.WindowWidth = "1024", "4096"
    ds.PixelData = pixels.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return obj, write_object(obj, tmp_path / "in" / f"dose{seed}.dcm")


def test_ct_dose_screen_is_cleaned_and_verified(tmp_path: Path) -> None:
    obj, src = dose_screen(tmp_path)
    result = _deid("clean").deidentify_file(src, tmp_path / "out")
    ds = pydicom.dcmread(result.path)
    assert ds.SOPClassUID == CT_IMAGE and ds.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    pixels = result.audit["pixels"]
    assert pixels["verified"] is True and pixels["cleaned"] is True
    assert pixels["signature"] == "GE / CT Dose Series"
    assert pixels["detectors"].get("signature", 0) >= 1
    image = ds.pixel_array
    assert (image[:110, :512] == 0).all()  # the signature's region
    tess, rec = TesseractReader(), RecogniserReader()
    shown = (image >> 4).astype(np.uint8)
    texts = tess.read(shown)
    phi = [line for line in obj.frames[0].lines if line.phi and line.ink.any()]
    assert phi
    for line in phi:
        x0, y0, x1, y1 = line.box
        assert (image[y0:y1, x0:x1][line.ink] == 0).mean() >= 0.99, line.kind
        values = identity_values(line, obj.identity)
        assert not readable(values, texts), line.kind
        assert not readable(values, [rec.read_box(shown, line.box)]), line.kind
    text = json.dumps(result.audit)
    for value in (obj.identity.family, obj.identity.patient_id, obj.identity.accession):
        assert value not in text


def test_screen_save_without_signature_is_cleaned_by_the_detectors(tmp_path: Path) -> None:
    obj, src = dose_screen(
        tmp_path, seed=32, Modality="MR", SOPClassUID=MR_IMAGE, SeriesDescription="Summary"
    )
    obj.dataset.Manufacturer = "ACME Medical"
    write_object(obj, src)
    result = _deid("clean").deidentify_file(src, tmp_path / "out")
    pixels = result.audit["pixels"]
    assert pixels["signature"] is None and pixels["verified"] is True and pixels["regions"] > 0
    image = pydicom.dcmread(result.path).pixel_array
    for line in obj.frames[0].lines:
        if line.phi and line.ink.any():
            x0, y0, x1, y1 = line.box
            assert (image[y0:y1, x0:x1][line.ink] == 0).mean() >= 0.99, line.kind


def test_ct_dose_screen_quarantine_and_allow(tmp_path: Path) -> None:
    obj, src = dose_screen(tmp_path, seed=33)
    with pytest.raises(DeidError) as info:
        _deid("quarantine").deidentify_file(src, tmp_path / "out")
    assert info.value.reason == "burned_in_annotation"
    assert info.value.detail == "ImageType SCREEN SAVE"
    obj.dataset.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    write_object(obj, src)
    with pytest.raises(DeidError) as info:
        _deid("quarantine").deidentify_file(src, tmp_path / "out")
    assert info.value.detail == 'device signature "GE / CT Dose Series"'
    assert obj.identity.family not in str(info.value)
    allowed = _deid("allow").deidentify_file(src, tmp_path / "out")
    assert allowed.audit["burned_in_allowed"] is True and "pixels" not in allowed.audit
    assert pydicom.dcmread(allowed.path).PixelData == obj.dataset.PixelData


def _workstation_capture(tmp_path: Path) -> tuple[SyntheticObject, Path, str]:
    """A workstation's screen grab stored as a CT image: ConversionType WSD, ORIGINAL\\PRIMARY,
    no BurnedInAnnotation."""
    obj, src = dose_screen(
        tmp_path,
        seed=35,
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        SeriesDescription="Summary",
        Manufacturer="ACME Medical",
        ConversionType="WSD",
    )
    del obj.dataset.BurnedInAnnotation
    write_object(obj, src)
    return obj, src, "ConversionType WSD without BurnedInAnnotation NO"


def _series_screen_save(tmp_path: Path) -> tuple[SyntheticObject, Path, str]:
    """A console's screen save named only by its series (with a name in it), stated NO."""
    obj, src = dose_screen(
        tmp_path, seed=36, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], Manufacturer="ACME Medical"
    )
    obj.dataset.SeriesDescription = f"Screen_Save {obj.identity.family}"
    write_object(obj, src)
    return obj, src, 'SeriesDescription "SCREEN SAVE"'


def _xa_reference(tmp_path: Path) -> tuple[SyntheticObject, Path, str]:
    """A derived XA reference frame (8-bit, the console's text on it), no BurnedInAnnotation."""
    obj = make_object(
        FrameSpec(seed=37, kind="screen", rows=512, cols=512, rgb=False), sop_class=XA_IMAGE
    )
    obj.dataset.Modality = "XA"
    obj.dataset.ImageType = ["DERIVED", "PRIMARY", "SINGLE PLANE"]
    obj.dataset.Manufacturer = "ACME Angio"
    src = write_object(obj, tmp_path / "in" / "xa37.dcm")
    return obj, src, "XA ImageType DERIVED without BurnedInAnnotation NO"


@pytest.mark.parametrize("build", [_workstation_capture, _series_screen_save, _xa_reference])
def test_rules_through_the_engine_and_the_preview(
    tmp_path: Path, build: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each rule on a real file: quarantined under "quarantine" with the rule as detail,
    cleaned and verified under "clean", named by ``gateway-agent pixels``; no identity in
    the detail or the output."""
    from gateway_agent.cli import main

    obj, src, detail = build(tmp_path)
    identity = (obj.identity.family, obj.identity.patient_id, obj.identity.accession)
    with pytest.raises(DeidError) as info:
        _deid("quarantine").deidentify_file(src, tmp_path / "out")
    assert (info.value.reason, info.value.detail) == ("burned_in_annotation", detail)
    assert not any(value in str(info.value) for value in identity)

    result = _deid("clean").deidentify_file(src, tmp_path / "out")
    pixels = result.audit["pixels"]
    assert pixels["cleaned"] is True and pixels["verified"] is True and pixels["regions"] > 0
    ds = pydicom.dcmread(result.path)
    assert ds.BurnedInAnnotation == "NO"
    image = ds.pixel_array
    phi = [line for line in obj.frames[0].lines if line.phi and line.ink.any()]
    assert phi
    for line in phi:
        x0, y0, x1, y1 = line.box
        assert (image[y0:y1, x0:x1][line.ink] == 0).mean() >= 0.99, line.kind

    assert main(["pixels", str(src), "-o", str(tmp_path / "preview.png")]) == 0
    out = capsys.readouterr().out
    assert f"burned-in policy: at risk ({detail})" in out
    assert not any(value in out or value.title() in out for value in identity)


@pytest.mark.parametrize(
    ("manufacturer", "model"),
    [
        ("GE MEDICAL SYSTEMS", "Revolution CT"),
        ("SIEMENS", "SOMATOM Force"),
        ("TOSHIBA", "Aquilion ONE"),
        ("Philips", "iCT 256"),
    ],
)
def test_ordinary_ct_slices_stay_header_only(tmp_path: Path, manufacturer: str, model: str) -> None:
    """An acquired slice (ORIGINAL\\PRIMARY\\AXIAL) of the signatures' vendors is rewritten
    header only under every policy: pixel data copied byte for byte, no pixel audit."""
    ds = make_ct_slice(rows=512, cols=512, manufacturer=manufacturer, model=model)
    (src,) = write_series([ds], tmp_path / "in")
    for policy in ("clean", "quarantine"):
        result = _deid(policy).deidentify_file(src, tmp_path / policy)
        assert "pixels" not in result.audit and result.audit["burned_in_allowed"] is False
        assert pydicom.dcmread(result.path).PixelData == ds.PixelData


def test_preview_names_the_rule_and_the_signature(tmp_path: Path) -> None:
    """``gateway-agent pixels`` says whether the policy holds the file at risk, by which rule
    (the one the agent applies), and which signature it paints; no identity printed."""
    import subprocess
    import sys

    obj, src = dose_screen(tmp_path, seed=34)
    ordinary = write_series([make_ct_slice(rows=64, cols=64)], tmp_path / "ct")[0]
    outputs = []
    for path in (src, ordinary):
        done = subprocess.run(
            [sys.executable, "-m", "gateway_agent", "pixels", str(path), "-o",
             str(tmp_path / f"{path.stem}.png")],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        outputs.append(done.stdout)
    assert "device signature: GE / CT Dose Series" in outputs[0]
    assert "burned-in policy: at risk (ImageType SCREEN SAVE)" in outputs[0]
    assert "burned-in policy: not at risk" in outputs[1]
    for value in (obj.identity.family, obj.identity.patient_id):
        assert value not in outputs[0] and value.title() not in outputs[0]
