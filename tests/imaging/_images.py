"""Small hand-built DICOM images for known-answer tests of the LUT maths."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid


def image_dataset(stored: np.ndarray, **attrs: Any) -> Dataset:
    """A grey image (one frame ``(rows, cols)`` or ``(frames, rows, cols)``) with ``attrs`` set."""
    signed = stored.dtype.kind == "i"
    arr = stored.astype(np.int16 if signed else np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds
