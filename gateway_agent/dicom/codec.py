"""A lean DICOM element codec: parse a data set into elements (raw value bytes), encode it back."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .._exceptions import DeidError
from .dictionary import vr_of

__all__ = [
    "DEFLATED",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "Element",
    "Encoding",
    "PIXEL_TAGS",
    "decode_text",
    "encode_dataset",
    "encoding_for",
    "parse_dataset",
    "parse_items",
    "text_codec",
]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

#: Pixel Data, Float Pixel Data, Double Float Pixel Data: where a header-only read stops.
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})

#: VRs whose explicit encoding has a 2-byte reserved field and a 4-byte length.
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_VALID_VRS = frozenset(
    {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH", "SL"}
    | {"SS", "ST", "TM", "UI", "UL", "US"}
    | LONG_VRS
)

#: Explicit VR bytes -> (VR, has a 4-byte length).
_VR_INFO = {vr.encode(): (vr, vr in LONG_VRS) for vr in _VALID_VRS}
_HEAD = {
    (True, True): struct.Struct("<HHI"),  # implicit: group, element, length
    (True, False): struct.Struct(">HHI"),
    (False, True): struct.Struct("<HH2sH"),  # explicit: group, element, VR, short length
    (False, False): struct.Struct(">HH2sH"),
}

_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32


class Element:
    """One data element: ``value`` is the raw encoded bytes, or for a sequence a list of items."""

    __slots__ = ("tag", "undefined", "value", "vr")

    def __init__(
        self, tag: int, vr: str, value: bytes | list[list[Element]], undefined: bool = False
    ) -> None:
        self.tag = tag
        self.vr = vr
        self.value = value
        #: raw value is encapsulated pixel data written with undefined length
        self.undefined = undefined

    @property
    def items(self) -> list[list[Element]]:
        """The items of a sequence element (empty for any other element)."""
        return self.value if isinstance(self.value, list) else []

    @property
    def raw(self) -> bytes:
        """The raw value bytes of a non-sequence element (``b""`` for a sequence)."""
        return self.value if isinstance(self.value, bytes) else b""

    def __repr__(self) -> str:  # no values: reprs end up in tracebacks
        return f"Element({self.tag:08X}, {self.vr})"


class Encoding:
    """How a data set is encoded: VR implicit or explicit, byte order, deflated or not."""

    __slots__ = ("deflated", "encapsulated", "implicit", "little")

    def __init__(
        self, implicit: bool, little: bool, deflated: bool = False, encapsulated: bool = False
    ) -> None:
        self.implicit = implicit
        self.little = little
        self.deflated = deflated
        self.encapsulated = encapsulated

    def __repr__(self) -> str:
        return (
            f"Encoding(implicit={self.implicit}, little={self.little}, "
            f"deflated={self.deflated}, encapsulated={self.encapsulated})"
        )


_NATIVE = {
    IMPLICIT_LE: Encoding(True, True),
    EXPLICIT_LE: Encoding(False, True),
    EXPLICIT_BE: Encoding(False, False),
    DEFLATED: Encoding(False, True, deflated=True),
}
# Families whose pixel data is encapsulated (or absent); the data set itself is explicit LE.
_ENCAPSULATED_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.8.")
_ENCAPSULATED_EXACT = frozenset({"1.2.840.10008.1.2.1.98", "1.2.840.10008.1.2.5"})


def encoding_for(transfer_syntax: str) -> Encoding:
    """Encoding of a transfer syntax; ``DeidError("unsupported_transfer_syntax")`` if unknown."""
    enc = _NATIVE.get(transfer_syntax)
    if enc is not None:
        return enc
    if transfer_syntax in _ENCAPSULATED_EXACT or (
        transfer_syntax.startswith(_ENCAPSULATED_PREFIXES)
        and transfer_syntax.replace(".", "").isdigit()
    ):
        return Encoding(False, True, encapsulated=True)
    raise DeidError("unsupported_transfer_syntax", f"transfer syntax {transfer_syntax[:64]!r}")


class _Parser:
    """Parses from a bytes-like buffer (bytes or mmap) without copying values it skips."""

    def __init__(self, buf: bytes | memoryview | object, size: int) -> None:
        self.buf = buf
        self.size = size

    def need(self, end: int) -> None:
        if end > self.size:
            raise DeidError("truncated", "data set ends inside an element")

    def elements(
        self,
        pos: int,
        end: int,
        implicit: bool,
        little: bool,
        *,
        stop_at_pixels: bool = False,
        in_item: bool = False,
        depth: int = 0,
    ) -> tuple[list[Element], int]:
        """Parse elements from ``pos`` up to ``end`` (``-1``: undefined-length item).

        Returns the elements and the position after them (at Pixel Data when stopping there).
        """
        if depth > _MAX_DEPTH:
            raise DeidError("unreadable_header", "sequences nested too deep")
        buf = self.buf
        size = self.size
        head = _HEAD[implicit, little].unpack_from
        u32 = struct.Struct("<I" if little else ">I").unpack_from
        vr_info = _VR_INFO.get
        out: list[Element] = []
        append = out.append
        limit = size if end < 0 else end
        while pos < limit:
            if pos + 8 > size:
                raise DeidError("truncated", "data set ends inside an element header")
            if implicit:
                group, elem, length = head(buf, pos)  # type: ignore[arg-type]
                vrb = b""
            else:
                group, elem, vrb, length = head(buf, pos)  # type: ignore[arg-type]
            tag = group << 16 | elem
            if group == 0xFFFE:
                if tag == _ITEM_END:
                    if end < 0 and in_item:
                        return out, pos + 8
                    raise DeidError("unreadable_header", "unexpected item delimiter")
                raise DeidError("unreadable_header", f"unexpected item tag {tag:08X}")
            if implicit:
                vpos = pos + 8
                vr = vr_of(tag)
            else:
                info = vr_info(vrb)
                if info is None:
                    raise DeidError("unreadable_header", f"invalid VR at {tag:08X}")
                vr, long = info
                if long:
                    if pos + 12 > size:
                        raise DeidError("truncated", "data set ends inside an element header")
                    (length,) = u32(buf, pos + 8)  # type: ignore[arg-type]
                    vpos = pos + 12
                else:
                    vpos = pos + 8
            if stop_at_pixels and tag in PIXEL_TAGS:
                return out, pos
            if length == _UNDEFINED:
                if tag in PIXEL_TAGS:
                    # Encapsulated pixel data inside a fully parsed data set (deflated files).
                    stop = self.encapsulated_end(vpos, little)
                    raw = bytes(buf[vpos:stop])  # type: ignore[index]
                    append(Element(tag, "OB" if implicit else vr, raw, undefined=True))
                    pos = stop
                    continue
                if not (implicit or vr in ("SQ", "UN")):
                    raise DeidError("unreadable_header", f"undefined length for VR {vr}")
                # Items of an explicit-VR "UN" sequence are implicit VR little endian (PS3.5 6.2.2).
                as_implicit = implicit or vr == "UN"
                items, pos = self.items(
                    vpos, -1, as_implicit, True if as_implicit else little, depth
                )
                append(Element(tag, "SQ", items))
                continue
            stop = vpos + length
            if stop > size:
                raise DeidError("truncated", f"value of {tag:08X} runs past the end of the file")
            if vr == "SQ":
                items, _ = self.items(vpos, stop, implicit, little, depth)
                append(Element(tag, "SQ", items))
            elif vr == "UN" and length and not group & 1 and vr_of(tag) == "SQ":
                items, _ = self.items(vpos, stop, True, True, depth)
                append(Element(tag, "SQ", items))
            else:
                append(Element(tag, vr, bytes(buf[vpos:stop])))  # type: ignore[index]
            pos = stop
        if end < 0 and in_item:
            raise DeidError("truncated", "item has no delimiter")
        return out, pos

    def items(
        self, pos: int, end: int, implicit: bool, little: bool, depth: int
    ) -> tuple[list[list[Element]], int]:
        """Parse sequence items from ``pos`` to ``end`` (``-1``: up to the sequence delimiter)."""
        buf = self.buf
        size = self.size
        tag_fmt = struct.Struct("<HH" if little else ">HH").unpack_from
        u32 = struct.Struct("<I" if little else ">I").unpack_from
        items: list[list[Element]] = []
        while end < 0 or pos < end:
            if pos + 8 > size:
                raise DeidError("truncated", "data set ends inside a sequence")
            group, elem = tag_fmt(buf, pos)  # type: ignore[arg-type]
            tag = group << 16 | elem
            (length,) = u32(buf, pos + 4)  # type: ignore[arg-type]
            pos += 8
            if tag == _SEQ_END:
                if end >= 0:
                    raise DeidError("unreadable_header", "sequence delimiter in defined length")
                return items, pos
            if tag != _ITEM:
                raise DeidError("unreadable_header", f"expected an item, found {tag:08X}")
            if length == _UNDEFINED:
                elems, pos = self.elements(pos, -1, implicit, little, in_item=True, depth=depth + 1)
            else:
                if pos + length > size:
                    raise DeidError("truncated", "item runs past the end of the file")
                elems, pos = self.elements(pos, pos + length, implicit, little, depth=depth + 1)
            items.append(elems)
        return items, pos

    def encapsulated_end(self, pos: int, little: bool) -> int:
        """Walk the items of encapsulated pixel data from ``pos``; return the end offset."""
        tag_fmt = struct.Struct("<HH" if little else ">HH").unpack_from
        u32 = struct.Struct("<I" if little else ">I").unpack_from
        buf = self.buf
        size = self.size
        while True:
            if pos + 8 > size:
                raise DeidError("truncated", "encapsulated pixel data has no end")
            group, elem = tag_fmt(buf, pos)  # type: ignore[arg-type]
            (length,) = u32(buf, pos + 4)  # type: ignore[arg-type]
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQ_END:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise DeidError("unreadable_header", "malformed encapsulated pixel data")
            pos += length
            if pos > size:
                raise DeidError("truncated", "pixel data fragment runs past the end of the file")


def parse_dataset(
    buf: bytes | object,
    size: int,
    pos: int,
    implicit: bool,
    little: bool,
    *,
    stop_at_pixels: bool = False,
) -> tuple[list[Element], int]:
    """Parse a top-level data set from ``buf[pos:size]``.

    With ``stop_at_pixels`` the parse ends at the first pixel data element; the returned
    position is then its offset (``size`` when there is none).
    """
    return _Parser(buf, size).elements(pos, size, implicit, little, stop_at_pixels=stop_at_pixels)


def parse_items(raw: bytes) -> list[list[Element]]:
    """The items of a sequence whose value was kept as bytes (a ``UN`` element of defined
    length): implicit VR little endian, as PS3.5 6.2.2 encodes them. Raises DeidError."""
    items, _ = _Parser(raw, len(raw)).items(0, len(raw), True, True, 0)
    return items


def encapsulated_end(buf: bytes | object, size: int, pos: int, little: bool = True) -> int:
    """End offset of encapsulated pixel data items starting at ``pos``."""
    return _Parser(buf, size).encapsulated_end(pos, little)


def encode_dataset(elements: Sequence[Element], implicit: bool, little: bool) -> bytes:
    """Encode elements (in tag order) in the given encoding; sequences get undefined lengths."""
    out = bytearray()
    _encode(out, elements, implicit, _PACKERS[little])
    return bytes(out)


class _Packers:
    """Element header packers of one byte order (one ``pack`` call per element header)."""

    def __init__(self, order: str) -> None:
        self.implicit = struct.Struct(order + "HHI").pack  # group, element, length
        self.short = struct.Struct(order + "HH2sH").pack  # ... VR, 2-byte length
        self.long = struct.Struct(order + "HH2s2xI").pack  # ... VR, reserved, 4-byte length
        self.item_start = self.implicit(0xFFFE, 0xE000, _UNDEFINED)
        self.item_end = self.implicit(0xFFFE, 0xE00D, 0)
        self.seq_end = self.implicit(0xFFFE, 0xE0DD, 0)


_PACKERS = {True: _Packers("<"), False: _Packers(">")}


def _encode(out: bytearray, elements: Sequence[Element], implicit: bool, p: _Packers) -> None:
    pack_implicit = p.implicit
    pack_short = p.short
    pack_long = p.long
    for el in elements:
        tag = el.tag
        value = el.value
        if isinstance(value, list):
            if implicit:
                out += pack_implicit(tag >> 16, tag & 0xFFFF, _UNDEFINED)
            else:
                out += pack_long(tag >> 16, tag & 0xFFFF, b"SQ", _UNDEFINED)
            for item in value:
                out += p.item_start
                _encode(out, item, implicit, p)
                out += p.item_end
            out += p.seq_end
            continue
        n = _UNDEFINED if el.undefined else len(value)
        if implicit:
            out += pack_implicit(tag >> 16, tag & 0xFFFF, n)
        else:
            vr = el.vr
            if vr in LONG_VRS:
                out += pack_long(tag >> 16, tag & 0xFFFF, vr.encode(), n)
            elif n > 0xFFFF:  # too long for its VR (malformed input): keep the bytes as UN
                out += pack_long(tag >> 16, tag & 0xFFFF, b"UN", n)
            else:
                out += pack_short(tag >> 16, tag & 0xFFFF, vr.encode(), n)
        out += value


_CHARSETS = {
    "": "latin-1",
    "ISO_IR 6": "latin-1",
    "ISO_IR 100": "latin-1",
    "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4",
    "ISO_IR 144": "iso8859_5",
    "ISO_IR 127": "iso8859_6",
    "ISO_IR 126": "iso8859_7",
    "ISO_IR 138": "iso8859_8",
    "ISO_IR 148": "iso8859_9",
    "ISO_IR 203": "iso8859_15",
    "ISO_IR 166": "tis_620",
    "ISO_IR 192": "utf_8",
    "GB18030": "gb18030",
    "GBK": "gbk",
}


def text_codec(specific_character_set: bytes | None) -> str | None:
    """Python codec for a Specific Character Set value; None for ISO 2022 code extensions.

    Text we cannot re-encode faithfully (code extensions switching character sets) is never
    cleaned in place: callers replace it with a dummy instead.
    """
    if not specific_character_set:
        return "latin-1"
    terms = [t.strip() for t in specific_character_set.decode("latin-1").split("\\")]
    terms = [t for t in terms if t] or [""]
    if len(terms) > 1:
        return None
    return _CHARSETS.get(terms[0])


def decode_text(raw: bytes, codec: str | None) -> str:
    """Decode a text value (trailing padding removed); unknown code extensions decode as latin-1."""
    return raw.decode(codec or "latin-1", "replace").rstrip("\0 ")
