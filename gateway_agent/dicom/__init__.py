"""DICOM without pydicom on the hot path: header-only reads, raw element codec, atomic writes."""

from __future__ import annotations

from .codec import (
    DEFLATED,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Element,
    Encoding,
    decode_text,
    encode_dataset,
    encoding_for,
    parse_dataset,
    text_codec,
)
from .dictionary import is_known, keyword_of, name_of, vr_of
from .files import Header, PixelRange, SourceFile, atomic_write, fsync_dir, write_part10

__all__ = [
    "DEFLATED",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "Element",
    "Encoding",
    "Header",
    "PixelRange",
    "SourceFile",
    "atomic_write",
    "decode_text",
    "encode_dataset",
    "encoding_for",
    "fsync_dir",
    "is_known",
    "keyword_of",
    "name_of",
    "parse_dataset",
    "text_codec",
    "vr_of",
    "write_part10",
]
