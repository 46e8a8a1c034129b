"""Known answers for the modality LUT and VOI windowing (PS3.3 C.11.1, C.11.2.1.2, C.11.2.1.3)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway_agent._exceptions import QCError
from gateway_agent.imaging import (
    WINDOW_PRESETS,
    VOIFunction,
    apply_window,
    dataset_window,
    hu_from_dataset,
    modality_lut,
    window_from_dataset,
)
from gateway_agent.synthetic import make_ct_slice

from ._images import image_dataset


def test_linear_matches_the_standard_formula() -> None:
    c, w = 40.0, 400.0
    x = np.array([-1000, -160, -159, 40, 238, 239, 240, 3000], np.float32)
    y = apply_window(x, c, w, "LINEAR")
    expected = [
        0.0,
        0.0,  # x <= c - 0.5 - (w-1)/2 = -160
        ((-159 - 39.5) / 399 + 0.5) * 255,
        ((40 - 39.5) / 399 + 0.5) * 255,
        ((238 - 39.5) / 399 + 0.5) * 255,
        255.0,  # x > c - 0.5 + (w-1)/2 = 239 reaches the top
        255.0,
        255.0,
    ]
    np.testing.assert_allclose(y, expected, atol=1e-3)


def test_linear_width_one_is_a_step_at_c_minus_half() -> None:
    y = apply_window(np.array([9.0, 9.5, 9.6, 10.0], np.float32), 10, 1, VOIFunction.LINEAR)
    np.testing.assert_array_equal(y, [0, 0, 255, 255])


def test_linear_exact() -> None:
    x = np.array([-60, -50, 0, 25, 50, 60], np.float32)
    y = apply_window(x, 0, 100, "LINEAR_EXACT")
    np.testing.assert_allclose(y, [0, 0, 127.5, 191.25, 255, 255], atol=1e-3)


def test_sigmoid() -> None:
    c, w = 100.0, 80.0
    x = np.array([c, c + w / 4, c - w / 4, c + 10 * w, c - 10 * w], np.float32)
    y = apply_window(x, c, w, "sigmoid")
    top = 255 / (1 + math.exp(-1.0))
    np.testing.assert_allclose(y, [127.5, top, 255 - top, 255, 0], atol=1e-3)


def test_output_range_is_configurable() -> None:
    y = apply_window(
        np.array([-10.0, 0.0, 10.0], np.float32), 0, 20, "LINEAR_EXACT", y_min=-1, y_max=1
    )
    np.testing.assert_allclose(y, [-1, 0, 1])


@pytest.mark.parametrize(
    ("function", "width"), [("LINEAR", 0.5), ("LINEAR_EXACT", 0.0), ("SIGMOID", -1.0)]
)
def test_bad_width_is_refused(function: str, width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        apply_window(np.zeros(3, np.float32), 0, width, function)


def test_unknown_function_is_refused() -> None:
    with pytest.raises(ValueError):
        apply_window(np.zeros(3, np.float32), 0, 10, "GAMMA")


def test_rescale_slope_and_intercept() -> None:
    ds = image_dataset(
        np.array([[0, 1000], [1024, 4095]]), RescaleSlope="2", RescaleIntercept="-1024"
    )
    np.testing.assert_array_equal(hu_from_dataset(ds), [[-1024, 976], [1024, 7166]])


def test_identity_without_rescale() -> None:
    stored = np.array([[0, 7], [300, 65535]], np.uint16)
    out = hu_from_dataset(image_dataset(stored))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, stored)


def test_modality_lut_sequence() -> None:
    item = Dataset()
    item.LUTDescriptor = [4, 10, 16]
    item.LUTData = [100, 200, 300, 400]
    item.ModalityLUTType = "HU"
    stored = np.array([[5, 10, 11], [13, 20, 12]], np.uint16)
    ds = image_dataset(stored, ModalityLUTSequence=Sequence([item]))
    out = modality_lut(stored, ds)
    # Below the first mapped value: first entry; beyond the table: last entry (C.11.1.1).
    np.testing.assert_array_equal(out, [[100, 100, 200], [400, 400, 300]])


def test_dataset_window_takes_the_first_of_multiple_values() -> None:
    ds = image_dataset(
        np.zeros((2, 2), np.uint16), WindowCenter=["40", "400"], WindowWidth=["400", "2000"]
    )
    assert dataset_window(ds) == (40.0, 400.0, VOIFunction.LINEAR)


def test_dataset_sigmoid_function_is_used() -> None:
    stored = np.array([[100, 120]], np.uint16)
    ds = image_dataset(stored, WindowCenter="100", WindowWidth="80", VOILUTFunction="SIGMOID")
    np.testing.assert_array_equal(window_from_dataset(ds), [[128, 186]])


def test_monochrome1_is_inverted() -> None:
    stored = np.array([[0, 50, 100]], np.uint16)
    mono2 = window_from_dataset(image_dataset(stored, WindowCenter="50", WindowWidth="101"))
    mono1 = window_from_dataset(
        image_dataset(
            stored, WindowCenter="50", WindowWidth="101", PhotometricInterpretation="MONOCHROME1"
        )
    )
    # LINEAR: ((x - 49.5) / 100 + 0.5) * 255 -> 1.3, 128.8, 255.
    np.testing.assert_array_equal(mono2, [[1, 129, 255]])
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_no_window_uses_the_full_range() -> None:
    out = window_from_dataset(image_dataset(np.array([[10, 20, 30]], np.uint16)))
    np.testing.assert_array_equal(out, [[0, 128, 255]])


def test_explicit_window_overrides_the_dataset() -> None:
    ds = image_dataset(np.array([[0, 100]], np.uint16), WindowCenter="0", WindowWidth="10")
    np.testing.assert_array_equal(
        window_from_dataset(ds, center=50, width=100, function="LINEAR_EXACT"), [[0, 255]]
    )
    with pytest.raises(ValueError, match="together"):
        window_from_dataset(ds, center=50)


def _frame_item(slope: float, intercept: float, center: float, width: float) -> Dataset:
    pvt, voi, item = Dataset(), Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = str(slope), str(intercept), "US"
    voi.WindowCenter, voi.WindowWidth = str(center), str(width)
    item.PixelValueTransformationSequence = Sequence([pvt])
    item.FrameVOILUTSequence = Sequence([voi])
    return item


def test_multiframe_frame_by_frame_with_functional_groups() -> None:
    stored = np.stack([np.full((2, 3), v, np.uint16) for v in (10, 20, 30)])
    ds = image_dataset(stored)
    # Frame 0: 10 -> ((10 - 9.5) / 19 + 0.5) * 255 = 134; frame 1: 20*2 = 40 (window 0/20 -> top);
    # frame 2: 30 - 100 = -70 (window 0/20 -> bottom).
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_frame_item(1, 0, 10, 20), _frame_item(2, 0, 0, 20), _frame_item(1, -100, 0, 20)]
    )
    out = window_from_dataset(ds)
    assert out.shape == (3, 2, 3)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 134 and out[1, 0, 0] == 255 and out[2, 0, 0] == 0
    np.testing.assert_array_equal(hu_from_dataset(ds)[:, 0, 0], [10, 40, -70])
    np.testing.assert_array_equal(window_from_dataset(ds, frame=1), out[1])
    with pytest.raises(ValueError, match="frame"):
        window_from_dataset(ds, frame=3)


def test_shared_functional_group_applies_to_every_frame() -> None:
    stored = np.stack([np.full((2, 2), v, np.uint16) for v in (1, 2)])
    ds = image_dataset(stored)
    ds.SharedFunctionalGroupsSequence = Sequence([_frame_item(10, 5, 0, 1000)])
    np.testing.assert_array_equal(hu_from_dataset(ds)[:, 0, 0], [15, 25])


def test_presets() -> None:
    required = {
        "brain",
        "subdural",
        "stroke",
        "soft_tissue",
        "mediastinum",
        "lung",
        "liver",
        "bone",
    }
    assert required <= set(WINDOW_PRESETS)
    for name, (center, width) in WINDOW_PRESETS.items():
        assert width >= 1, name
        assert -1000 <= center <= 1000, name
    assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
    assert WINDOW_PRESETS["brain"] == (40.0, 80.0)


def test_presets_on_synthetic_ct() -> None:
    ds = make_ct_slice(rows=64, cols=64, noise_sd=0.0)
    for name in WINDOW_PRESETS:
        out = window_from_dataset(ds, name)
        assert out.shape == (64, 64) and out.dtype == np.uint8
    brain = window_from_dataset(ds, "brain")
    assert brain[32, 32] == 129  # +40 HU: ((40 - 39.5) / 79 + 0.5) * 255
    assert brain[0, 0] == 0  # air
    lung = window_from_dataset(ds, "lung")
    assert 0 < lung[0, 0] < lung[32, 32] < 255
    with pytest.raises(ValueError, match="preset"):
        window_from_dataset(ds, "nope")


def test_real_ct_file() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = window_from_dataset(ds)
    assert out.shape == (128, 128) and out.min() == 0 and out.max() == 255
    hu = hu_from_dataset(ds)
    assert -1100 < float(np.median(hu)) < 1000


def test_colour_is_refused() -> None:
    path = get_testdata_file("SC_rgb_small_odd.dcm")
    assert path is not None
    with pytest.raises(QCError, match="grayscale"):
        window_from_dataset(pydicom.dcmread(Path(path)))
