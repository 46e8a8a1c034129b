"""Guards for pydicom's pixel decoding against malformed codestreams that would never return."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["guard_pixel_decoding"]

#: The JPEG 2000 file format's signature box (ISO/IEC 15444-1 Annex I), always 12 bytes long.
_JP2_SIGNATURE = b"\x00\x00\x00\x0c\x6a\x50\x20\x20"
_JP2_CODESTREAM_BOX = b"jp2c"
_LOCK = threading.Lock()


def _jp2_boxes_end(codestream: bytes) -> bool:
    """True if the boxes of a JP2 file walk to the codestream box or to the end of the data.

    pydicom adds each box's length to its position: a box of length 0 ("to the end of the
    file") or 1 (a 64-bit length follows) leaves it where it is, and it loops forever.
    """
    offset, total = 12, len(codestream)
    while offset < total:
        length = int.from_bytes(codestream[offset : offset + 4], "big")
        if codestream[offset + 4 : offset + 8] == _JP2_CODESTREAM_BOX:
            return True
        if length < 8:
            return False
        offset += length
    return True


def guard_pixel_decoding() -> None:
    """Make pydicom's frame parsing safe for a JP2 box of length 0 or 1 (idempotent).

    Such a frame is then read as having no JPEG 2000 parameters (pydicom's answer for data it
    cannot parse); the decoder refuses it with an error instead of the caller waiting forever.
    """
    from pydicom.pixels.decoders import base

    with _LOCK:
        original: Any = getattr(base, "get_j2k_parameters")  # noqa: B009 - not in its __all__
        if getattr(original, "_gateway_guarded", False):
            return

        def get_j2k_parameters(codestream: bytes) -> dict[str, Any]:
            if codestream.startswith(_JP2_SIGNATURE) and not _jp2_boxes_end(codestream):
                return {}
            result: dict[str, Any] = original(codestream)
            return result

        get_j2k_parameters._gateway_guarded = True  # type: ignore[attr-defined]
        setattr(base, "get_j2k_parameters", get_j2k_parameters)  # noqa: B010
