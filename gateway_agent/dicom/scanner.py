"""The scanner pseudonym in an object: its form, and the two places a gateway-agent writes it.

The pseudonym itself is keyed (``gateway_agent.deid.keys.Keys.scanner_pseudonym``); this module
only says what one looks like and where it is carried, for whoever reads objects (fleet QC).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SCANNER_PREFIX",
    "SCANNER_PRIVATE_CREATOR",
    "SCANNER_PRIVATE_GROUP",
    "is_scanner_pseudonym",
    "scanner_in_dataset",
]

#: Scanner pseudonyms are this prefix and 12 upper-case hex digits (48 bits of a keyed hash).
SCANNER_PREFIX = "SCN-"
#: Where the pseudonym travels when DeviceSerialNumber keeps its original value (Retain Device
#: Identity): element (0009,xx01), LO, of the private block with this creator.
SCANNER_PRIVATE_CREATOR = "GATEWAY_AGENT 1"
SCANNER_PRIVATE_GROUP = 0x0009
_HEX = frozenset("0123456789ABCDEF")


def is_scanner_pseudonym(value: str) -> bool:
    """Whether ``value`` has the form of a scanner pseudonym (``SCN-`` and 12 hex digits)."""
    value = value.strip()
    return (
        len(value) == 16 and value.startswith(SCANNER_PREFIX) and all(c in _HEX for c in value[4:])
    )


def scanner_in_dataset(ds: Any) -> str:
    """The scanner pseudonym a gateway-agent wrote into a pydicom Dataset; ``""`` if none.

    DeviceSerialNumber's replacement value, or under Retain Device Identity (which keeps the
    original serial number) the private element (0009,xx01) of the block
    :data:`SCANNER_PRIVATE_CREATOR`.
    """
    try:
        value = str(ds.private_block(SCANNER_PRIVATE_GROUP, SCANNER_PRIVATE_CREATOR)[0x01].value)
    except (KeyError, ValueError, TypeError, AttributeError):
        value = ""
    if is_scanner_pseudonym(value):
        return value.strip()
    serial = str(ds.get("DeviceSerialNumber", "") or "").strip()
    return serial if is_scanner_pseudonym(serial) else ""
