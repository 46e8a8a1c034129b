"""The fleet model: standardised feature matrix, k-means groups, and outliers with human reasons."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..imaging.cluster import sampled_silhouette
from ..imaging.numeric import isolation_scores, kmeans
from .features import NUMERIC_FEATURES, ScanFeatures

__all__ = [
    "FEATURE_SCALES",
    "OutlierSettings",
    "cluster_fleet",
    "detect_outliers",
    "feature_matrix",
]


@dataclass(frozen=True)
class _Scale:
    unit: str
    floor: float  # smallest MAD that counts, in feature units (a fleet of clones has MAD ~0)
    relative: float = 0.0  # ... or this fraction of |median|, for scale-like features


#: Per feature: unit and the smallest MAD the robust z-score divides by.
FEATURE_SCALES: dict[str, _Scale] = {
    "avg_density": _Scale("HU", 5.0),
    "contrast": _Scale("HU", 2.0, 0.03),
    "noise": _Scale("HU", 0.3, 0.10),
    "snr": _Scale("", 0.5, 0.10),
    "air_mean": _Scale("HU", 4.0),
    "p05": _Scale("HU", 8.0),
    "p50": _Scale("HU", 5.0),
    "p95": _Scale("HU", 8.0),
}


@dataclass(frozen=True)
class OutlierSettings:
    """Thresholds of the outlier model.

    ``threshold`` is in MADs from the median (6 MADs is about 4 standard deviations for normal
    data). A robust comparison needs ``min_group`` scans; an acquisition parameter (kernel, kVp)
    is flagged when its share on the device (or fleet) is at most ``rare_share`` while the usual
    value holds at least ``usual_share``. The isolation forest flags a scan whose score is below
    ``isolation_threshold`` (scikit-learn's own cut-off is -0.5).
    """

    threshold: float = 6.0
    min_group: int = 6
    rare_share: float = 0.2
    usual_share: float = 0.6
    isolation_threshold: float = -0.68
    isolation_min_scans: int = 16
    seed: int = 0


def feature_matrix(
    records: Sequence[ScanFeatures], names: Sequence[str] = NUMERIC_FEATURES
) -> np.ndarray:
    """Records as a standardised matrix (zero mean, unit SD per column; NaN -> column median)."""
    raw = np.asarray([[getattr(r, n) for n in names] for r in records], dtype=np.float64)
    if raw.size == 0:
        return raw.reshape(len(records), len(names))
    for j in range(raw.shape[1]):
        column = raw[:, j]
        missing = ~np.isfinite(column)
        if missing.all():
            column[:] = 0.0
        elif missing.any():
            column[missing] = float(np.median(column[~missing]))
    mean = raw.mean(axis=0)
    sd = raw.std(axis=0)
    sd[sd == 0] = 1.0
    out: np.ndarray = (raw - mean) / sd
    return out


def cluster_fleet(
    matrix: np.ndarray, n_clusters: int = 2, *, seed: int = 0
) -> tuple[np.ndarray, float]:
    """k-means groups of the standardised matrix, ``(labels, silhouette)``; NaN when undefined.

    Groups are numbered by their mean first feature (average density), so numbering is stable.
    """
    n = matrix.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), math.nan
    distinct = np.unique(np.round(matrix, 9), axis=0).shape[0]
    k = min(n_clusters, distinct)
    if k <= 1:
        return np.zeros(n, np.int64), math.nan
    km = kmeans(matrix, k, n_init=10, seed=seed)
    order = np.argsort(km.centers[:, 0])
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    labels: np.ndarray = rank[km.labels]
    return labels, sampled_silhouette(matrix, labels, seed=seed)


def _fmt(value: float, unit: str) -> str:
    text = (
        f"{value:.0f}"
        if abs(value) >= 100
        else f"{value:.3g}"
        if abs(value) < 10
        else f"{value:.1f}"
    )
    return f"{text} {unit}" if unit else text


def _robust_reasons(
    records: Sequence[ScanFeatures], members: list[int], scope: str, settings: OutlierSettings
) -> dict[int, list[tuple[float, str, str]]]:
    """Per record index: ``(mads, feature, reason)`` for every feature beyond the threshold."""
    found: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    if len(members) < settings.min_group:
        return found
    for name in NUMERIC_FEATURES:
        values = np.asarray([getattr(records[i], name) for i in members], dtype=np.float64)
        ok = np.isfinite(values)
        if ok.sum() < settings.min_group:
            continue
        median = float(np.median(values[ok]))
        scale = FEATURE_SCALES[name]
        mad = float(np.median(np.abs(values[ok] - median)))
        mad = max(mad, scale.floor, scale.relative * abs(median))
        unit = scale.unit if records[members[0]].hu_calibrated else ""
        for i, value in zip(members, values, strict=True):
            if not math.isfinite(value):
                continue
            mads = abs(value - median) / mad
            if mads > settings.threshold:
                reason = (
                    f"{name} {_fmt(float(value), unit)} ({scope} median {_fmt(median, '')}, "
                    f"{mads:.1f} MAD)"
                )
                found[i].append((mads, name, reason))
    return found


def _category_reasons(
    records: Sequence[ScanFeatures], members: list[int], scope: str, settings: OutlierSettings
) -> dict[int, list[str]]:
    """Rare acquisition parameters (kernel, kVp) compared with the group's usual value.

    Shares count series, not slices: a kernel is a property of the series, and a series sampled
    at several slices must not outvote the others.
    """
    found: dict[int, list[str]] = defaultdict(list)
    for name, label in (("kernel", "kernel"), ("kvp", "kVp")):
        per_series: dict[str, object] = {}
        for i in members:
            value = getattr(records[i], name)
            if value not in (None, ""):
                per_series[records[i].series_instance_uid or records[i].file] = value
        if len(per_series) < settings.min_group:
            continue
        counts = Counter(per_series.values())
        usual, usual_n = counts.most_common(1)[0]
        total = len(per_series)
        if usual_n / total < settings.usual_share:
            continue
        for i in members:
            value = getattr(records[i], name)
            if value in (None, "") or value == usual or counts[value] / total > settings.rare_share:
                continue
            shown_value = f"{value:g}" if isinstance(value, float) else value
            shown_usual = f"{usual:g}" if isinstance(usual, float) else usual
            share = f"{usual_n} of {total} series"
            found[i].append(f"{label} {shown_value} ({scope} usually {shown_usual}: {share})")
    return found


def _isolation_scores(matrix: np.ndarray, seed: int) -> np.ndarray:
    return isolation_scores(matrix, n_estimators=200, seed=seed)


def detect_outliers(
    records: Sequence[ScanFeatures],
    matrix: np.ndarray | None = None,
    settings: OutlierSettings | None = None,
) -> list[ScanFeatures]:
    """Set ``outlier``, ``reasons`` and ``isolation_score`` on each record; return the outliers.

    Robust z-scores (distance from the median in MADs) per feature, first against the fleet (same
    modality) and then against the record's own scanner (its pseudonym, else its StationName);
    rare kernels and kVp per scanner (or fleet when the scanner has too few scans); and an
    isolation forest on the standardised features.
    """
    cfg = settings or OutlierSettings()
    for record in records:
        record.outlier, record.reasons, record.isolation_score = False, [], None
    if matrix is None:
        matrix = feature_matrix(records)
    by_modality: dict[str, list[int]] = defaultdict(list)
    by_device: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_modality[r.modality].append(i)
        by_device[(r.modality, r.scanner_label)].append(i)

    numeric: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    categorical: dict[int, list[str]] = defaultdict(list)
    for members in by_modality.values():
        for i, found in _robust_reasons(records, members, "fleet", cfg).items():
            numeric[i].extend(found)
    for (_modality, device), members in by_device.items():
        scope = f"scanner {device}" if records[members[0]].scanner else f"device {device}"
        for i, found in _robust_reasons(records, members, scope, cfg).items():
            numeric[i].extend(found)
        if len(members) >= cfg.min_group:
            for i, texts in _category_reasons(records, members, scope, cfg).items():
                categorical[i].extend(texts)
    for members in by_modality.values():
        small = [
            i
            for i in members
            if len(by_device[(records[i].modality, records[i].scanner_label)]) < cfg.min_group
        ]
        if not small:
            continue
        for i, texts in _category_reasons(records, members, "fleet", cfg).items():
            if i in small:
                categorical[i].extend(texts)

    scores = None
    if len(records) >= cfg.isolation_min_scans and matrix.shape[0] == len(records):
        scores = _isolation_scores(matrix, cfg.seed)
    for i, record in enumerate(records):
        reasons: list[str] = []
        # One reason per feature: the fleet comparison when it fires, else the device's own.
        best: dict[str, tuple[float, str]] = {}
        for mads, name, text in numeric.get(i, []):  # fleet reasons were added first
            best.setdefault(name, (mads, text))
        reasons.extend(text for _mads, text in sorted(best.values(), key=lambda t: -t[0]))
        reasons.extend(categorical.get(i, []))
        if scores is not None:
            record.isolation_score = float(scores[i])
            if scores[i] < cfg.isolation_threshold:
                reasons.append(
                    f"isolation forest score {scores[i]:.2f} (below {cfg.isolation_threshold:g}: "
                    "unusual combination of features)"
                )
        record.reasons = reasons
        record.outlier = bool(reasons)
    return [r for r in records if r.outlier]
