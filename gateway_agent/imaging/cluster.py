"""Intensity clustering of a windowed image (a visualisation) and the CT tissue map by HU ranges."""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

from .lut import frame_count, hu_from_dataset, is_hu, window_from_dataset
from .numeric import kmeans, silhouette_score

__all__ = [
    "SILHOUETTE_SAMPLE",
    "TISSUE_CLASSES",
    "cluster_scan",
    "dice_per_class",
    "kmeans_1d",
    "sampled_silhouette",
    "tissue_map",
]

#: Pixels drawn (fixed seed) for the silhouette; the exact score is quadratic in the pixel count.
SILHOUETTE_SAMPLE = 2000

#: CT tissue classes by physical HU range ``(name, low, high)``: ``low <= HU < high``.
TISSUE_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("air", -math.inf, -950.0),
    ("lung", -950.0, -200.0),
    ("fat", -200.0, -30.0),
    ("soft_tissue", -30.0, 300.0),
    ("bone", 300.0, math.inf),
)


def kmeans_1d(image: np.ndarray, n_clusters: int, *, seed: int = 0) -> np.ndarray:
    """k-means of a uint8 image's intensities; returns labels (uint8), 0 the darkest cluster.

    Runs on the 256-bin histogram with counts as sample weights: the same objective as k-means on
    every pixel, at a cost independent of image size. Deterministic for a given ``seed``.
    """
    if image.dtype != np.uint8:
        raise TypeError(f'Argument "image" must be uint8; got {image.dtype}')
    if n_clusters < 1:
        raise ValueError(f'Argument "n_clusters" must be >= 1; got {n_clusters}')
    counts = np.bincount(image.ravel(), minlength=256)
    levels = np.flatnonzero(counts)
    k = min(n_clusters, levels.size)
    if k <= 1:
        return np.zeros(image.shape, np.uint8)
    km = kmeans(
        levels.reshape(-1, 1).astype(np.float64),
        k,
        sample_weight=counts[levels].astype(np.float64),
        seed=seed,
    )
    centers = np.sort(km.centers.ravel())
    # Nearest sorted centre for each of the 256 grey levels: labels ordered darkest = 0.
    grey = np.arange(256, dtype=np.float64)
    lut = np.argmin(np.abs(grey[:, None] - centers[None, :]), axis=1).astype(np.uint8)
    out: np.ndarray = lut[image]
    return out


def sampled_silhouette(
    values: np.ndarray, labels: np.ndarray, *, sample_size: int = SILHOUETTE_SAMPLE, seed: int = 0
) -> float:
    """Silhouette of ``values`` (``(n,)`` or ``(n, d)``) and ``labels`` (``(n,)``) on a fixed-size
    random sample (fixed seed); NaN when undefined (fewer than two labels)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    y = np.asarray(labels).reshape(-1)
    if x.shape[0] != y.size:
        raise ValueError("values and labels must describe the same samples")
    if y.size > sample_size:
        idx = np.random.default_rng(seed).choice(y.size, size=sample_size, replace=False)
        x, y = x[idx], y[idx]
    n_labels = np.unique(y).size
    if n_labels < 2 or n_labels > y.size - 1:
        return math.nan
    return float(silhouette_score(x, y))


def cluster_scan(
    ds: Dataset,
    n_clusters: int = 3,
    preset: str | None = "soft_tissue",
    *,
    frame: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means on the windowed intensities of one image.

    This is a visualisation of grey-level groups, not a segmentation: use :func:`tissue_map`
    for physical HU classes.

    Parameters
    ----------
    ds
        A grayscale image dataset.
    n_clusters
        The number of clusters (at least 1).
    preset
        The window (:data:`WINDOW_PRESETS`, in HU): CT only; other images use their own window.
    frame
        The frame of a multi-frame image; default the middle one.
    seed
        The k-means seed: the same seed gives the same clusters.

    Returns
    -------
    windowed : numpy.ndarray
        The ``uint8`` image that was clustered.
    cluster_map : numpy.ndarray
        The label of each pixel (``uint8``, 0 = darkest cluster).
    silhouette : float
        The silhouette score on :data:`SILHOUETTE_SAMPLE` pixels (NaN when undefined).

    Raises
    ------
    ValueError
        Bad ``n_clusters``, ``preset`` or ``frame``.
    QCError
        The dataset has no grayscale pixel data that can be decoded.
    """
    if frame is None:
        frame = frame_count(ds) // 2
    windowed = window_from_dataset(ds, preset if is_hu(ds) else None, frame=frame)
    cluster_map = kmeans_1d(windowed, n_clusters, seed=seed)
    silhouette = sampled_silhouette(windowed.reshape(-1), cluster_map.reshape(-1), seed=seed)
    return windowed, cluster_map, silhouette


def tissue_map(hu: np.ndarray | Dataset, *, frame: int | None = None) -> np.ndarray:
    """Label each pixel by :data:`TISSUE_CLASSES` (0 air, 1 lung, 2 fat, 3 soft tissue, 4 bone).

    Parameters
    ----------
    hu
        An array of HU values, or a CT dataset.
    frame
        For a multi-frame dataset: the frame; default the middle one.

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels, the shape of the HU image.

    Raises
    ------
    ValueError
        ``hu`` is a dataset whose values are not HU (not CT).
    """
    if isinstance(hu, Dataset):
        if not is_hu(hu):
            raise ValueError("tissue_map needs CT (values in HU)")
        hu = hu_from_dataset(hu, frame=frame_count(hu) // 2 if frame is None else frame)
    edges = np.asarray([high for _name, _low, high in TISSUE_CLASSES[:-1]], dtype=np.float32)
    out: np.ndarray = np.digitize(hu, edges, right=False).astype(np.uint8)
    return out


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> list[float]:
    """Dice coefficient of each class label ``0..n_classes-1`` (1.0 when absent in both)."""
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {truth.shape}")
    scores = []
    for c in range(n_classes):
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        scores.append(1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return scores
