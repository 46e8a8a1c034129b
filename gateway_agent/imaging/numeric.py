"""Numerical methods on numpy alone: k-means, silhouette, isolation forest, border regions.

The QC model needs each in one small form. Written here rather than taken from scikit-learn and
SciPy, which with their own copy of OpenBLAS would triple the size of the container image. The
tests check each against the scikit-learn / SciPy result on the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._runs import connected_runs

__all__ = [
    "KMeansResult",
    "border_connected",
    "isolation_scores",
    "kmeans",
    "silhouette_score",
]


@dataclass(frozen=True)
class KMeansResult:
    """``centers`` ``(k, d)``, ``labels`` ``(n,)`` int64, ``inertia`` (weighted sum of squares)."""

    centers: np.ndarray
    labels: np.ndarray
    inertia: float


def _sq_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(n, k)``, never negative."""
    d = (
        np.einsum("ij,ij->i", x, x)[:, None]
        - 2.0 * (x @ centers.T)
        + np.einsum("ij,ij->i", centers, centers)[None, :]
    )
    out: np.ndarray = np.maximum(d, 0.0)
    return out


def _kmeans_plus_plus(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; 2 + log k candidates per step)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]))
    first = rng.choice(n, p=w / w.sum())
    centers[0] = x[first]
    closest = _sq_dist(x, centers[:1])[:, 0]
    for c in range(1, k):
        weights = w * closest
        total = weights.sum()
        if total <= 0:  # fewer distinct points than clusters: repeat one
            centers[c:] = x[first]
            break
        candidates = rng.choice(n, size=trials, p=weights / total)
        dist = np.minimum(closest[None, :], _sq_dist(x, x[candidates]).T)
        best = int(np.argmin((dist * w[None, :]).sum(axis=1)))
        centers[c] = x[candidates[best]]
        closest = dist[best]
    return centers


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    sample_weight: np.ndarray | None = None,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
) -> KMeansResult:
    """Weighted k-means (Lloyd) from ``n_init`` k-means++ seedings; the lowest inertia wins.

    ``tol`` is relative to the mean feature variance, as in scikit-learn. Deterministic for a
    given ``seed``. A cluster that loses all its points keeps its centre.
    """
    data = np.asarray(x, dtype=np.float64)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    n = data.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of samples ({n}); got {k}")
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    limit = tol * float(np.mean(np.var(data, axis=0)))
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centers = _kmeans_plus_plus(data, w, k, rng)
        for _ in range(max_iter):
            labels = np.argmin(_sq_dist(data, centers), axis=1)
            mass = np.bincount(labels, weights=w, minlength=k)
            sums = np.zeros_like(centers)
            np.add.at(sums, labels, data * w[:, None])
            moved = np.where(mass[:, None] > 0, sums / np.maximum(mass, 1e-300)[:, None], centers)
            shift = float(((moved - centers) ** 2).sum())
            centers = moved
            if shift <= limit:
                break
        dist = _sq_dist(data, centers)
        labels = np.argmin(dist, axis=1)
        inertia = float((w * dist[np.arange(n), labels]).sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(centers, labels.astype(np.int64), inertia)
    assert best is not None
    return best


def silhouette_score(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean); a point alone in its cluster scores 0.

    Needs 2 <= number of labels <= n - 1. Quadratic in ``n``: sample large inputs first.
    """
    data = np.asarray(x, dtype=np.float64)
    if data.ndim == 1:
        data = data.reshape(-1, 1)
    _, y = np.unique(np.asarray(labels).reshape(-1), return_inverse=True)
    k = int(y.max()) + 1 if y.size else 0
    if not 2 <= k <= data.shape[0] - 1:
        raise ValueError(f"silhouette needs 2 to n-1 labels; got {k} for {data.shape[0]} samples")
    counts = np.bincount(y, minlength=k).astype(np.float64)
    sums = _distance_sums_1d(data[:, 0], y, k) if data.shape[1] == 1 else _distance_sums(data, y, k)
    own = counts[y] - 1.0
    a = np.divide(sums[np.arange(y.size), y], own, out=np.zeros(y.size), where=own > 0)
    means = sums / counts[None, :]
    means[np.arange(y.size), y] = np.inf
    b = means.min(axis=1)
    s = np.where(own > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


def _distance_sums(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """``(n, k)``: the sum of the Euclidean distances from each point to each cluster's points."""
    dist = np.sqrt(_sq_dist(x, x))
    np.fill_diagonal(dist, 0.0)
    onehot = np.zeros((y.size, k))
    onehot[np.arange(y.size), y] = 1.0
    out: np.ndarray = dist @ onehot
    return out


def _distance_sums_1d(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """:func:`_distance_sums` for one feature in O(k n log n): sorted values and prefix sums."""
    out = np.empty((x.size, k))
    for c in range(k):
        values = np.sort(x[y == c])
        prefix = np.concatenate([[0.0], np.cumsum(values)])
        below = np.searchsorted(values, x, side="left")  # values[:below] < x
        above = values.size - below
        out[:, c] = (below * x - prefix[below]) + (prefix[-1] - prefix[below] - above * x)
    return out


def _average_path(n: np.ndarray | float) -> np.ndarray:
    """c(n): the average path length of an unsuccessful search in a binary search tree of n."""
    size = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(size)
    out[size == 2] = 1.0
    big = size > 2
    m = size[big]
    out[big] = 2.0 * (np.log(m - 1.0) + np.euler_gamma) - 2.0 * (m - 1.0) / m
    return out


def _grow_forest(
    x: np.ndarray, n_trees: int, psi: int, limit: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All isolation trees at once, one level per step: per node feature, threshold, left and
    right child (-1 at leaves) and training size. Node ``t`` is the root of tree ``t``."""
    n, d = x.shape
    capacity = n_trees * (2 ** (limit + 1) - 1)
    feature = np.full(capacity, -1, np.int64)
    threshold = np.zeros(capacity)
    left = np.full(capacity, -1, np.int64)
    right = np.full(capacity, -1, np.int64)
    size = np.zeros(capacity, np.int64)
    size[:n_trees] = psi
    used = n_trees
    rows = np.concatenate([rng.choice(n, psi, replace=False) for _ in range(n_trees)])
    node = np.repeat(np.arange(n_trees), psi)  # the node each training row is in
    for _ in range(limit):
        nodes, inverse = np.unique(node, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        values = x[rows[order]]
        lo = np.minimum.reduceat(values, starts, axis=0)
        hi = np.maximum.reduceat(values, starts, axis=0)
        varying = hi > lo
        split = (counts > 1) & varying.any(axis=1)
        if not split.any():
            break
        # A random varying feature per node, and a uniform threshold within its range.
        pick = np.argmax(np.where(varying, rng.random((nodes.size, d)), -1.0), axis=1)
        k = np.arange(nodes.size)
        cut = lo[k, pick] + rng.random(nodes.size) * (hi[k, pick] - lo[k, pick])
        splitting = nodes[split]
        feature[splitting] = pick[split]
        threshold[splitting] = cut[split]
        left[splitting] = used + 2 * np.arange(splitting.size)
        right[splitting] = left[splitting] + 1
        used += 2 * splitting.size
        moving = split[inverse]  # rows whose node splits go one level down; the rest stay
        rows, node, inverse = rows[moving], node[moving], inverse[moving]
        goes_left = x[rows, pick[inverse]] < cut[inverse]
        node = np.where(goes_left, left[node], right[node])
        size[:used] += np.bincount(node, minlength=used)  # every row left is in a new node
    return feature[:used], threshold[:used], left[:used], right[:used], size[:used]


def isolation_scores(
    x: np.ndarray, *, n_estimators: int = 200, max_samples: int = 256, seed: int = 0
) -> np.ndarray:
    """Isolation forest (Liu, Ting & Zhou 2008) fitted on ``x`` and scored on ``x``.

    Returns the opposite of the anomaly score, ``-2 ** (-E[h(x)] / c(psi))``, as scikit-learn's
    ``IsolationForest.score_samples``: between -1 and 0, lower is more abnormal. Each tree grows
    on ``min(max_samples, n)`` rows drawn without replacement, to depth ``ceil(log2(psi))``,
    splitting a random non-constant feature at a uniform random value.
    """
    data = np.asarray(x, dtype=np.float64)
    n = data.shape[0]
    if n == 0:
        return np.zeros(0)
    psi = min(max_samples, n)
    limit = max(1, math.ceil(math.log2(max(psi, 2))))
    rng = np.random.default_rng(seed)
    feat, thr, left, right, size = _grow_forest(data, n_estimators, psi, limit, rng)
    depth_sum = np.zeros(n)
    column = np.arange(n)[None, :]
    for first in range(0, n_estimators, 25):  # 25 trees x n rows per step bounds the memory
        trees = np.arange(first, min(first + 25, n_estimators))
        node = np.repeat(trees[:, None], n, axis=1)
        depth = np.zeros(node.shape)
        for _ in range(limit):  # every row one level down per step; rows at a leaf stay
            inner = left[node] >= 0
            goes_left = data[column, np.maximum(feat[node], 0)] < thr[node]
            node = np.where(inner, np.where(goes_left, left[node], right[node]), node)
            depth += inner
        depth_sum += (depth + _average_path(size[node])).sum(axis=0)
    mean_depth = depth_sum / n_estimators
    norm = float(_average_path(float(psi)))
    # One training row: every depth is 0 and so is c(1); score it 2 ** -1, as scikit-learn does.
    ratio = mean_depth / norm if norm > 0 else np.ones(n)
    scores: np.ndarray = -np.power(2.0, -ratio)
    return scores


def border_connected(mask: np.ndarray) -> np.ndarray:
    """The pixels of a 2-D boolean ``mask`` 4-connected to the image border through the mask.

    Works on the runs of each row: two runs in adjacent rows that share a column are joined
    (union-find by hooking roots and pointer jumping, all vectorised), then every run whose
    component holds a run on the border is painted.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D; got {m.ndim} dimensions")
    rows, cols = m.shape
    if m.size == 0:
        return np.zeros_like(m)
    row, start, end, root = connected_runs(m)
    on_border = (row == 0) | (row == rows - 1) | (start == 0) | (end == cols)
    outside = np.zeros(row.size, bool)
    outside[root[on_border]] = True
    keep = outside[root]
    # Paint the kept runs: +1 at each start, -1 at each end, running sum along the row.
    paint = np.zeros((rows, cols + 1), np.int32)
    np.add.at(paint, (row[keep], start[keep]), 1)
    np.add.at(paint, (row[keep], end[keep]), -1)
    out: np.ndarray = np.cumsum(paint, axis=1)[:, :cols] > 0
    return out
