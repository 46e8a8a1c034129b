"""Image morphology on numpy alone: min/max filters, box sums, connected components as boxes.

What the detectors need, written here rather than taken from SciPy (which with its own OpenBLAS
would not fit the container image). ``tests/deid/test_pixels_morph.py`` compares each with
``scipy.ndimage`` on random images.
"""

from __future__ import annotations

import numpy as np

from ..._runs import connected_runs

__all__ = ["Components", "box_sum", "components", "max_filter", "min_filter"]


def _sliding(a: np.ndarray, size: int, axis: int, reduce: np.ufunc) -> np.ndarray:
    """``reduce`` (maximum or minimum) over a centred window of ``size`` along ``axis``; the
    image is extended by repeating its edge. An even size reaches one more pixel backwards."""
    if size <= 1:
        return a
    before, after = size // 2, (size - 1) // 2
    pad = [(0, 0)] * a.ndim
    pad[axis] = (before, after)
    padded = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = np.take(padded, range(0, n), axis=axis).copy()
    for k in range(1, size):
        reduce(out, np.take(padded, range(k, k + n), axis=axis), out=out)
    return out


def max_filter(a: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Maximum over a ``size`` (rows, columns) window around each pixel (separable)."""
    h, w = (size, size) if isinstance(size, int) else size
    return _sliding(_sliding(a, h, 0, np.maximum), w, 1, np.maximum)


def min_filter(a: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Minimum over a ``size`` (rows, columns) window around each pixel (separable)."""
    h, w = (size, size) if isinstance(size, int) else size
    return _sliding(_sliding(a, h, 0, np.minimum), w, 1, np.minimum)


def integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a leading zero row and column (int64)."""
    out = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(a, axis=0, dtype=np.int64), axis=1, out=out[1:, 1:])
    return out


def box_sum(a: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``a`` over a ``size`` x ``size`` window centred on each pixel (clipped at the
    edges: pixels outside the image count as 0)."""
    rows, cols = a.shape
    table = integral(a)
    half = size // 2
    y0 = np.clip(np.arange(rows) - half, 0, rows)
    y1 = np.clip(np.arange(rows) + size - half, 0, rows)
    x0 = np.clip(np.arange(cols) - half, 0, cols)
    x1 = np.clip(np.arange(cols) + size - half, 0, cols)
    out: np.ndarray = table[y1][:, x1] - table[y0][:, x1] - table[y1][:, x0] + table[y0][:, x0]
    return out


class Components:
    """4-connected components of a mask: per component its box and pixel count.

    ``boxes`` is ``(n, 4)``: ``x0, y0, x1, y1`` with exclusive ends; ``sizes`` ``(n,)``.
    :meth:`sums` adds up a weight image over each component.
    """

    def __init__(self, mask: np.ndarray) -> None:
        rows, cols = np.shape(mask)
        row, start, end, root = connected_runs(mask)
        self._row, self._start, self._end = row, start, end
        if row.size == 0:
            self.boxes = np.zeros((0, 4), np.int64)
            self.sizes = np.zeros(0, np.int64)
            self._label = np.zeros(0, np.int64)
            return
        roots, label = np.unique(root, return_inverse=True)
        n = roots.size
        self._label = label
        x0 = np.full(n, cols, np.int64)
        y0 = np.full(n, rows, np.int64)
        x1 = np.zeros(n, np.int64)
        y1 = np.zeros(n, np.int64)
        np.minimum.at(x0, label, start)
        np.minimum.at(y0, label, row)
        np.maximum.at(x1, label, end)
        np.maximum.at(y1, label, row + 1)
        self.boxes = np.stack([x0, y0, x1, y1], axis=1)
        self.sizes = np.bincount(label, weights=end - start, minlength=n).astype(np.int64)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def sums(self, weights: np.ndarray) -> np.ndarray:
        """The sum of ``weights`` (same shape as the mask) over each component (float64)."""
        if not len(self):
            return np.zeros(0)
        table = np.zeros((weights.shape[0], weights.shape[1] + 1), np.float64)
        np.cumsum(weights, axis=1, dtype=np.float64, out=table[:, 1:])
        run = table[self._row, self._end] - table[self._row, self._start]
        return np.bincount(self._label, weights=run, minlength=len(self))


def components(mask: np.ndarray) -> Components:
    """The 4-connected components of ``mask`` (see :class:`Components`)."""
    return Components(mask)
