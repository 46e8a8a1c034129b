"""Pixel codecs for cleaning: frame-by-frame decoding, the black value, display images, encoding.

Decoding goes through pydicom with the pylibjpeg plugins (native, RLE, JPEG baseline, extended
and lossless, JPEG-LS, JPEG 2000), one frame at a time. Output: native stays native, RLE stays
RLE, every other compressed input is re-encoded as JPEG-LS lossless (RLE when the JPEG-LS
encoder is missing), so nothing is compressed lossily again.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from ..._exceptions import DeidError, codec_panics
from ...dicom.decoding import guard_pixel_decoding

__all__ = [
    "LOSSY_METHOD",
    "NATIVE",
    "Layout",
    "black_value",
    "display_image",
    "encode_frame",
    "iter_frames",
    "layout_of",
    "output_syntax",
]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
_NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED})
#: Output syntaxes whose pixel data is written natively (not encapsulated).
NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE})
#: Compressed syntaxes pydicom can decode with the pylibjpeg plugins (and Pillow).
_DECODABLE = frozenset(
    {
        RLE,
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.57",  # JPEG lossless
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        JPEG_LS_LOSSLESS,
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
#: Lossy syntaxes -> Lossy Image Compression Method (PS3.3 C.7.6.1.1.5.1).
LOSSY_METHOD = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}
_SUPPORTED_PI = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "PALETTE COLOR",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "YBR_PARTIAL_420",
    }
)


@dataclass(frozen=True)
class Layout:
    """The Image Pixel module of the input (what the frames look like)."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    planar: int
    frames: int

    @property
    def colour(self) -> bool:
        """Three samples per pixel (RGB or YBR)."""
        return self.samples == 3

    @property
    def frame_pixels(self) -> int:
        """Pixels per frame."""
        return self.rows * self.columns

    @property
    def frame_bytes(self) -> int:
        """Bytes per native frame."""
        return self.frame_pixels * self.samples * self.bits_allocated // 8


def layout_of(ds: Any) -> Layout:
    """The :class:`Layout` of a pydicom data set; ``burned_in_undecodable`` if unusable."""
    try:
        layout = Layout(
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples=int(ds.get("SamplesPerPixel", 1) or 1),
            bits_allocated=int(ds.BitsAllocated),
            bits_stored=int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated),
            signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
            photometric=str(ds.get("PhotometricInterpretation", "")).strip().upper(),
            planar=int(ds.get("PlanarConfiguration", 0) or 0),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
        )
    except (AttributeError, TypeError, ValueError):
        raise DeidError("burned_in_undecodable", "incomplete Image Pixel module") from None
    if layout.rows <= 0 or layout.columns <= 0 or layout.frames <= 0:
        raise DeidError("burned_in_undecodable", "empty image")
    if layout.samples not in (1, 3) or layout.bits_allocated not in (8, 16):
        raise DeidError(
            "burned_in_undecodable",
            f"{layout.samples} samples of {layout.bits_allocated} bits are not supported",
        )
    if layout.photometric not in _SUPPORTED_PI:
        raise DeidError(
            "burned_in_undecodable", f"photometric interpretation {layout.photometric[:16]}"
        )
    return layout


def output_syntax(transfer_syntax: str, layout: Layout) -> tuple[str, str]:
    """(output transfer syntax, output photometric interpretation) for a cleaned object."""
    if transfer_syntax not in _NATIVE and transfer_syntax not in _DECODABLE:
        raise DeidError("burned_in_undecodable", f"transfer syntax {transfer_syntax[:64]}")
    # Colour frames are decoded to RGB (the only colour model every lossless syntax takes);
    # palette indices and grey values stay as they are.
    photometric = "RGB" if layout.colour else layout.photometric
    if transfer_syntax in _NATIVE:
        return transfer_syntax if transfer_syntax != DEFLATED else EXPLICIT_LE, photometric
    if transfer_syntax == RLE:
        return RLE, photometric
    # CharLS refuses some very small images (its output buffer); RLE takes any size.
    if layout.frame_pixels >= 64 * 64 and _encoder_available(JPEG_LS_LOSSLESS):
        return JPEG_LS_LOSSLESS, photometric
    return RLE, photometric


def _encoder_available(uid: str) -> bool:
    from pydicom.pixels.encoders.base import get_encoder

    try:
        return bool(get_encoder(uid).is_available)
    except (NotImplementedError, ValueError):
        return False


def iter_frames(source: BinaryIO | Any, layout: Layout) -> Iterator[np.ndarray]:
    """Decoded frames, one at a time: grey values, palette indices, or RGB (colour).

    ``source`` is the whole file (read frame by frame) or a pydicom Dataset.
    """
    import warnings

    from pydicom.pixels.utils import iter_pixels

    guard_pixel_decoding()
    try:
        with codec_panics():  # the frames are decoded while this generator runs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames = list(_frames_of(source)) if not hasattr(source, "read") else None
            for frame in frames if frames is not None else iter_pixels(source, as_rgb=True):
                if layout.colour and frame.ndim != 3:
                    raise DeidError("burned_in_undecodable", "decoded frame has the wrong shape")
                yield frame
    except DeidError:
        raise
    except Exception as exc:  # any decoder failure: the object cannot be cleaned
        raise DeidError(
            "burned_in_undecodable", f"decoding failed ({type(exc).__name__})"
        ) from None


