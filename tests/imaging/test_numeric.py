"""gateway_agent.imaging.numeric against the scikit-learn and SciPy implementations it replaces."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.ensemble import IsolationForest
from sklearn.metrics import silhouette_score as sk_silhouette

from gateway_agent.imaging.numeric import (
    border_connected,
    isolation_scores,
    kmeans,
    silhouette_score,
)


def blobs(seed: int, n: int = 300, d: int = 8, k: int = 3, spread: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 6, (k, d))
    return np.concatenate([c + rng.normal(0, spread, (n // k, d)) for c in centers])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_kmeans_inertia_matches_scikit_learn(seed: int, k: int) -> None:
    x = blobs(seed, spread=3.0)  # overlapping groups: the seeding matters
    ours = kmeans(x, k, n_init=10, seed=seed)
    ref = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.01
    assert ours.labels.shape == (x.shape[0],) and set(ours.labels.tolist()) == set(range(k))
    recomputed = ((x - ours.centers[ours.labels]) ** 2).sum()
    assert recomputed == pytest.approx(ours.inertia)


def test_kmeans_finds_separated_groups_exactly_and_deterministically() -> None:
    x = blobs(1, spread=0.5)
    a, b = kmeans(x, 3, seed=4), kmeans(x, 3, seed=4)
    assert np.array_equal(a.labels, b.labels)
    ref = KMeans(n_clusters=3, n_init=10, random_state=0).fit(x).labels_
    # The same partition, whatever the numbering.
    assert len({(int(p), int(q)) for p, q in zip(a.labels, ref, strict=True)}) == 3


def test_weighted_kmeans_equals_kmeans_on_repeated_points() -> None:
    # A 256-bin histogram with four peaks, as kmeans_1d clusters it.
    rng = np.random.default_rng(3)
    pixels = np.concatenate([rng.normal(m, 9, 4000) for m in (20, 90, 150, 230)])
    counts = np.bincount(np.clip(np.rint(pixels), 0, 255).astype(np.int64), minlength=256)
    levels = np.flatnonzero(counts).astype(np.float64)
    counts = counts[counts > 0].astype(np.float64)
    ours = kmeans(levels, 4, sample_weight=counts, seed=0)
    ref = KMeans(n_clusters=4, n_init=10, random_state=0).fit(
        levels.reshape(-1, 1), sample_weight=counts
    )
    assert ours.inertia <= ref.inertia_ * 1.01
    assert np.sort(ours.centers.ravel()) == pytest.approx(
        np.sort(ref.cluster_centers_.ravel()), abs=2.0
    )


def test_kmeans_with_fewer_distinct_points_than_clusters() -> None:
    x = np.array([[1.0], [1.0], [1.0], [5.0]])
    res = kmeans(x, 3)
    assert res.inertia == pytest.approx(0.0)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 5)


@pytest.mark.parametrize("seed", range(4))
def test_silhouette_equals_scikit_learn(seed: int) -> None:
    x = blobs(seed, n=240, spread=2.5)
    labels = np.random.default_rng(seed).integers(0, 4, x.shape[0])
    labels[:3] = 7  # a small cluster, and labels that are not 0..k-1
    labels[3] = 9  # a cluster of one point (silhouette 0 by convention)
    assert silhouette_score(x, labels) == pytest.approx(sk_silhouette(x, labels), abs=1e-10)
    good = KMeans(n_clusters=3, n_init=3, random_state=0).fit(x).labels_
    assert silhouette_score(x, good) == pytest.approx(sk_silhouette(x, good), abs=1e-10)
    with pytest.raises(ValueError, match="silhouette needs"):
        silhouette_score(x, np.zeros(x.shape[0]))


def test_isolation_scores_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    inliers = rng.normal(0, 1, (400, 8))
    outliers = rng.uniform(-8, 8, (12, 8))
    x = np.concatenate([inliers, outliers])
    ours = isolation_scores(x, seed=1)
    ref = IsolationForest(n_estimators=200, random_state=1).fit(x).score_samples(x)
    assert ours.shape == (412,) and ((ours < 0) & (ours > -1)).all()
    # Same scale (the mean depth is the same quantity) and the same ranking, up to forest noise.
    assert abs(float(ours.mean()) - float(ref.mean())) < 0.02
    assert np.corrcoef(np.argsort(np.argsort(ours)), np.argsort(np.argsort(ref)))[0, 1] > 0.9
    # Every planted outlier is among the 20 lowest scores.
    assert set(range(400, 412)) <= set(np.argsort(ours)[:20].tolist())
    assert np.array_equal(ours, isolation_scores(x, seed=1))


def test_isolation_scores_of_identical_rows_and_tiny_inputs() -> None:
    same = isolation_scores(np.ones((50, 3)))
    assert np.allclose(same, same[0])
    assert isolation_scores(np.zeros((0, 3))).shape == (0,)
    assert isolation_scores(np.array([[1.0, 2.0]])).shape == (1,)


def scipy_border_connected(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    touching = np.zeros(n + 1, bool)
    touching[border] = True
    touching[0] = False
    out: np.ndarray = touching[labels]
    return out


@pytest.mark.parametrize("seed", range(20))
def test_border_connected_equals_scipy_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 200)), int(rng.integers(1, 200)))
    mask = rng.random(shape) < rng.uniform(0.3, 0.7)  # around the percolation threshold
    assert np.array_equal(border_connected(mask), scipy_border_connected(mask))


def test_border_connected_on_a_body_with_holes() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    body = (yy - 32) ** 2 + (xx - 32) ** 2 < 28**2
    lung = (yy - 32) ** 2 + (xx - 22) ** 2 < 6**2
    background = ~body | lung
    outside = border_connected(background)
    assert outside[0, 0] and not outside[32, 22] and not outside[32, 32]
    assert np.array_equal(outside, ~body)
    assert np.array_equal(outside, scipy_border_connected(background))
    assert not border_connected(np.zeros((5, 5), bool)).any()
    assert border_connected(np.ones((5, 5), bool)).all()
    with pytest.raises(ValueError, match="2-D"):
        border_connected(np.ones((2, 2, 2), bool))


def test_silhouette_of_one_feature_with_ties_equals_scikit_learn() -> None:
    # cluster_scan's case: grey levels 0..255, many equal values (the 1-D path of the function).
    rng = np.random.default_rng(2)
    x = np.clip(np.concatenate([rng.normal(m, 12, 700) for m in (40, 120, 200)]), 0, 255).round()
    labels = np.digitize(x, [80.0, 160.0])
    ours = silhouette_score(x.reshape(-1, 1), labels)
    assert ours == pytest.approx(sk_silhouette(x.reshape(-1, 1), labels), abs=1e-9)
    assert silhouette_score(x, labels) == ours  # 1-D input is one feature
