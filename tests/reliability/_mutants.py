"""Hostile DICOM inputs: seeded mutants of real files (pydicom test files + synthetic CT).

``generate(count, seed)`` yields :class:`Mutant` objects lazily, so 10,000 of them never sit in
memory at once. Kinds:

* ``trunc``      the file cut at an element boundary (tag, length, value start, element end);
                 boundaries are enumerated seed by seed, so every boundary of the first seeds is hit
* ``lenflip``    a length field with bits flipped or replaced by a random value
* ``hugelen``    a length field set to a huge declared length (0xFFFFFFF0, 0x7FFFFFFF, undefined)
* ``deepseq``    sequences nested 8 to 5,000 deep, with and without their delimiters
* ``cyclic``     cyclic-looking structures: an item repeated, items longer than their parent,
                 stray delimiters, a sequence that contains copies of itself
* ``wrongvr``    the VR bytes of an element replaced by another or an invalid VR
* ``charset``    bogus Specific Character Set values and undecodable bytes in PN/LO values
* ``byteflip``   random bytes of the header overwritten
* ``zero``       an empty file
* ``random``     random bytes named ``.dcm`` (some with ``DICM`` at offset 128)
* ``misext``     a valid file with a misleading extension (``.txt``, ``.jpg``, none, ``.DCM``)
* ``large``      a valid file with a very large pixel data element, written in streaming chunks

File names carry the index and kind only (never a value from the file).
"""

from __future__ import annotations

import io
import random
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

from gateway_agent.synthetic import Patient, make_ct_slice, synthetic_uid

__all__ = [
    "KINDS",
    "Element",
    "Mutant",
    "generate",
    "seed_files",
    "walk_elements",
]

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV"}
_LONG_VRS |= {b"UV"}
_ALL_VRS = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
    b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
    b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
]  # fmt: skip
_BAD_VRS = [b"XX", b"\x00\x00", b"pn", b"\xff\xfe", b"S ", b"Q#"]
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Element:
    """Where one raw element sits in a file (offsets in bytes)."""

    tag: int
    tag_off: int
    len_off: int
    len_size: int
    vr_off: int  # -1 for implicit VR and item/delimiter tags
    value_off: int
    value_len: int  # _UNDEFINED for undefined length
    end_off: int
    depth: int
    big_endian: bool


@dataclass(frozen=True)
class Mutant:
    """One hostile input: a name (index and kind, no PHI) and its bytes or a streaming size."""

    index: int
    kind: str
    name: str
    data: bytes = b""
    large_bytes: int = 0  # > 0: a valid file whose pixel data is this large, written in chunks

    def write(self, path: Path) -> None:
        """Write the mutant to ``path`` (large ones in 1 MiB chunks)."""
        if not self.large_bytes:
            path.write_bytes(self.data)
            return
        _write_large(path, self.large_bytes, self.index)


KINDS = (
    "trunc",
    "lenflip",
    "hugelen",
    "deepseq",
    "cyclic",
    "wrongvr",
    "charset",
    "byteflip",
    "zero",
    "random",
    "misext",
    "large",
)


# --------------------------------------------------------------------------- raw element walker


def _u16(data: bytes, off: int, be: bool) -> int:
    return int(struct.unpack_from(">H" if be else "<H", data, off)[0])


def _u32(data: bytes, off: int, be: bool) -> int:
    return int(struct.unpack_from(">I" if be else "<I", data, off)[0])


def _tag(data: bytes, off: int, be: bool) -> int:
    return (_u16(data, off, be) << 16) | _u16(data, off + 2, be)


