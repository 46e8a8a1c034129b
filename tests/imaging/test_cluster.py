"""Intensity clustering (order, determinism, sampled silhouette); CT tissue map vs ground truth."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway_agent.imaging import (
    TISSUE_CLASSES,
    cluster_scan,
    dice_per_class,
    kmeans_1d,
    sampled_silhouette,
    tissue_map,
)
from gateway_agent.synthetic import ct_phantom_hu, make_ct_slice

from ._images import image_dataset


def _three_levels() -> np.ndarray:
    img = np.full((60, 60), 200, np.uint8)
    img[:, :20] = 20
    img[:, 20:40] = 120
    return img


def test_labels_are_ordered_darkest_first() -> None:
    labels = kmeans_1d(_three_levels(), 3)
    assert set(np.unique(labels[:, :20])) == {0}
    assert set(np.unique(labels[:, 20:40])) == {1}
    assert set(np.unique(labels[:, 40:])) == {2}


def test_more_clusters_than_grey_levels_degrades_gracefully() -> None:
    labels = kmeans_1d(_three_levels(), 8)
    assert labels.max() == 2
    flat = kmeans_1d(np.full((8, 8), 7, np.uint8), 3)
    assert flat.max() == 0


def test_kmeans_needs_uint8() -> None:
    with pytest.raises(TypeError):
        kmeans_1d(np.zeros((4, 4), np.float32), 2)
    with pytest.raises(ValueError):
        kmeans_1d(np.zeros((4, 4), np.uint8), 0)


def test_cluster_scan_is_deterministic_and_ordered() -> None:
    ds = make_ct_slice(rows=128, cols=128, noise_sd=15)
    w1, m1, s1 = cluster_scan(ds, 3)
    _w2, m2, s2 = cluster_scan(ds, 3)
    np.testing.assert_array_equal(m1, m2)
    assert s1 == s2
    assert w1.dtype == np.uint8 and m1.dtype == np.uint8 and m1.shape == w1.shape
    means = [float(w1[m1 == c].mean()) for c in range(int(m1.max()) + 1)]
    assert means == sorted(means)
    assert 0.5 < s1 <= 1.0


def test_silhouette_uses_a_fixed_sample() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 1, 50_000), rng.normal(10, 1, 50_000)])
    labels = (values > 5).astype(np.int64)
    a = sampled_silhouette(values, labels, sample_size=500, seed=1)
    b = sampled_silhouette(values, labels, sample_size=500, seed=1)
    assert a == b and 0.8 < a < 1.0
    assert math.isnan(sampled_silhouette(values, np.zeros_like(labels)))


def test_cluster_scan_on_a_constant_image() -> None:
    ds = image_dataset(np.full((16, 16), 5, np.uint16))
    windowed, cluster_map, silhouette = cluster_scan(ds, 3)
    assert cluster_map.max() == 0 and math.isnan(silhouette)
    assert windowed.shape == (16, 16)


def test_cluster_scan_on_mr_uses_its_own_window() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    windowed, cluster_map, silhouette = cluster_scan(ds, 3)
    assert cluster_map.max() == 2 and windowed.std() > 10
    assert -1.0 <= silhouette <= 1.0


@pytest.mark.parametrize("noise_sd", [5.0, 12.0, 25.0])
def test_tissue_map_dice_against_phantom_ground_truth(noise_sd: float) -> None:
    ds = make_ct_slice(rows=256, cols=256, noise_sd=noise_sd, seed=7)
    _hu, truth = ct_phantom_hu(256, 256)
    scores = dice_per_class(tissue_map(ds), truth, len(TISSUE_CLASSES))
    assert min(scores) >= 0.95, dict(zip([c[0] for c in TISSUE_CLASSES], scores, strict=True))


def test_tissue_map_edges() -> None:
    hu = np.array([-1000, -951, -950, -201, -200, -31, -30, 299, 300, 3000], np.float32)
    np.testing.assert_array_equal(tissue_map(hu), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])


def test_tissue_map_needs_ct() -> None:
    with pytest.raises(ValueError, match="CT"):
        tissue_map(pydicom.dcmread(get_testdata_file("MR_small.dcm")))


def test_dice() -> None:
    a = np.array([0, 0, 1, 1])
    assert dice_per_class(a, a, 3) == [1.0, 1.0, 1.0]
    assert dice_per_class(a, np.array([0, 1, 1, 1]), 2) == [2 / 3, 0.8]
