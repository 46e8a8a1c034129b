"""Stored values to modality values (HU), and VOI windowing to 8-bit display per PS3.3 C.11."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array

from .._exceptions import CodecPanicError, QCError, codec_panics
from ..dicom.decoding import guard_pixel_decoding
from .presets import WINDOW_PRESETS

__all__ = [
    "WINDOW_PRESETS",
    "VOIFunction",
    "apply_window",
    "dataset_window",
    "frame_count",
    "hu_from_dataset",
    "is_hu",
    "modality_lut",
    "window_from_dataset",
]

_F32 = np.float32


class VOIFunction(StrEnum):
    """VOI LUT Function (0028,1056); PS3.3 C.11.2.1.2 and C.11.2.1.3."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


def frame_count(ds: Dataset) -> int:
    """Number of frames (``NumberOfFrames``, 1 when absent or empty)."""
    value = ds.get("NumberOfFrames", 1)
    try:
        return max(1, int(value or 1))
    except (TypeError, ValueError):
        return 1


def is_hu(ds: Dataset) -> bool:
    """True when modality values are Hounsfield units (CT, or RescaleType HU)."""
    if str(ds.get("RescaleType", "")).upper() == "HU":
        return True
    if str(ds.get("Modality", "")).upper() == "CT":
        return True
    sop = str(ds.get("SOPClassUID", ""))
    # CT Image Storage, Enhanced CT Image Storage, Legacy Converted Enhanced CT.
    return sop in {
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.2.2",
    }


def _frame_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The functional-group item ``sequence`` for ``frame``: per-frame first, then shared."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(groups)
        if seq is None or len(seq) <= index:
            continue
        inner = seq[index].get(sequence)
        if inner is not None and len(inner) > 0:
            item: Dataset = inner[0]
            return item
    return None


def _lut_table(item: Dataset, signed: bool) -> tuple[np.ndarray, int, int]:
    """``(table, first_mapped, bits)`` from an item with LUTDescriptor and LUTData."""
    desc = [int(v) for v in item.LUTDescriptor]
    entries = desc[0] or 65536
    first = desc[1]
    if signed and first >= 32768:
        first -= 65536
    bits = desc[2]
    data: Any = item.LUTData
    if isinstance(data, bytes | bytearray):
        table = np.frombuffer(bytes(data), dtype="<u2")
    elif isinstance(data, int):
        table = np.asarray([data], dtype=np.int64)
    else:
        table = np.asarray(list(data), dtype=np.int64)
    if table.size < entries:
        raise QCError(f"LUTData has {table.size} entries; LUTDescriptor says {entries}")
    return table[:entries].astype(_F32), first, bits


def _apply_table(values: np.ndarray, table: np.ndarray, first: int) -> np.ndarray:
    # Values below the first mapped value take the first entry, above the range the last (C.11.1.1).
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, table.size - 1)
    out: np.ndarray = table[index]
    return out


def modality_lut(stored: np.ndarray, ds: Dataset, *, frame: int = 0) -> np.ndarray:
    """Stored values to modality values (HU for CT) as float32.

    Order of precedence: the frame's Pixel Value Transformation (per-frame, then shared functional
    group), top-level Rescale Slope/Intercept, the Modality LUT Sequence; identity when none is set.
    """
    values = stored.astype(_F32, copy=False)
    item = _frame_item(ds, frame, "PixelValueTransformationSequence")
    source: Dataset = item if item is not None and "RescaleSlope" in item else ds
    if "RescaleSlope" in source or "RescaleIntercept" in source:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
        if slope == 1.0 and intercept == 0.0:
            return values
        result: np.ndarray = values * _F32(slope) + _F32(intercept)
        return result
    seq = ds.get("ModalityLUTSequence")
    if seq is not None and len(seq) > 0:
        table, first, _bits = _lut_table(seq[0], signed=int(ds.get("PixelRepresentation", 0)) == 1)
        return _apply_table(values, table, first)
    return values


