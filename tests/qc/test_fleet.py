"""The fleet model on generated fleets: each anomaly flagged for its reason, few false alarms."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from gateway_agent.qc import (
    OutlierSettings,
    analyse_fleet,
    cluster_fleet,
    detect_outliers,
    feature_matrix,
)

from ._fleet import anomaly, normal_datasets, records

REASON = re.compile(
    r"^(\w+) (-?[\d.]+)( HU)? \((fleet|device \w+) median (-?[\d.]+), ([\d.]+) MAD\)$"
)


@pytest.mark.parametrize("seed", [1, 2])
def test_normal_fleet_of_50_gives_at_most_one_false_alarm(seed: int) -> None:
    recs = records(normal_datasets(50, seed))
    analyse_fleet(recs)
    flagged = [r for r in recs if r.outlier]
    assert len(flagged) <= 1, [r.reasons for r in flagged]
    assert all(r.isolation_score is not None for r in recs)


def _flag(kind: str, n_normal: int = 30) -> tuple[list[str], list[list[str]]]:
    recs = records(normal_datasets(n_normal, 5))
    recs += records([anomaly(kind)], prefix="bad")
    analyse_fleet(recs)
    bad = recs[-1]
    others = [r.reasons for r in recs[:-1] if r.outlier]
    assert bad.outlier
    return bad.reasons, others


def test_detuned_scanner_is_flagged_for_air() -> None:
    reasons, others = _flag("detuned")
    assert reasons[0].startswith("air_mean ")
    m = REASON.match(reasons[0])
    assert m is not None, reasons[0]
    assert m.group(3) == " HU" and m.group(4) == "fleet"
    assert -1010 < float(m.group(5)) < -990 and float(m.group(6)) > 6
    assert len(others) <= 1


def test_noisy_scanner_is_flagged_for_noise() -> None:
    reasons, others = _flag("noisy")
    assert reasons[0].startswith("noise "), reasons
    assert len(others) <= 1


def test_wrong_kernel_series_is_flagged_for_kernel() -> None:
    recs = records(normal_datasets(30, 6))
    # One series, sampled at three slices (as the QC job does).
    recs += records([anomaly("kernel", i) for i in range(3)], prefix="bad")
    analyse_fleet(recs)
    for bad in recs[-3:]:
        assert bad.outlier
        assert "kernel BONE (device EDGE04 usually STANDARD: 6 of 7 series)" in bad.reasons
    assert sum(r.outlier for r in recs[:-3]) <= 1


def test_walkthrough_sized_fleet_six_normal_two_anomalous() -> None:
    recs = records([*normal_datasets(6, 9), anomaly("detuned"), anomaly("noisy")])
    _matrix, labels, _sil = analyse_fleet(recs)
    assert [r.outlier for r in recs] == [False] * 6 + [True, True]
    assert recs[6].reasons[0].startswith("air_mean") and recs[7].reasons[0].startswith("noise")
    assert labels.shape == (8,)


def test_device_drift_is_caught_per_device() -> None:
    # A moderate noise rise on one device: within the spread of the whole fleet's devices is not
    # required; the device's own history flags it.
    recs = records(normal_datasets(40, 3))
    recs += records([anomaly("noisy", noise_sd=20.0, station_name="EDGE01")], prefix="bad")
    analyse_fleet(recs)
    assert recs[-1].outlier and recs[-1].reasons[0].startswith("noise")


def test_thresholds_are_settings() -> None:
    recs = records([*normal_datasets(8, 4), anomaly("detuned")])
    detect_outliers(recs, settings=OutlierSettings(threshold=1000.0))
    assert not any(r.outlier for r in recs)


def test_small_fleets_do_not_judge() -> None:
    recs = records([*normal_datasets(3, 4), anomaly("noisy")])
    analyse_fleet(recs)
    assert not any(r.outlier for r in recs)


def test_feature_matrix_is_standardised_and_imputes() -> None:
    recs = records(normal_datasets(6, 2))
    recs[0].air_mean = math.nan
    m = feature_matrix(recs)
    assert m.shape == (6, 8) and np.isfinite(m).all()
    np.testing.assert_allclose(m.mean(axis=0), 0, atol=1e-9)


def test_cluster_fleet_separates_two_groups_deterministically() -> None:
    rng = np.random.default_rng(0)
    m = np.vstack([rng.normal(0, 0.1, (20, 3)), rng.normal(5, 0.1, (10, 3))])
    labels, sil = cluster_fleet(m, 2)
    assert set(labels[:20]) == {0} and set(labels[20:]) == {1}  # numbered by first feature
    assert sil > 0.9
    labels2, sil2 = cluster_fleet(m, 2)
    np.testing.assert_array_equal(labels, labels2)
    assert sil == sil2
    one, nan = cluster_fleet(m[:1], 2)
    assert one.tolist() == [0] and math.isnan(nan)
