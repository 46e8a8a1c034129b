"""Retain Safe Private (PS3.15 E.3.10) with Table E.3.10-1: every row, creators, VRs, pixel data."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway_agent.deid import (
    SAFE_PRIVATE_PIXEL_DATA,
    Deidentifier,
    DeidOptions,
    safe_private_table,
)
from gateway_agent.deid.engine import Engine
from gateway_agent.deid.keys import Keys
from gateway_agent.deid.profile import profile_for
from gateway_agent.deid.safeprivate import vr_matches
from gateway_agent.dicom.codec import Element, encode_dataset
from gateway_agent.synthetic import make_ct_slice, write_series

SECRET = b"safe-private-secret-0123456789ab"
SAFE = DeidOptions(retain_safe_private=True)
#: OB/OW rows of the table that are not pixel data (meta data blobs, geometry).
NOT_PIXELS = {
    ("Philips Imaging DD 097", 0x2001, 0x47),  # Mesh Section Vertex Data
    ("Philips Imaging DD 097", 0x2001, 0x4A),  # Mesh Section Index Data
    ("SIEMENS Ultrasound SC2000", 0x0119, 0x01),  # Common Acoustic Meta Information
    ("SIEMENS Ultrasound SC2000", 0x0119, 0x04),  # Per Transaction Acoustic Control Information
    ("SIEMENS Ultrasound SC2000", 0x0129, 0x08),  # Visualization Information
    ("SIEMENS Ultrasound SC2000", 0x0129, 0x10),  # Application State Information
    ("SIEMENS Ultrasound SC2000", 0x0129, 0x21),  # Cine Parameters Schema
    ("SIEMENS Ultrasound SC2000", 0x0129, 0x22),  # Values of Cine Parameters
    ("SIEMENS Ultrasound SC2000", 0x0129, 0x29),  # (no name in the table)
}


def _even(raw: bytes, pad: bytes = b" ") -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _value(vr: str, i: int) -> bytes | list[list[Element]]:
    if vr == "SQ":
        # A standard attribute the profile removes and one it keeps: items are processed.
        return [
            [
                Element(0x00080100, "SH", _even(f"CV{i}".encode())),
                Element(0x00100010, "PN", b"PHIDOE^PHIJANE"),
            ]
        ]
    sizes = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4}
    if vr in sizes:
        return struct.pack("<I", i)[: sizes[vr]].ljust(sizes[vr], b"\0")
    if vr in ("OB", "OW", "OW/OB", ""):
        return struct.pack("<I", i)
    if vr in ("DS", "IS"):
        return _even(str(i).encode())
    if vr == "UI":
        return _even(f"1.2.{i}".encode(), b"\0")
    return _even(f"V{i}".encode())  # CS, LO, SH, ST, LT


def _planted() -> tuple[list[Element], dict[int, tuple[str, int, int]]]:
    """Every row of the table, each creator in its own block of each group, plus decoys."""
    table = safe_private_table()
    blocks: dict[tuple[int, str], int] = {}
    elements = [Element(0x00080018, "UI", b"1.2.3.4\0")]
    where: dict[int, tuple[str, int, int]] = {}
    for i, (key, row) in enumerate(sorted(table.items())):
        creator, group, elem = key
        block = blocks.get((group, creator))
        if block is None:
            block = 0x10 + sum(1 for g, _ in blocks if g == group)
            blocks[group, creator] = block
            elements.append(Element(group << 16 | block, "LO", _even(creator.encode())))
        tag = group << 16 | block << 8 | elem
        vr = {"OW/OB": "OW", "": "UN"}.get(row.vr, row.vr)
        elements.append(Element(tag, vr, _value(row.vr, i)))
        where[tag] = key
    # Decoys: an unlisted element in a listed block; a listed (group, element) under a creator
    # that the table does not list for it; an unknown creator.
    philips = blocks[0x2001, "Philips Imaging DD 001"]
    elements.append(Element(0x2001 << 16 | philips << 8 | 0xFE, "LO", b"PHIPRIVATE"))
    elements.append(Element(0x00190080, "LO", b"ACME"))
    elements.append(Element(0x0019800C, "IS", b"7 "))  # like SIEMENS MR HEADER (0019,xx0C)
    elements.sort(key=lambda e: e.tag)
    return elements, where


def _run(elements: list[Element], options: DeidOptions = SAFE, **kw: bool) -> dict[int, Element]:
    engine = Engine(Keys(SECRET), profile_for(options), None)
    return {e.tag: e for e in engine.run(elements, **kw).elements}


def test_table_is_the_standards() -> None:
    table = safe_private_table()
    assert len(table) == 479
    assert len({creator for creator, _, _ in table}) == 20
    pairs = Counter((group, elem) for _, group, elem in table)
    assert sum(1 for n in pairs.values() if n > 1) == 103  # why the creator is in the key
    assert table["Philips Imaging DD 001", 0x2001, 0x7D].vr == "OW/OB"
    assert sum(1 for row in table.values() if row.vr == "") == 5


def test_every_row_is_kept_with_its_creator() -> None:
    elements, where = _planted()
    out = _run(elements)
    missing = [
        f"{key} {safe_private_table()[key].name}"
        for tag, key in where.items()
        if key not in SAFE_PRIVATE_PIXEL_DATA and tag not in out
    ]
    assert not missing, "\n".join(missing)
    # The creator of every block with a kept element is kept; blocks with nothing kept go.
    kept_blocks = {
        (t >> 16) << 16 | (t & 0xFFFF) >> 8
        for t, k in where.items()
        if k not in SAFE_PRIVATE_PIXEL_DATA
    }
    creators = {e.tag for e in elements if (e.tag >> 16) & 1 and 0x10 <= e.tag & 0xFFFF <= 0xFF}
    assert {c for c in creators if c in out} == {c for c in creators if c in kept_blocks}
    assert 0x00250011 not in out  # Philips ST80i: its only row is private pixel data
    # Decoys are removed: the unlisted element, the unknown creator and its element.
    assert not {0x2001 << 16 | 0x10FE, 0x00190080, 0x0019800C} & set(out)
    # Sequences are kept with their items processed like any other item.
    for tag, key in where.items():
        if safe_private_table()[key].vr == "SQ":
            (item,) = out[tag].items
            assert [e.tag for e in item] == [0x00080100, 0x00100010]
            assert b"PHIDOE" not in item[1].raw  # PatientName inside: its pseudonym
    # Kept values are unchanged.
    by_tag = {e.tag: e for e in elements}
    assert all(
        out[t].value == by_tag[t].value for t, k in where.items() if t in out and out[t].vr != "SQ"
    )


def test_private_pixel_data_needs_clean_pixel_data() -> None:
    elements, where = _planted()
    pixel_tags = {t for t, k in where.items() if k in SAFE_PRIVATE_PIXEL_DATA}
    assert len(pixel_tags) == len(SAFE_PRIVATE_PIXEL_DATA)
    assert not pixel_tags & set(_run(elements))
    assert pixel_tags <= set(_run(elements, private_pixels_cleaned=True))
    # The Retain Safe Private option alone never keeps private pixel data.
    assert not pixel_tags & set(_run(elements, pixels_cleaned=True))


def test_pixel_data_rows_are_classified() -> None:
    """Every binary row of the table is either private pixel data or listed here as not."""
    table = safe_private_table()
    binary = {k for k, row in table.items() if row.vr in ("OB", "OW", "OW/OB")}
    assert set(table) >= SAFE_PRIVATE_PIXEL_DATA
    assert binary == (SAFE_PRIVATE_PIXEL_DATA | NOT_PIXELS)
    for key in SAFE_PRIVATE_PIXEL_DATA:
        name = table[key].name.lower()
        assert any(w in name for w in ("pixel", "payload", "image", "data", "codec", "padding"))


def test_creator_vr_and_basic_profile() -> None:
    def block(vr: str, value: bytes, creator: bytes = b"SIEMENS MR HEADER ") -> list[Element]:
        return [
            Element(0x00080018, "UI", b"1.2.3.4\0"),
            Element(0x00190010, "LO", creator),
            Element(0x0019100C, vr, value),  # B Value, IS in the table
        ]

    assert 0x0019100C in _run(block("IS", b"1000"))
    assert 0x0019100C in _run(block("UN", b"1000"))  # implicit VR files
    assert 0x0019100C not in _run(block("LO", b"PHIDOE"))  # not what the table describes
    assert 0x0019100C not in _run(block("IS", b"1000", b"siemens mr header "))  # exact creator
    assert not {0x00190010, 0x0019100C} & set(_run(block("IS", b"1000"), DeidOptions()))
    assert (
        vr_matches("OW/OB", "OB") and vr_matches("OW/OB", "OW") and not vr_matches("OW/OB", "UN ")
    )
    assert vr_matches("", "FD") and not vr_matches("FL", "FD")


def test_sequence_kept_as_bytes_is_parsed() -> None:
    """A listed sequence that arrives as UN bytes (implicit VR) is parsed and its items cleaned."""
    item = encode_dataset(
        [Element(0x00080100, "SH", b"CV"), Element(0x00100010, "PN", b"PHIDOE^JANE ")],
        True,
        True,
    )
    raw = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(item)) + item
    base = [
        Element(0x00080018, "UI", b"1.2.3.4\0"),
        Element(0x20010010, "LO", b"Philips Imaging DD 001"),
    ]
    out = _run([*base, Element(0x20011066, "UN", raw)])  # (2001,xx66) Image Curve, SQ
    (kept,) = out[0x20011066].items
    assert [e.tag for e in kept] == [0x00080100, 0x00100010]
    assert b"PHIDOE" not in kept[1].raw
    broken = _run([*base, Element(0x20011066, "UN", b"\x01\x02\x03\x04")])
    assert 0x20011066 not in broken and 0x20010010 not in broken


@pytest.mark.parametrize("implicit", [False, True])
def test_files_keep_listed_private_attributes(tmp_path: Path, implicit: bool) -> None:
    ds = make_ct_slice(rows=8, cols=8)
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x0019100C, "IS", "1000")
    ds.add_new(0x0019100D, "CS", "DIRECTIONAL")
    ds.add_new(0x00191099, "LO", "PHIPRIVATE")
    ds.add_new(0x20010010, "LO", "Philips Imaging DD 001")
    ds.add_new(0x2001107D, "OB", b"\x01\x02\x03\x04")  # Frame Pixel Data
    curve = Dataset()
    curve.CodeValue = "X"
    curve.PatientName = "PHIDOE^PHIJANE"
    ds.add_new(0x20011066, "SQ", Sequence([curve]))  # Image Curve
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    (src,) = write_series([ds], tmp_path / "in")
    result = Deidentifier(SECRET, SAFE).deidentify_file(src, tmp_path / "out")
    out = pydicom.dcmread(result.path)
    assert out[0x00190010].value == "SIEMENS MR HEADER"
    assert out[0x0019100C].value in ("1000", b"1000", 1000)
    assert 0x00191099 not in out and 0x2001107D not in out
    assert 0x00090010 not in out and 0x00091001 not in out  # the synthetic ACME block
    assert (
        b"PHIDOE" not in result.path.read_bytes() and b"PHIPRIVATE" not in result.path.read_bytes()
    )
    assert "Retain Safe Private Option" in out.DeidentificationMethod