def _dataset_start(data: bytes) -> tuple[int, bool, bool, int]:
    """(offset of the first dataset element, implicit VR, big endian, meta end)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        off = 132
        ts = b""
        while off + 8 <= len(data) and _u16(data, off, False) == 0x0002:
            vr = data[off + 4 : off + 6]
            if vr in _LONG_VRS:
                length = _u32(data, off + 8, False)
                value_off = off + 12
            else:
                length = _u16(data, off + 6, False)
                value_off = off + 8
            if length == _UNDEFINED:
                break
            if _u16(data, off + 2, False) == 0x0010:
                ts = data[value_off : value_off + length].rstrip(b"\0 ")
            off = value_off + length
        implicit = ts == b"1.2.840.10008.1.2"
        big = ts == b"1.2.840.10008.1.2.2"
        return off, implicit, big, off
    # No meta: explicit if the bytes after the first tag look like a VR.
    implicit = not (len(data) >= 6 and data[4:6].isalpha() and data[4:6].isupper())
    return 0, implicit, False, 0


def walk_elements(data: bytes, max_elements: int = 20_000) -> list[Element]:
    """Every element the raw structure shows, nested items included (best effort, never raises)."""
    out: list[Element] = []
    try:
        start, implicit, be, _ = _dataset_start(data)
        # The meta group itself (explicit little endian) when present.
        if start and data[128:132] == b"DICM":
            _walk(data, 132, start, False, False, 0, out, max_elements, meta=True)
        _walk(data, start, len(data), implicit, be, 0, out, max_elements)
    except (struct.error, IndexError, RecursionError):
        pass
    return out


def _walk(
    data: bytes,
    off: int,
    end: int,
    implicit: bool,
    be: bool,
    depth: int,
    out: list[Element],
    limit: int,
    *,
    meta: bool = False,
) -> int:
    """Walk elements from ``off`` to ``end`` (or a delimiter); return where it stopped."""
    while off + 8 <= end and len(out) < limit and depth < 200:
        tag = _tag(data, off, be and not meta)
        if tag in (_ITEM_DELIM, _SEQ_DELIM):
            out.append(Element(tag, off, off + 4, 4, -1, off + 8, 0, off + 8, depth, be))
            return off + 8
        if tag == _ITEM:
            length = _u32(data, off + 4, be)
            value_off = off + 8
            if length == _UNDEFINED:
                stop = _walk(data, value_off, end, implicit, be, depth + 1, out, limit)
            else:
                stop = min(value_off + length, end)
                _walk(data, value_off, stop, implicit, be, depth + 1, out, limit)
            out.append(Element(tag, off, off + 4, 4, -1, value_off, length, stop, depth, be))
            off = stop
            continue
        lbe = be and not meta
        if implicit and not meta:
            vr_off = -1
            len_off, len_size = off + 4, 4
            length = _u32(data, len_off, lbe)
            try:
                is_sq = dictionary_VR(tag) == "SQ"
            except KeyError:
                is_sq = length == _UNDEFINED
        else:
            vr_off = off + 4
            vr = data[vr_off : vr_off + 2]
            if vr in _LONG_VRS:
                len_off, len_size = off + 8, 4
                length = _u32(data, len_off, lbe)
            else:
                len_off, len_size = off + 6, 2
                length = _u16(data, len_off, lbe)
            is_sq = vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED)
        value_off = len_off + len_size
        if length == _UNDEFINED:
            # A sequence or encapsulated pixel data: items until the sequence delimiter.
            stop = _walk_items(data, value_off, end, implicit, be, depth, out, limit, is_sq)
        else:
            stop = min(value_off + length, end)
            if is_sq:
                _walk(data, value_off, stop, implicit, be, depth + 1, out, limit)
        out.append(Element(tag, off, len_off, len_size, vr_off, value_off, length, stop, depth, be))
        off = stop
    return off


def _walk_items(
    data: bytes,
    off: int,
    end: int,
    implicit: bool,
    be: bool,
    depth: int,
    out: list[Element],
    limit: int,
    is_sq: bool,
) -> int:
    while off + 8 <= end and len(out) < limit:
        tag = _tag(data, off, be)
        length = _u32(data, off + 4, be)
        if tag == _SEQ_DELIM:
            out.append(Element(tag, off, off + 4, 4, -1, off + 8, 0, off + 8, depth + 1, be))
            return off + 8
        if tag != _ITEM:
            return end
        value_off = off + 8
        if is_sq:
            if length == _UNDEFINED:
                stop = _walk(data, value_off, end, implicit, be, depth + 2, out, limit)
            else:
                stop = min(value_off + length, end)
                _walk(data, value_off, stop, implicit, be, depth + 2, out, limit)
        else:
            stop = min(value_off + length, end) if length != _UNDEFINED else end
        out.append(Element(tag, off, off + 4, 4, -1, value_off, length, stop, depth + 1, be))
        off = stop
    return off


# --------------------------------------------------------------------------- seeds


def _ds_bytes(ds: Dataset, *, validate: bool = True) -> bytes:
    buf = io.BytesIO()
    old = pydicom_config.settings.writing_validation_mode
    if not validate:
        pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buf, enforce_file_format=validate)
    finally:
        pydicom_config.settings.writing_validation_mode = old
    return buf.getvalue()


def _synthetic(i: int, rows: int = 32) -> bytes:
    ds = make_ct_slice(study_seed=f"hostile-{i}", instance_number=i + 1, rows=rows, cols=rows)
    return _ds_bytes(ds)


def seed_files() -> list[tuple[str, bytes]]:
    """Real DICOM to mutate: synthetic CT with planted PHI first, then pydicom's test files."""
    seeds = [(f"synthetic{i}", _synthetic(i)) for i in range(3)]
    skip_suffix = {".gz", ".json", ".dump", ".icc", ".txt"}
    for path in sorted(TEST_FILES.iterdir()):
        if path.is_file() and path.suffix not in skip_suffix and path.stat().st_size < 600_000:
            seeds.append((path.stem, path.read_bytes()))
    dicomdir = TEST_FILES / "dicomdirtests" / "DICOMDIR"
    if dicomdir.is_file():
        seeds.append(("DICOMDIR", dicomdir.read_bytes()))
    return seeds


