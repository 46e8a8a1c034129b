"""Device signatures (RSNA CTP's DicomPixelAnonymizer list): fixed regions known to carry text.

:func:`match_signature` finds the signature of a whole data set (the regions Clean Pixel Data
paints); :func:`match_header` answers the same question from the few top-level elements the
burned-in policy looks up on every file, behind a pre-filter that rejects an ordinary
acquisition in a few microseconds.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ...dicom.codec import Element, decode_text
from ...dicom.dictionary import vr_of

__all__ = ["SIGNATURE_TAGS", "Signature", "load_signatures", "match_header", "match_signature"]

#: Every top-level attribute a signature tests, outside the File Meta group (the list names
#: ImplementationVersionName too; it is not in a data set's elements). Kept equal to the
#: packaged list by a test: the engine looks these up before its walk.
SIGNATURE_TAGS = frozenset(
    {
        0x00080008,  # ImageType
        0x00080060,  # Modality
        0x00080070,  # Manufacturer
        0x00080104,  # CodeMeaning (at the top level, as CTP reads it)
        0x0008103E,  # SeriesDescription
        0x00081090,  # ManufacturerModelName
        0x00181030,  # ProtocolName
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280301,  # BurnedInAnnotation
        0x00281051,  # WindowWidth
        0x00400310,  # CommentsOnRadiationDose
        0x60000022,  # OverlayDescription
    }
)

_FILE = Path(__file__).resolve().parent.parent.parent / "data" / "pixel_signatures_ctp.json"
_NUMERIC = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


@dataclass(frozen=True)
class Signature:
    """One CTP signature: its file position, label and regions ``(x, y, width, height)``."""

    index: int
    label: str
    condition: dict[str, Any]
    regions: tuple[tuple[int, int, int, int], ...]


@cache
def load_signatures() -> tuple[Signature, ...]:
    """The 52 signatures of the packaged ``pixel_signatures_ctp.json``, in file order."""
    text = _FILE.read_text(encoding="utf-8")
    data = json.loads(text)
    return tuple(
        Signature(
            index=s["index"],
            label=s["label"],
            condition=s["condition"],
            regions=tuple((r["x"], r["y"], r["width"], r["height"]) for r in s["regions"]),
        )
        for s in data["signatures"]
    )


def _tag(text: str) -> int:
    group, element = text.strip("()").split(",")
    return int(group, 16) << 16 | int(element, 16)


class _Values:
    """Top-level values as CTP compares them: strings, multiple values joined by ``\\``."""

    def __init__(self, elements: Mapping[int, Element], codec: str | None) -> None:
        self._elements = elements
        self._codec = codec
        self._little = True
        self._cache: dict[int, str] = {}

    def get(self, tag: int) -> str:
        found = self._cache.get(tag)
        if found is not None:
            return found
        el = self._elements.get(tag)
        value = "" if el is None else self._text(el)
        self._cache[tag] = value
        return value

    def __contains__(self, tag: int) -> bool:
        return tag in self._elements

    def _text(self, el: Element) -> str:
        vr = el.vr if el.vr != "UN" else vr_of(el.tag)
        raw = el.raw
        fmt = _NUMERIC.get(vr)
        if fmt is not None:
            size = struct.calcsize(fmt)
            if not raw or len(raw) % size:
                return ""
            values = struct.unpack("<" + fmt * (len(raw) // size), raw)
            return "\\".join(str(v) for v in values)
        return "\\".join(v.strip(" \0") for v in decode_text(raw, self._codec).split("\\"))


def _test(node: dict[str, Any], values: _Values) -> bool:
    op = node.get("op")
    if op == "and":
        return all(_test(a, values) for a in node["args"])
    if op == "or":
        return any(_test(a, values) for a in node["args"])
    if op == "not":
        args = node.get("args") or [node["arg"]]
        return not _test(args[0], values)
    value = values.get(_tag(node["tag"]))
    want: str = node["value"]
    operator: str = node["operator"]
    if operator.endswith("IgnoreCase"):
        value, want = value.lower(), want.lower()
        operator = operator.removesuffix("IgnoreCase")
    if operator == "equals":
        return value == want
    if operator == "contains":
        return want in value
    if operator == "startsWith":
        return value.startswith(want)
    if operator == "endsWith":
        return value.endswith(want)
    return False  # operators the list does not use (matches, isBlank...)


def _first(values: _Values) -> Signature | None:
    for sig in load_signatures():
        if _test(sig.condition, values):
            return sig
    return None


def match_signature(
    elements: list[Element], meta: list[Element], codec: str | None
) -> Signature | None:
    """The first signature whose condition holds for this data set (CTP's rule), or None."""
    found = {e.tag: e for e in elements if isinstance(e.value, bytes)}
    found.update({e.tag: e for e in meta})
    return _first(_Values(found, codec))


# -- the pre-filter ---------------------------------------------------------------------------
# Each signature is an "and" of tests; one of them (its anchor) must hold for it to match.
# The pre-filter tests every signature's anchor, grouped by attribute into one regular
# expression per attribute and case: when no anchor holds, no signature can match. Anchors are
# chosen to be false on ordinary acquisitions: a specific text or size before a manufacturer,
# a modality or a common value ("SECONDARY", "512").

_PATTERNS = {
    "equals": "^{}\\Z",
    "contains": "{}",
    "startsWith": "^{}",
    "endsWith": "{}\\Z",
}
_COMMON = frozenset({"original", "primary", "derived", "secondary", "axial", "256", "512", "1024"})
_BROAD_TAGS = frozenset({0x00080060, 0x00080070})  # Modality, Manufacturer


def _required(node: dict[str, Any]) -> list[dict[str, Any]]:
    """The tests that must all hold for ``node`` to hold (its "and" chain, flattened)."""
    if node.get("op") == "and":
        return [t for a in node["args"] for t in _required(a)]
    if "op" in node:
        return []  # or / not: no single test is required
    return [node]


def _breadth(test: dict[str, Any]) -> int:
    """How often ``test`` holds on an ordinary image, roughly (lower: a better anchor)."""
    if test["value"].lower() in _COMMON:
        return 2
    return 1 if _tag(test["tag"]) in _BROAD_TAGS else 0


@cache
def _anchors() -> tuple[tuple[int, re.Pattern[str] | None, re.Pattern[str] | None], ...] | None:
    """``(tag, case-insensitive pattern, case-sensitive pattern)`` per anchored attribute, or
    None when some signature has no usable anchor (the pre-filter then always passes)."""
    by_tag: dict[int, tuple[list[str], list[str]]] = {}
    for sig in load_signatures():
        usable = [
            t
            for t in _required(sig.condition)
            if t["value"] and t["operator"].removesuffix("IgnoreCase") in _PATTERNS
        ]
        if not usable:
            return None
        anchor = min(usable, key=_breadth)  # the first of the narrowest
        operator: str = anchor["operator"]
        folded = operator.endswith("IgnoreCase")
        want = anchor["value"].lower() if folded else anchor["value"]
        pattern = _PATTERNS[operator.removesuffix("IgnoreCase")].format(re.escape(want))
        by_tag.setdefault(_tag(anchor["tag"]), ([], []))[0 if folded else 1].append(pattern)
    return tuple(
        (
            tag,
            re.compile("|".join(dict.fromkeys(folded))) if folded else None,
            re.compile("|".join(dict.fromkeys(exact))) if exact else None,
        )
        for tag, (folded, exact) in sorted(by_tag.items())
    )


def _may_match(values: _Values) -> bool:
    anchors = _anchors()
    if anchors is None:
        return True
    for tag, folded, exact in anchors:
        if tag not in values:
            continue  # absent: the empty string, which no anchor (a non-empty value) accepts
        value = values.get(tag)
        if folded is not None and folded.search(value.lower()):
            return True
        if exact is not None and exact.search(value):
            return True
    return False


def match_header(top: Mapping[int, Element], codec: str | None) -> Signature | None:
    """:func:`match_signature` for the top-level elements ``top`` (tag to element; at least
    those of :data:`SIGNATURE_TAGS` present in the data set), behind the pre-filter."""
    values = _Values(top, codec)
    if not _may_match(values):
        return None
    return _first(values)
