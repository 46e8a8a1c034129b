"""Retain Safe Private (PS3.15 E.3.10): Table E.3.10-1, looked up by creator, group and element."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

__all__ = [
    "SAFE_PRIVATE_PIXEL_DATA",
    "SafePrivate",
    "safe_private_table",
    "vr_matches",
]

_TABLE = Path(__file__).resolve().parent.parent / "data" / "safe_private_2024e.json"

#: Entries of Table E.3.10-1 that hold pixel or raw acquisition data (identified by name and
#: VR). E.3.1 Note 4: Clean Pixel Data assumes private pixel data is removed, so these are kept
#: only when the caller says Clean Pixel Data has cleaned them (``private_pixels_cleaned``).
SAFE_PRIVATE_PIXEL_DATA: frozenset[tuple[str, int, int]] = frozenset(
    {
        ("Philips Imaging DD 001", 0x2001, 0x7D),  # Frame Pixel Data (OW/OB)
        ("Philips Imaging DD 001", 0x2001, 0xFF),  # Volume Pixel (OW/OB)
        ("Philips Imaging DD 097", 0x2001, 0x2F),  # Volume Mask Data (OB)
        ("Philips ST80i", 0x0025, 0x01),  # ST80i Stress Study file data (OW)
        ("HOLOGIC, Inc.", 0x7E01, 0x12),  # Codec Content: compressed images (OB)
        ("SIEMENS Ultrasound SC2000", 0x7FD1, 0x01),  # Acoustic Image and Footer Data (OB)
        ("SIEMENS Ultrasound SC2000", 0x7FD1, 0x10),  # Volume Payload (OB)
        ("SIEMENS Ultrasound SC2000", 0x7FD1, 0x11),  # After Payload (OB)
        ("SIEMENS SYNGO ULTRA-SOUND TOYON DATA STREAMING", 0x7FD1, 0x01),  # Padding (OB)
        ("SIEMENS SYNGO ULTRA-SOUND TOYON DATA STREAMING", 0x7FD1, 0x10),  # Volume Payload (OB)
        ("SIEMENS SYNGO ULTRA-SOUND TOYON DATA STREAMING", 0x7FD1, 0x11),  # After Payload (OB)
    }
)


class SafePrivate:
    """One row of Table E.3.10-1: a private attribute the standard lists as safe to keep."""

    __slots__ = ("creator", "element", "group", "name", "vm", "vr")

    def __init__(self, creator: str, group: int, element: int, vr: str, vm: str, name: str) -> None:
        self.creator = creator
        self.group = group
        #: the low byte of (gggg,xxee): the element within the creator's block
        self.element = element
        #: as the table writes it: "" for five SC2000 rows, "OW/OB" for two Philips rows
        self.vr = vr
        self.vm = vm
        self.name = name

    def __repr__(self) -> str:
        tag = f"({self.group:04X},xx{self.element:02X})"
        return f"SafePrivate({self.creator!r}, {tag}, {self.vr!r})"


def _load() -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads(_TABLE.read_text(encoding="utf-8"))
    return rows


@cache
def safe_private_table() -> dict[tuple[str, int, int], SafePrivate]:
    """Table E.3.10-1 keyed on (Private Creator value, group, element low byte).

    The creator is part of the key: 103 (group, element) pairs of the table occur under more
    than one creator. Creators compare exactly, as the table writes them (case included).
    """
    table: dict[tuple[str, int, int], SafePrivate] = {}
    for row in _load():
        entry = SafePrivate(
            row["creator"],
            int(row["group"], 16),
            int(row["element"], 16),
            row["vr"],
            row["vm"],
            row["name"],
        )
        table[entry.creator, entry.group, entry.element] = entry
    return table


def vr_matches(table_vr: str, vr: str) -> bool:
    """Whether an element encoded with ``vr`` can be the attribute the table lists.

    ``UN`` (implicit VR files, unknown private dictionaries) matches anything; an empty table
    VR matches anything; ``OW/OB`` matches either. Any other difference means the element is
    not what the table describes (a vendor reusing the block differently), so it is not kept.
    """
    if vr == "UN" or not table_vr or vr == table_vr:
        return True
    return vr in table_vr.split("/")
