"""Per-image QC features (ScanFeatures) from a de-identified DICOM dataset; no PHI in any record."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from .._exceptions import QCError
from ..dicom.scanner import scanner_in_dataset
from ..imaging.lut import frame_count, hu_from_dataset, is_hu
from ..imaging.numeric import border_connected

__all__ = [
    "NUMERIC_FEATURES",
    "ScanFeatures",
    "features_from_dataset",
    "features_from_file",
    "scanner_of",
]

#: Image-derived features used by the fleet model (clusters, robust z-scores, isolation forest).
NUMERIC_FEATURES: tuple[str, ...] = (
    "avg_density",
    "contrast",
    "noise",
    "snr",
    "air_mean",
    "p05",
    "p50",
    "p95",
)

_NAN = math.nan
_NAN_FIELDS = frozenset({*NUMERIC_FEATURES, "body_fraction"})
# CT: body = connected to nothing outside, above this HU; homogeneous tissue between these.
_CT_BODY_HU = -500.0
_CT_TISSUE_HU = (-150.0, 250.0)
_CT_PADDING_HU = -1500.0  # below: outside the reconstruction circle / padding, not air


@dataclass
class ScanFeatures:
    """QC features of one image. Identifiers are the de-identified ones; nothing about the patient.

    Intensities are in HU when ``hu_calibrated`` (CT), otherwise in modality units. ``noise`` is
    a robust (MAD) estimate from neighbour differences in homogeneous tissue; ``snr`` is
    (tissue mean - air mean) / noise; ``air_mean`` the mean outside the body (about -1000 on CT).
    ``group``, ``outlier``, ``reasons`` and ``isolation_score`` are set by the fleet model.

    Attributes
    ----------
    file : str
        The image file, relative to the scanned folder (:attr:`filename`: its name).
    sop_instance_uid, series_instance_uid, modality, manufacturer, model, device : str
        From the (de-identified) header; ``device`` is the StationName (on de-identified
        objects the edge box's unit name).
    scanner : str
        The keyed scanner pseudonym the edge box wrote into the object (empty on objects that
        carry none); the fleet model groups by it (:attr:`scanner_label`).
    avg_density, contrast, noise, snr, air_mean, body_fraction : float
        The image features (NaN when not measurable).
    group : int
        The k-means group (-1 before the fleet model ran).
    outlier : bool
        Flagged by the fleet model, with ``reasons`` (``"noise high ..."``).
    """

    file: str
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    modality: str = ""
    manufacturer: str = ""
    model: str = ""
    device: str = ""
    scanner: str = ""
    timestamp: str | None = None
    deidentified: bool = False
    hu_calibrated: bool = False
    rows: int = 0
    cols: int = 0
    frames: int = 1
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None
    kvp: float | None = None
    exposure_mas: float | None = None
    tube_current_ma: float | None = None
    kernel: str = ""
    body_fraction: float = _NAN
    avg_density: float = _NAN
    contrast: float = _NAN
    noise: float = _NAN
    snr: float = _NAN
    air_mean: float = _NAN
    p05: float = _NAN
    p50: float = _NAN
    p95: float = _NAN
    group: int = -1
    outlier: bool = False
    reasons: list[str] = field(default_factory=list)
    isolation_score: float | None = None

    @property
    def filename(self) -> str:
        """The image file's name (``file`` is its path relative to the scanned folder)."""
        return Path(self.file).name

    @property
    def scanner_label(self) -> str:
        """What the fleet model groups by: the scanner pseudonym, else the StationName."""
        return self.scanner or self.device or "(unnamed)"

    @classmethod
    def field_names(cls) -> list[str]:
        """Column order for CSV output."""
        return [f.name for f in fields(cls)]

    def as_row(self) -> dict[str, Any]:
        """A flat dict (reasons joined with ``; ``; NaN as empty) for CSV."""
        row: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = "; ".join(value)
            elif isinstance(value, float) and math.isnan(value):
                value = ""
            elif isinstance(value, float):
                value = round(value, 4)
            row[f.name] = value
        return row

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanFeatures:
        """Inverse of :meth:`as_json` (unknown keys ignored, None back to NaN for measurements)."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                continue
            if value is None and name in _NAN_FIELDS:
                value = _NAN
            kwargs[name] = value
        if "reasons" in kwargs:
            kwargs["reasons"] = [str(r) for r in kwargs["reasons"] or []]
        return cls(**kwargs)

    def as_json(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN as None)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                value = None if math.isnan(value) else round(value, 4)
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def scanner_of(ds: Dataset) -> str:
    """The scanner pseudonym a gateway-agent wrote into ``ds``; ``""`` when it carries none.

    See :func:`gateway_agent.dicom.scanner.scanner_in_dataset`.
    """
    return scanner_in_dataset(ds)


def _timestamp(ds: Dataset) -> str | None:
    """ISO time of acquisition from the header (already date-shifted by de-identification)."""
    dt = _text(ds, "AcquisitionDateTime")
    candidates = [(dt[:8], dt[8:])] if len(dt) >= 8 else []
    for date_kw, time_kw in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("StudyDate", "StudyTime"),
    ):
        candidates.append((_text(ds, date_kw), _text(ds, time_kw)))
    for date, time in candidates:
        if len(date) != 8 or not date.isdigit():
            continue
        digits = "".join(ch for ch in time.split(".")[0] if ch.isdigit())[:6].ljust(6, "0")
        try:
            return datetime.strptime(date + digits, "%Y%m%d%H%M%S").isoformat()
        except ValueError:
            try:
                return datetime.strptime(date, "%Y%m%d").isoformat()
            except ValueError:
                continue
    return None


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold on a 256-bin histogram (background: values <= the threshold)."""
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return hi
    hist, edges = np.histogram(values, bins=256, range=(lo, hi))
    hist = hist.astype(np.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    # Class 0 is the histogram bins up to the best split: values below its upper edge.
    return float(edges[int(np.argmax(between)) + 1])


def _body_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels above ``threshold`` plus every hole in them (lungs, bowel gas): the body."""
    mask: np.ndarray = ~border_connected(image <= threshold)
    return mask


def _grouped_median(values: np.ndarray, quantum: float) -> float:
    """Median of non-negative values on a grid of step ``quantum``, interpolated within the bin.

    Integer-valued data (CT stored values) make a plain median jump in whole steps, which biases
    a MAD noise estimate by several percent at typical CT noise; interpolation removes that.
    """
    steps = np.rint(values / quantum).astype(np.int64)
    counts = np.bincount(steps)
    cum = np.cumsum(counts)
    half = values.size / 2.0
    k = int(np.searchsorted(cum, half))
    below = float(cum[k - 1]) if k > 0 else 0.0
    low, width = (k - 0.5, 1.0) if k > 0 else (0.0, 0.5)
    return (low + (half - below) / float(counts[k]) * width) * quantum


def _robust_noise(image: np.ndarray, tissue: np.ndarray, quantum: float | None) -> float:
    """Noise SD from horizontal and vertical neighbour differences inside ``tissue``.

    For independent noise of SD s, a difference of neighbours has SD s*sqrt(2); the median
    absolute difference (times 1.4826) estimates that SD and ignores the few edges in the mask.
    """
    dx = (image[:, 1:] - image[:, :-1])[tissue[:, 1:] & tissue[:, :-1]]
    dy = (image[1:, :] - image[:-1, :])[tissue[1:, :] & tissue[:-1, :]]
    diffs = np.abs(np.concatenate([dx, dy]))
    if diffs.size < 16:
        return _NAN
    probe = diffs[:256] / quantum if quantum else None
    if quantum and probe is not None and np.allclose(probe, np.rint(probe), atol=1e-3):
        median = _grouped_median(diffs, quantum)
    else:
        median = float(np.median(diffs))
    return median * 1.4826 / math.sqrt(2.0)


def _image_features(image: np.ndarray, hu: bool, quantum: float | None) -> dict[str, float]:
    finite = np.isfinite(image)
    if not finite.all():
        # Float pixel data may hold NaN/inf: treat them as the lowest finite value (background).
        fill = float(image[finite].min()) if finite.any() else 0.0
        image = np.where(finite, image, np.float32(fill)).astype(np.float32)
    out = dict.fromkeys(NUMERIC_FEATURES, _NAN)
    out["body_fraction"] = 0.0
    threshold = _CT_BODY_HU if hu else _otsu(image)
    body = _body_mask(image, threshold)
    if not body.any():
        return out
    values = image[body]
    out["body_fraction"] = float(values.size / image.size)
    out["avg_density"] = float(values.mean(dtype=np.float64))
    out["contrast"] = float(values.std(dtype=np.float64))
    p05, p50, p95 = np.percentile(values, [5.0, 50.0, 95.0])
    out["p05"], out["p50"], out["p95"] = float(p05), float(p50), float(p95)
    air = ~body
    if hu:
        air &= image >= _CT_PADDING_HU
        lo, hi = _CT_TISSUE_HU
        tissue = body & (image >= lo) & (image <= hi)
    else:
        tissue = body
    if air.any():
        out["air_mean"] = float(image[air].mean(dtype=np.float64))
    noise = _robust_noise(image, tissue, quantum)
    out["noise"] = noise
    if tissue.any() and noise > 0:
        signal = float(image[tissue].mean(dtype=np.float64))
        reference = out["air_mean"] if not math.isnan(out["air_mean"]) else 0.0
        out["snr"] = (signal - reference) / noise
    return out


def _quantum(ds: Dataset) -> float | None:
    """Step between adjacent modality values when the LUT is linear (|RescaleSlope|), else None."""
    if "ModalityLUTSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds:
        return None
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return None
    slope = _number(ds, "RescaleSlope")
    return abs(slope) if slope else 1.0


def features_from_dataset(
    ds: Dataset, file: str = "", *, source: str | os.PathLike[str] | None = None
) -> ScanFeatures:
    """Features of one image (the middle frame of a multi-frame dataset).

    Works without Modality, without rescale attributes (identity LUT) and on tiny images.
    ``source``: the file ``ds`` was read from, with its pixel data deferred; only the frame
    measured is read from it.

    Raises
    ------
    QCError
        The dataset has no grayscale pixel data that can be decoded.
    """
    frames = frame_count(ds)
    hu = is_hu(ds)
    image = hu_from_dataset(ds, frame=frames // 2, source=source)
    spacing = _number(ds, "PixelSpacing")
    if spacing is None:
        spacing = _number(ds, "ImagerPixelSpacing")
    exposure = _number(ds, "Exposure")
    if exposure is None:
        exposure = _number(ds, "ExposureInmAs")
    record = ScanFeatures(
        file=file,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        manufacturer=_text(ds, "Manufacturer"),
        model=_text(ds, "ManufacturerModelName"),
        device=_text(ds, "StationName"),
        scanner=scanner_of(ds),
        timestamp=_timestamp(ds),
        deidentified=_text(ds, "PatientIdentityRemoved").upper() == "YES",
        hu_calibrated=hu,
        rows=int(image.shape[0]),
        cols=int(image.shape[1]),
        frames=frames,
        pixel_spacing_mm=spacing,
        slice_thickness_mm=_number(ds, "SliceThickness"),
        kvp=_number(ds, "KVP"),
        exposure_mas=exposure,
        tube_current_ma=_number(ds, "XRayTubeCurrent"),
        kernel=_text(ds, "ConvolutionKernel"),
    )
    for name, value in _image_features(image, hu, _quantum(ds)).items():
        setattr(record, name, value)
    return record


#: Element values larger than this are left on disk by ``features_from_file`` until used ...
_DEFER_BYTES = 1 << 20
#: ... and pixel data this large are read one frame at a time.
_FRAMEWISE_BYTES = 32 << 20


def features_from_file(path: Path, *, root: Path | None = None) -> ScanFeatures:
    """Read ``path`` and compute its features; ``file`` is the path relative to ``root``.

    Raises
    ------
    QCError
        Not a readable DICOM image (the message names no file).
    """
    try:
        # The pixel data stay on disk (deferred): the frame measured is read alone.
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_BYTES)
    except Exception as exc:  # pydicom raises many types for malformed input
        raise QCError(f"unreadable DICOM ({type(exc).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise QCError("no pixel data")
    # Large pixel data are read frame by frame from the file; small ones through the data set
    # (which also copes with a meta that misstates the body's encoding).
    source: Path | None = None
    pixels = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    length = getattr(pixels, "length", 0) or 0
    meta = getattr(ds, "file_meta", Dataset())
    if "TransferSyntaxUID" in meta and (length >= _FRAMEWISE_BYTES or length == 0xFFFFFFFF):
        source = path
        # Files without meta (raw datasets) are implicit VR little endian by default.
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    name = str(path.relative_to(root)) if root is not None else path.name
    try:
        return features_from_dataset(ds, file=name, source=source)
    except QCError:
        raise
    except Exception as exc:  # malformed attributes (e.g. a non-numeric RescaleSlope)
        raise QCError(f"cannot measure ({type(exc).__name__})") from None
