"""Fixtures shared by the DICOM networking tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway_agent.synthetic import make_ct_series


@pytest.fixture(scope="session")
def big_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A part-10 CT file of 512 frames of 256 by 256 (64 MiB of pixel data)."""
    frames, rows, cols = 512, 256, 256
    ds = make_ct_series(1, rows=rows, cols=cols)[0]
    ds.NumberOfFrames = frames
    ds.PixelData = np.zeros((frames, rows, cols), dtype=np.uint16).tobytes()
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
