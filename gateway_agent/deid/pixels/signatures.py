"""Device signatures (RSNA CTP's DicomPixelAnonymizer list): fixed regions known to carry text."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ...dicom.codec import Element, decode_text
from ...dicom.dictionary import vr_of

__all__ = ["Signature", "load_signatures", "match_signature"]

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
    text = resources.files("gateway_agent").joinpath("data/pixel_signatures_ctp.json").read_text()
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

    def __init__(self, elements: list[Element], meta: list[Element], codec: str | None) -> None:
        self._elements = {e.tag: e for e in elements if isinstance(e.value, bytes)}
        self._elements.update({e.tag: e for e in meta})
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


def match_signature(
    elements: list[Element], meta: list[Element], codec: str | None
) -> Signature | None:
    """The first signature whose condition holds for this data set (CTP's rule), or None."""
    values = _Values(elements, meta, codec)
    for sig in load_signatures():
        if _test(sig.condition, values):
            return sig
    return None