def apply_window(
    values: np.ndarray,
    center: float,
    width: float,
    function: VOIFunction | str = VOIFunction.LINEAR,
    *,
    y_min: float = 0.0,
    y_max: float = 255.0,
) -> np.ndarray:
    """Apply a VOI window to modality values; float32 output in ``[y_min, y_max]``.

    Implements PS3.3 C.11.2.1.2.1 (LINEAR: ``((x - (c - 0.5)) / (w - 1) + 0.5)``, needs
    ``width >= 1``), C.11.2.1.3.2 (LINEAR_EXACT: ``(x - c) / w + 0.5``, ``width > 0``) and
    C.11.2.1.3.1 (SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``, ``width > 0``).

    Raises
    ------
    ValueError
        If ``width`` is outside the range the function allows or ``function`` is unknown.
    """
    func = VOIFunction(
        str(function.value if isinstance(function, VOIFunction) else function).upper()
    )
    c, w = float(center), float(width)
    span = _F32(y_max - y_min)
    x = values.astype(_F32, copy=False)
    if func is VOIFunction.LINEAR:
        if not w >= 1.0:
            raise ValueError(
                f'Argument "width" must be >= 1 for LINEAR (PS3.3 C.11.2.1.2.1); got {w}'
            )
        if w == 1.0:
            # The linear segment has zero length: a step at c - 0.5.
            return np.where(x <= _F32(c - 0.5), _F32(y_min), _F32(y_max)).astype(_F32)
        t = (x - _F32(c - 0.5)) / _F32(w - 1.0) + _F32(0.5)
    elif func is VOIFunction.LINEAR_EXACT:
        if not w > 0.0:
            raise ValueError(f'Argument "width" must be > 0 for LINEAR_EXACT; got {w}')
        t = (x - _F32(c)) / _F32(w) + _F32(0.5)
    else:
        if not w > 0.0:
            raise ValueError(f'Argument "width" must be > 0 for SIGMOID; got {w}')
        arg = np.clip(_F32(-4.0) * (x - _F32(c)) / _F32(w), -60.0, 60.0)
        out: np.ndarray = span / (_F32(1.0) + np.exp(arg)) + _F32(y_min)
        return out.astype(_F32, copy=False)
    result: np.ndarray = np.clip(t, 0.0, 1.0) * span + _F32(y_min)
    return result.astype(_F32, copy=False)


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)


def dataset_window(ds: Dataset, frame: int = 0) -> tuple[float, float, VOIFunction] | None:
    """The dataset's own window ``(center, width, function)`` for ``frame``, or None.

    The frame's VOI (per-frame, then shared functional group) wins over top-level attributes;
    of multi-valued Window Center/Width the first pair is used (C.11.2.1.2: the default).
    """
    item = _frame_item(ds, frame, "FrameVOILUTSequence")
    for source in (item, ds):
        if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
            continue
        try:
            center, width = _first(source.WindowCenter), _first(source.WindowWidth)
        except (TypeError, ValueError, IndexError):
            continue
        name = str(source.get("VOILUTFunction", "") or "LINEAR").upper()
        try:
            func = VOIFunction(name)
        except ValueError:
            func = VOIFunction.LINEAR
        if (func is VOIFunction.LINEAR and width < 1) or width <= 0 or not math.isfinite(center):
            continue
        return center, width, func
    return None


