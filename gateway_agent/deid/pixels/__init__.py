"""Clean Pixel Data (PS3.15 E.3.1): the at-risk policy, and the engine that cleans burned-in text.

``policy`` decides which objects may show identity in their pixels (header only, on the hot
path), with ``signatures`` (CTP's device list: which objects, and the regions to paint). The
engine is imported only for objects at risk: ``detect`` (learned and classical text
detectors), ``codecs`` (frame decoding, black value, lossless re-encoding), ``verify`` (an
independent reader and the identity it must not find), ``identity`` (that identity from the
header), ``clean`` (per-object orchestration and audit) and ``preview`` (what an operator
reviews).
"""

from __future__ import annotations

from .policy import (
    CLEANABLE_MODALITIES,
    CLEANABLE_SOP_CLASSES,
    CONVERSION_TYPES,
    HEADER_TAGS,
    RISKY_MODALITIES,
    RISKY_SOP_CLASSES,
    SCREEN_IMAGE_TYPES,
    SCREEN_SERIES_DESCRIPTIONS,
    XRAY_SOP_CLASSES,
    burned_in_risk,
    header_risk,
    pixel_risk,
    screen_image_type,
    screen_series_description,
)

__all__ = [
    "CLEANABLE_MODALITIES",
    "CLEANABLE_SOP_CLASSES",
    "CONVERSION_TYPES",
    "HEADER_TAGS",
    "RISKY_MODALITIES",
    "RISKY_SOP_CLASSES",
    "SCREEN_IMAGE_TYPES",
    "SCREEN_SERIES_DESCRIPTIONS",
    "XRAY_SOP_CLASSES",
    "burned_in_risk",
    "header_risk",
    "pixel_risk",
    "screen_image_type",
    "screen_series_description",
]