def _frames_of(ds: Any) -> Iterator[np.ndarray]:
    """Frames of a whole in-memory Dataset (deflated inputs)."""
    from pydicom.pixels.utils import pixel_array

    array = pixel_array(ds, as_rgb=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        yield array
    else:
        yield from array


def black_value(layout: Layout, ds: Any) -> int | tuple[int, int, int]:
    """The stored value that displays black: min (MONOCHROME2), max (MONOCHROME1), the darkest
    palette entry (PALETTE COLOR), 0 in every channel (colour, decoded to RGB)."""
    if layout.colour:
        return (0, 0, 0)
    if layout.photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        first = _palette_first(ds)
        size = _palette_size(ds)
        indices = np.arange(
            first, first + size, dtype=np.uint16 if layout.bits_allocated > 8 else np.uint8
        )
        rgb = apply_color_lut(indices, ds).astype(np.float64)
        luma = rgb[:, 0] * 0.299 + rgb[:, 1] * 0.587 + rgb[:, 2] * 0.114
        return int(indices[int(np.argmin(luma))])
    bits = layout.bits_stored
    if layout.signed:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    return high if layout.photometric == "MONOCHROME1" else low


def _palette_first(ds: Any) -> int:
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    return int(desc[1]) if desc is not None and len(desc) > 1 else 0


def _palette_size(ds: Any) -> int:
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    size = int(desc[0]) if desc is not None and len(desc) > 0 else 256
    return size or 65536


def display_image(frame: np.ndarray, layout: Layout, ds: Any) -> np.ndarray:
    """An 8-bit image as a viewer would show it: RGB for colour and palette, else grey."""
    if layout.photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        rgb = apply_color_lut(frame, ds)
        if rgb.dtype != np.uint8:
            rgb = (rgb >> 8).astype(np.uint8)  # 16-bit palette entries
        return rgb
    if layout.colour:
        if frame.dtype == np.uint8:
            return frame
        top = max(1, int(frame.max()))
        return (frame.astype(np.float32) * (255.0 / top)).astype(np.uint8)
    if frame.dtype == np.uint8 and layout.photometric == "MONOCHROME2":
        return frame
    low, high = float(frame.min()), float(frame.max())
    scaled = (frame.astype(np.float32) - low) * (255.0 / max(high - low, 1.0))
    image = scaled.astype(np.uint8)
    return 255 - image if layout.photometric == "MONOCHROME1" else image


def paint(
    frame: np.ndarray, boxes: list[tuple[int, int, int, int]], value: int | tuple[int, int, int]
) -> int:
    """Set every box of ``frame`` to ``value`` in place; return the number of pixels painted."""
    if not boxes:
        return 0
    mask = np.zeros(frame.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    if frame.ndim == 3:
        frame[mask] = np.asarray(value, dtype=frame.dtype)
    else:
        frame[mask] = value
    return int(mask.sum())


def _native_bytes(frame: np.ndarray, layout: Layout) -> bytes:
    dtype = np.dtype(("<i" if layout.signed else "<u") + str(layout.bits_allocated // 8))
    data = frame.astype(dtype, copy=False)
    if layout.colour and layout.planar == 1:
        data = np.ascontiguousarray(data.transpose(2, 0, 1))
    return data.tobytes()


def encode_frame(frame: np.ndarray, layout: Layout, syntax: str, photometric: str) -> bytes:
    """One cleaned frame in the output syntax (native bytes, or one compressed frame)."""
    if syntax not in (RLE, JPEG_LS_LOSSLESS):
        return _native_bytes(frame, layout)
    from pydicom.pixels.encoders.base import get_encoder

    plugin = "pylibjpeg" if syntax == RLE else ""
    kwargs: dict[str, Any] = {
        "rows": layout.rows,
        "columns": layout.columns,
        "samples_per_pixel": layout.samples,
        "bits_allocated": layout.bits_allocated,
        "bits_stored": layout.bits_stored,
        "pixel_representation": int(layout.signed),
        "photometric_interpretation": photometric,
        "number_of_frames": 1,
        "planar_configuration": 0,
    }
    encoder = get_encoder(syntax)
    try:
        with codec_panics():
            try:
                return encoder.encode(frame, encoding_plugin=plugin, **kwargs)
            except (RuntimeError, ValueError):
                if not plugin:
                    raise
                return encoder.encode(frame, **kwargs)  # the fast RLE plugin is missing
    except (RuntimeError, ValueError) as exc:
        raise DeidError(
            "burned_in_undecodable", f"re-encoding failed ({type(exc).__name__})"
        ) from None


def encapsulated_element(frames: list[bytes]) -> bytes:
    """(7FE0,0010) OB with undefined length: Basic Offset Table, one fragment per frame."""
    offsets = []
    pos = 0
    fragments = []
    for data in frames:
        if len(data) % 2:
            data += b"\0"
        offsets.append(pos)
        fragments.append(struct.pack("<HHI", 0xFFFE, 0xE000, len(data)) + data)
        pos += 8 + len(data)
    table = b"".join(struct.pack("<I", o) for o in offsets) if len(frames) > 1 else b""
    head = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    bot = struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table
    end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return head + bot + b"".join(fragments) + end