def _stored_frame(
    ds: Dataset, frame: int, source: str | os.PathLike[str] | None = None
) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise QCError("dataset has no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise QCError(f"windowing needs a grayscale image; SamplesPerPixel is {ds.SamplesPerPixel}")
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() not in {
        "MONOCHROME1",
        "MONOCHROME2",
    }:
        raise QCError(f"windowing needs MONOCHROME1/2, not {ds.PhotometricInterpretation}")
    guard_pixel_decoding()
    index = frame if frame_count(ds) > 1 else None
    arr: np.ndarray | None = None
    if source is not None:
        # The frame alone, from the file; should that fail, the data set is read below (not
        # after a codec's panic: the same bytes would make it panic again).
        try:
            with codec_panics():
                arr = pixel_array(source, index=index)
        except CodecPanicError:
            raise QCError("cannot decode pixel data (CodecPanicError)") from None
        except Exception:
            arr = None
    try:
        with codec_panics():
            if arr is None or arr.ndim != 2:
                arr = pixel_array(ds, index=index)
    except QCError:
        raise
    except Exception as exc:  # pydicom raises many types for unreadable pixel data
        raise QCError(f"cannot decode pixel data ({type(exc).__name__})") from None
    if arr.ndim != 2:
        raise QCError(f"expected a 2-D frame, got shape {arr.shape}")
    return arr


def _frames(ds: Dataset, frame: int | None) -> list[int]:
    n = frame_count(ds)
    if frame is None:
        return list(range(n))
    if not 0 <= frame < n:
        raise ValueError(f'Argument "frame" must be in [0, {n - 1}]; got {frame}')
    return [frame]


def hu_from_dataset(
    ds: Dataset, frame: int | None = None, *, source: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """Modality values of ``ds`` (HU for CT): the stored values through the modality LUT.

    Rescale Slope/Intercept or the Modality LUT Sequence, per frame for enhanced multi-frame
    objects.

    Parameters
    ----------
    ds
        A grayscale image dataset.
    frame
        The frame of a multi-frame image (0-based); all frames when None.
    source
        The file ``ds`` was read from (with its pixel data deferred or left out): each frame
        is read from it alone, so a large multi-frame object is never whole in memory.

    Returns
    -------
    numpy.ndarray
        ``float32`` of shape ``(rows, cols)``, or ``(frames, rows, cols)`` for a multi-frame
        dataset when ``frame`` is None.

    Raises
    ------
    ValueError
        ``frame`` is out of range.
    QCError
        The dataset has no grayscale pixel data that can be decoded.
    """
    frames = _frames(ds, frame)
    out = [modality_lut(_stored_frame(ds, i, source), ds, frame=i) for i in frames]
    if frame is not None or frame_count(ds) == 1:
        return out[0]
    return np.stack(out)


def _voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    seq = ds.get("VOILUTSequence")
    if seq is None or len(seq) == 0:
        return None
    table, first, bits = _lut_table(seq[0], signed=False)
    top = float(2 ** min(max(bits, 1), 16) - 1)
    out: np.ndarray = _apply_table(values, table, first) * _F32(255.0 / top)
    clipped: np.ndarray = np.clip(out, 0.0, 255.0)
    return clipped


def window_from_dataset(
    ds: Dataset,
    preset: str | None = None,
    *,
    center: float | None = None,
    width: float | None = None,
    function: VOIFunction | str | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """A display-ready uint8 image (0-255) of ``ds``.

    The window is, in order: ``center``/``width`` when both are given, the named ``preset``
    (:data:`WINDOW_PRESETS`, in HU), the dataset's own window (first of multi-valued Window
    Center/Width, its VOI LUT Function), its VOI LUT Sequence, else the frame's full value range.
    MONOCHROME1 images are inverted so that they display as intended. A multi-frame dataset gives
    ``(frames, rows, cols)`` (each frame with its own functional-group window) unless ``frame``
    selects one.

    Parameters
    ----------
    ds
        A grayscale image dataset (CT, MR, CR, DX, ...).
    preset
        A name of :data:`WINDOW_PRESETS` (centre and width in HU: meaningful for CT only).
    center, width
        An explicit window, in modality units; both or neither.
    function
        The VOI LUT function: ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.
    frame
        The frame of a multi-frame image (0-based); all frames when None.
    source
        The file ``ds`` was read from (with its pixel data deferred or left out): each frame
        is read from it alone, so a large multi-frame object is never whole in memory.

    Returns
    -------
    numpy.ndarray
        ``uint8`` of shape ``(rows, cols)``, or ``(frames, rows, cols)``.

    Raises
    ------
    ValueError
        Unknown preset, bad window or frame index.
    QCError
        The dataset has no grayscale pixel data that can be decoded.
    """
    if preset is not None and preset not in WINDOW_PRESETS:
        known = ", ".join(sorted(WINDOW_PRESETS))
        raise ValueError(f'Argument "preset" must be one of {known}; got {preset!r}')
    if (center is None) != (width is None):
        raise ValueError('Arguments "center" and "width" must be given together')
    invert = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    frames = _frames(ds, frame)
    out: list[np.ndarray] = []
    for i in frames:
        values = modality_lut(_stored_frame(ds, i), ds, frame=i)
        y: np.ndarray | None = None
        if center is not None and width is not None:
            y = apply_window(values, center, width, function or VOIFunction.LINEAR)
        elif preset is not None:
            c, w = WINDOW_PRESETS[preset]
            y = apply_window(values, c, w, function or VOIFunction.LINEAR)
        else:
            own = dataset_window(ds, i)
            if own is not None:
                y = apply_window(values, own[0], own[1], function or own[2])
            else:
                y = _voi_lut_sequence(values, ds)
            if y is None:
                lo, hi = float(values.min()), float(values.max())
                y = apply_window(
                    values, (lo + hi) / 2, max(hi - lo, 1e-6), VOIFunction.LINEAR_EXACT
                )
        img = np.rint(y).astype(np.uint8)
        if invert:
            img = np.uint8(255) - img
        out.append(img)
    if frame is not None or frame_count(ds) == 1:
        return out[0]
    return np.stack(out)
