"""Malformed DICOM inputs that make a compiled codec fail in ways Python code does not expect."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

#: Rows x Columns of the image; 16 bits, so two RLE segments of this many bytes each.
_PIXELS = 8 * 8


def _literal(data: bytes) -> bytes:
    return b"".join(
        bytes([len(data[i : i + 128]) - 1]) + data[i : i + 128] for i in range(0, len(data), 128)
    )


def overrunning_rle_frame() -> bytes:
    """A 16-bit RLE frame whose last segment runs one literal past the frame's end: pylibjpeg-rle
    panics on it (pyo3's ``PanicException``, a ``BaseException``) instead of raising an error."""
    first = _literal(bytes(_PIXELS))
    last = _literal(bytes(_PIXELS - 1)) + bytes([1]) + bytes(2)
    header = struct.pack("<16I", 2, 64, 64 + len(first), *([0] * 13))
    return header + first + last


def looping_jp2_frame() -> bytes:
    """A JPEG 2000 frame in the JP2 file format whose second box has length 0: pydicom's frame
    parser (``get_j2k_parameters``) adds 0 to its position and never returns."""
    signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    return signature + b"\x00\x00\x00\x00ftypjp2 " + bytes(64)


def write_overrunning_rle(path: Path, *, modality: str, burned_in: str | None = None) -> Path:
    """An 8x8 16-bit MONOCHROME2 image of ``modality``: its RLE pixel data makes the codec panic."""
    return _write(
        path, RLELossless, overrunning_rle_frame(), modality=modality, burned_in=burned_in
    )


def write_looping_jp2(path: Path, *, modality: str, burned_in: str | None = None) -> Path:
    """An 8x8 16-bit MONOCHROME2 image of ``modality`` whose JPEG 2000 frame pydicom loops on."""
    return _write(
        path, JPEG2000Lossless, looping_jp2_frame(), modality=modality, burned_in=burned_in
    )


def _write(path: Path, syntax: str, frame: bytes, *, modality: str, burned_in: str | None) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.7"
    )
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "PID-1", modality
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
