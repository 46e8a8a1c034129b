"""QC on a large multi-frame object reads the frame it measures, never the whole pixel data."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from gateway_agent.qc.features import features_from_file
from tests.reliability._accidents import multiframe_file


def test_features_of_a_large_multiframe_read_one_frame(tmp_path: Path) -> None:
    path = tmp_path / "big.dcm"
    multiframe_file(path, 96)  # 192 frames of 512 x 512 x 16 bits
    tracemalloc.start()
    try:
        record = features_from_file(path)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record.frames == 192 and (record.rows, record.cols) == (512, 512)
    # One frame is 0.5 MB (a few float copies of it while measuring); the object is 96 MB.
    assert peak < 24 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB"
