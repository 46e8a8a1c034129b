"""Per-scanner QC state: each scanner's latest series, its features, its outlier state and why.

What an edge box publishes per scanner (Prometheus gauges): the median of the features over the
scanner's latest measured series, whether the fleet model flags that series and on which
features, how many of its instances the model holds, and when it was last measured.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dicom.scanner import is_scanner_pseudonym
from .features import NUMERIC_FEATURES

if TYPE_CHECKING:
    from .features import ScanFeatures

__all__ = ["REASON_NAMES", "ScannerState", "reason_name", "scanner_states"]

#: The values of the ``reason`` label: the feature (or parameter) an outlier reason is about.
REASON_NAMES = frozenset({*NUMERIC_FEATURES, "kernel", "kvp", "isolation_forest", "other"})
#: Features published per scanner: gauge name suffix -> ScanFeatures field.
PUBLISHED = {"noise": "noise", "air_mean": "air_mean", "snr": "snr", "density": "avg_density"}
_MODALITY = re.compile(r"[^A-Z0-9_]")


@dataclass(frozen=True)
class ScannerState:
    """One scanner (pseudonym) and modality, as of its latest measured series."""

    scanner: str
    modality: str
    #: median over the latest series' measured instances (NaN when none was measurable)
    noise: float
    air_mean: float
    snr: float
    density: float
    #: instances of this scanner in the fleet model
    instances: int
    outlier: bool
    #: the features the outlier reasons of the latest series are about (see REASON_NAMES)
    reasons: tuple[str, ...]
    #: Unix time of the scanner's latest measured instance (intake time on the box)
    last_measured: float


def reason_name(reason: str) -> str:
    """The label value of an outlier reason: ``"air_mean -904 HU (...)"`` -> ``"air_mean"``."""
    first = reason.split(" ", 1)[0]
    name = {"kVp": "kvp", "isolation": "isolation_forest"}.get(first, first)
    return name if name in REASON_NAMES else "other"


def _label(record: ScanFeatures) -> tuple[str, str]:
    """``(scanner, modality)`` label values: a pseudonym (never a device's own name) or
    ``unknown``; the modality reduced to ``[A-Z0-9_]`` (at most 16)."""
    scanner = record.scanner if is_scanner_pseudonym(record.scanner) else "unknown"
    modality = _MODALITY.sub("", record.modality.upper())[:16] or "unknown"
    return scanner, modality


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(statistics.median(finite)) if finite else math.nan


def scanner_states(
    records: Sequence[ScanFeatures], measured_at: Sequence[float]
) -> list[ScannerState]:
    """Per (scanner, modality): the state of its latest series (by ``measured_at``).

    ``records`` have been through the fleet model (``outlier`` and ``reasons`` set);
    ``measured_at[i]`` is the Unix time ``records[i]`` was taken in.
    """
    if len(records) != len(measured_at):
        raise ValueError('Arguments "records" and "measured_at" differ in length.')
    by_scanner: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_scanner[_label(record)].append(i)
    out = []
    for (scanner, modality), members in sorted(by_scanner.items()):
        newest = max(members, key=lambda i: measured_at[i])
        series = records[newest].series_instance_uid
        latest = [i for i in members if records[i].series_instance_uid == series] or [newest]
        values = {
            name: _median([getattr(records[i], field) for i in latest])
            for name, field in PUBLISHED.items()
        }
        reasons = sorted({reason_name(r) for i in latest for r in records[i].reasons})
        out.append(
            ScannerState(
                scanner=scanner,
                modality=modality,
                instances=len(members),
                outlier=any(records[i].outlier for i in latest),
                reasons=tuple(reasons),
                last_measured=float(measured_at[newest]),
                **values,
            )
        )
    return out