# --------------------------------------------------------------------------- structures


def _meta(sop_uid: str) -> bytes:
    """Preamble, DICM and an explicit-LE meta group for a CT instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue()


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" " if vr not in (b"UI", b"OB") else b"\0"
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _sq_undef(group: int, elem: int, items: list[bytes], *, delimit: bool = True) -> bytes:
    body = b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)
        + it
        + (struct.pack("<HHI", 0xFFFE, 0xE00D, 0) if delimit else b"")
        for it in items
    )
    tail = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) if delimit else b""
    return struct.pack("<HH2sHI", group, elem, b"SQ", 0, _UNDEFINED) + body + tail


def _sq_defined(group: int, elem: int, items: list[bytes], *, lie: int = 0) -> bytes:
    body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(it) + lie) + it for it in items)
    return struct.pack("<HH2sHI", group, elem, b"SQ", 0, len(body)) + body


def _header(i: int, extra: bytes = b"") -> bytes:
    """A small valid CT header (no pixels) with planted PHI, plus ``extra`` in tag order."""
    sop = synthetic_uid("hostile-struct", i)
    study = synthetic_uid("hostile-struct-study", i % 7)
    p = Patient()
    head = (
        _el(0x0008, 0x0005, b"CS", b"ISO_IR 100")
        + _el(0x0008, 0x0016, b"UI", CTImageStorage.encode())
        + _el(0x0008, 0x0018, b"UI", sop.encode())
        + _el(0x0008, 0x0060, b"CS", b"CT")
    )
    # (0008,1110) Referenced Study Sequence is where ``extra`` structures go (tag order kept).
    tail = (
        _el(0x0010, 0x0010, b"PN", p.name.encode())
        + _el(0x0010, 0x0020, b"LO", p.patient_id.encode())
        + _el(0x0010, 0x0030, b"DA", p.birth_date.encode())
        + _el(0x0020, 0x000D, b"UI", study.encode())
        + _el(0x0020, 0x000E, b"UI", synthetic_uid("hostile-struct-series", i % 7).encode())
    )
    return _meta(sop) + head + extra + tail


def _nested(depth: int, *, delimit: bool, leaf: bytes) -> bytes:
    inner = leaf
    for _ in range(depth):
        inner = _sq_undef(0x0040, 0xA730, [inner], delimit=delimit)  # Content Sequence
    return inner


def _deep(i: int, rng: random.Random) -> bytes:
    depth = rng.choice([8, 64, 256, 1024, 3000, 5000])
    leaf = _el(0x0010, 0x0010, b"PN", b"PHIDOE^PHINESTED")
    delimit = rng.random() < 0.6
    if rng.random() < 0.5:
        nested = _nested(depth, delimit=delimit, leaf=leaf)
    else:
        inner = leaf
        for _ in range(min(depth, 800)):
            inner = _sq_defined(0x0040, 0xA730, [inner])
        nested = inner
    return _header(i, _wrap_0008_1110(nested))


def _wrap_0008_1110(payload: bytes) -> bytes:
    """Put ``payload`` (elements of group 0040) in an item of (0008,1110)."""
    return _sq_undef(0x0008, 0x1110, [payload])


def _cyclic(i: int, rng: random.Random) -> bytes:
    leaf = _el(0x0008, 0x1150, b"UI", CTImageStorage.encode()) + _el(
        0x0008, 0x1155, b"UI", synthetic_uid("ref", i).encode()
    )
    variant = i % 6
    if variant == 0:  # the same item repeated many times
        sq = _sq_undef(0x0008, 0x1110, [leaf] * rng.choice([1000, 20000]))
    elif variant == 1:  # an item that claims to be longer than its parent
        sq = _sq_defined(0x0008, 0x1110, [leaf], lie=rng.choice([2, 64, 1 << 20]))
    elif variant == 2:  # a stray sequence delimiter at the top level and an orphan item delimiter
        sq = (
            _sq_undef(0x0008, 0x1110, [leaf])
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        )
    elif variant == 3:  # a sequence containing byte copies of itself
        inner = _sq_undef(0x0008, 0x1115, [leaf])
        for _ in range(rng.choice([5, 12])):
            inner = _sq_undef(0x0008, 0x1115, [inner, inner])
        sq = _sq_undef(0x0008, 0x1110, [inner])
    elif variant == 4:  # an item with undefined length that is never closed
        sq = struct.pack("<HH2sHI", 0x0008, 0x1110, b"SQ", 0, _UNDEFINED) + struct.pack(
            "<HHI", 0xFFFE, 0xE000, _UNDEFINED
        )
        sq += leaf * 3
    else:  # item tag where an element should be, and an item length of zero repeated
        sq = _sq_undef(0x0008, 0x1110, [b""] * 5000) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    return _header(i, sq)


# --------------------------------------------------------------------------- mutations


def _set_len(data: bytearray, el: Element, value: int) -> None:
    fmt = (">" if el.big_endian else "<") + ("I" if el.len_size == 4 else "H")
    struct.pack_into(fmt, data, el.len_off, value & (0xFFFFFFFF if el.len_size == 4 else 0xFFFF))


def _boundaries(elements: list[Element], size: int) -> list[int]:
    offs: set[int] = set()
    for el in elements:
        offs.update((el.tag_off, el.tag_off + 2, el.len_off, el.value_off, el.end_off))
        if el.value_len not in (0, _UNDEFINED) and el.value_off + 1 < el.end_off:
            offs.add((el.value_off + el.end_off) // 2)
    offs.update((0, 1, 64, 128, 130, 132))
    return sorted(o for o in offs if 0 <= o < size)


def _charset(i: int, rng: random.Random) -> bytes:
    ds = make_ct_slice(study_seed=f"charset-{i % 11}", instance_number=i + 1, rows=16, cols=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _charset_into(ds, rng)


def _charset_into(ds: Dataset, rng: random.Random) -> bytes:
    bogus = rng.choice(
        [
            "ISO_IR 999",
            "",
            "\\\\\\",
            "ISO 2022 IR 87",
            "ISO 2022 IR 6\\ISO 2022 IR 87\\ISO 2022 IR 159",
            "GB18030\\ISO_IR 192",
            "ISO_IR 192",
            "utf-8",
            "ISO_IR 13",
            "x" * 64,
        ]
    )
    ds.SpecificCharacterSet = bogus
    raw = rng.choice(
        [
            b"\x1b$B\xff\xfe PHIDOE^PHIJANE",
            b"PHIDOE\xc3\x28^PHIJANE",
            b"\xed\xa0\x80PHIDOE",
            b"PHIDOE\x1b(J\x1b$)C^PHIJANE\x00",
            bytes(rng.randrange(256) for _ in range(40)),
        ]
    )
    ds["PatientName"].value = raw
    ds.InstitutionName = raw.decode("latin-1")[:64]
    return _ds_bytes(ds, validate=False)


def _write_large(path: Path, nbytes: int, index: int) -> None:
    side = 1
    while (side * 2) * (side * 2) * 2 <= nbytes:
        side *= 2
    rows = side
    cols = max(1, nbytes // (2 * rows))
    ds = make_ct_slice(study_seed=f"large-{index}", instance_number=1, rows=16, cols=16)
    ds.Rows, ds.Columns = rows, cols
    del ds.PixelData
    head = _ds_bytes(ds)
    length = rows * cols * 2
    chunk = bytes(range(256)) * 4096  # 1 MiB of a non-constant pattern
    with path.open("wb") as fh:
        fh.write(head)
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n


def generate(
    count: int, seed: int = 0, *, large_mb: int = 64, n_large: int = 1
) -> Iterator[Mutant]:
    """Yield ``count`` mutants, deterministic for ``seed``.

    About a third are truncations at element boundaries (every boundary of the first seeds, in
    order), the rest are spread over the other kinds; ``n_large`` files of ``large_mb`` MiB each.
    """
    rng = random.Random(seed)
    seeds = seed_files()
    walked = [(name, data, walk_elements(data)) for name, data in seeds]
    index = 0

    def make(kind: str, data: bytes = b"", ext: str = ".dcm", large: int = 0) -> Mutant:
        nonlocal index
        m = Mutant(index, kind, f"m{index:05d}_{kind}{ext}", data, large)
        index += 1
        return m

    # Fixed specials first, so even a tiny run has one of each.
    yield make("zero")
    for _ in range(n_large):
        if index < count:
            yield make("large", large=large_mb << 20)
    for ext in (".txt", ".jpg", "", ".DCM", ".dcm.bak", ".IMA"):
        if index < count:
            yield make("misext", _synthetic(100 + index), ext)

    n_trunc = max(1, count // 3)
    trunc_plan = (
        (name, data, off) for name, data, els in walked for off in _boundaries(els, len(data))
    )
    others = ["lenflip", "hugelen", "deepseq", "cyclic", "wrongvr", "charset", "byteflip", "random"]
    weights = [14, 10, 5, 5, 10, 6, 12, 4]
    made_trunc = 0
    while index < count:
        if made_trunc < n_trunc and (rng.random() < 0.34 or made_trunc < n_trunc // 4):
            nxt = next(trunc_plan, None)
            if nxt is not None:
                made_trunc += 1
                yield make("trunc", nxt[1][: nxt[2]])
                continue
            made_trunc = n_trunc
        kind = rng.choices(others, weights)[0]
        _name, data, els = walked[rng.randrange(len(walked))]
        buf = bytearray(data)
        if kind == "lenflip" and els:
            el = rng.choice(els)
            cur = (
                _u32(data, el.len_off, el.big_endian)
                if el.len_size == 4
                else _u16(data, el.len_off, el.big_endian)
            )
            new = (
                cur ^ (1 << rng.randrange(el.len_size * 8))
                if rng.random() < 0.6
                else rng.getrandbits(el.len_size * 8)
            )
            _set_len(buf, el, new)
        elif kind == "hugelen" and els:
            el = rng.choice(els)
            big = [0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE, len(data) * 2, 0x10000000]
            _set_len(buf, el, rng.choice(big) if el.len_size == 4 else 0xFFFF)
        elif kind == "wrongvr":
            explicit = [e for e in els if e.vr_off >= 0]
            if not explicit:
                kind = "byteflip"
            else:
                el = rng.choice(explicit)
                vr = rng.choice(_ALL_VRS + _BAD_VRS)
                buf[el.vr_off : el.vr_off + 2] = vr
        elif kind == "deepseq":
            yield make(kind, _deep(index, rng))
            continue
        elif kind == "cyclic":
            yield make(kind, _cyclic(index, rng))
            continue
        elif kind == "charset":
            yield make(kind, _charset(index, rng))
            continue
        elif kind == "random":
            size = rng.choice([1, 127, 128, 132, 133, 1000, 65536])
            raw = bytearray(rng.randbytes(size))
            if size > 132 and rng.random() < 0.5:
                raw[128:132] = b"DICM"
            yield make(kind, bytes(raw))
            continue
        if kind == "byteflip" or not els:
            kind = "byteflip"
            header_end = max((e.value_off for e in els if e.tag == 0x7FE00010), default=len(buf))
            for _ in range(rng.choice([1, 2, 4, 16])):
                if header_end:
                    buf[rng.randrange(header_end)] = rng.randrange(256)
        yield make(kind, bytes(buf))
