"""The runs of a 2-D boolean mask joined into 4-connected components (numpy alone, vectorised).

Shared by the pixel detectors (``deid.pixels.morph``) and the body mask (``imaging.numeric``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["connected_runs"]


def connected_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(row, start, end, root)`` of every run of ``mask``'s rows, in row-major order.

    A run covers ``mask[row, start:end]`` (``end`` exclusive). ``root`` is, per run, the index of
    the first run of its 4-connected component: two runs in adjacent rows that share a column
    are joined (union-find by hooking roots and pointer jumping).
    """
    m = np.asarray(mask, dtype=bool)
    cols = m.shape[1]
    edges = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    row, start = np.nonzero(edges == 1)
    _, end = np.nonzero(edges == -1)  # row-major order pairs ends with starts
    # Keys that sort runs by (row, column) across the whole image.
    width = cols + 2
    start_key, end_key = row * width + start, row * width + end
    # Runs of the next row overlapping run a: end_b > start_a and start_b < end_a.
    below = (row + 1) * width
    lo = np.searchsorted(end_key, below + start, side="right")
    hi = np.searchsorted(start_key, below + end, side="left")
    count = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(row.size), count)
    b = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo, count)
    root = np.arange(row.size)
    while True:
        ra, rb = root[a], root[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(root, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:  # pointer jumping: every run points at its root again
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped
    return row, start, end, root
