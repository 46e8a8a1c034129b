"""The numpy morphology of deid/pixels agrees with scipy.ndimage (a dev dependency only)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from gateway_agent.deid.pixels.morph import box_sum, components, max_filter, min_filter


@pytest.mark.parametrize("size", [1, 3, 5, (3, 11), (7, 1)])
def test_min_max_filters(size: int | tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    assert np.array_equal(max_filter(a, size), ndi.maximum_filter(a, size=size, mode="nearest"))
    assert np.array_equal(min_filter(a, size), ndi.minimum_filter(a, size=size, mode="nearest"))


def test_box_sum() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((41, 29)) < 0.4
    expected = ndi.correlate(a.astype(np.int64), np.ones((15, 15), np.int64), mode="constant")
    assert np.array_equal(box_sum(a, 15), expected)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.8])
def test_components_boxes_sizes_and_sums(density: float) -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((60, 80)) < density
    weights = rng.random((60, 80))
    found = components(mask)
    labels, count = ndi.label(mask)
    assert len(found) == count
    expected = {}
    for i, sl in enumerate(ndi.find_objects(labels), 1):
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        inside = labels == i
        expected[box, int(inside.sum())] = float(weights[inside].sum())
    got = {
        (tuple(b), int(n)): float(s)
        for b, n, s in zip(found.boxes.tolist(), found.sizes, found.sums(weights), strict=True)
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value)
