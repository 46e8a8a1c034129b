"""Prometheus metrics of the agent: one registry, names fixed here, no PHI in any label."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..qc.scanners import ScannerState

__all__ = [
    "BYTES_SENT",
    "DEIDENTIFIED",
    "DEID_SECONDS",
    "FILES_RECEIVED",
    "INTAKE_PAUSED",
    "LISTENER_ASSOCIATIONS",
    "LISTENER_INSTANCES",
    "LAST_UPLOAD_SUCCESS",
    "QC_OUTLIERS",
    "QUARANTINED",
    "REGISTRY",
    "SCANNER_QC",
    "UPLOAD_ATTEMPTS",
    "UPLOAD_SECONDS",
    "ScannerQCCollector",
]

#: The agent's own registry (not the global default), so tests can start several agents.
REGISTRY = CollectorRegistry(auto_describe=True)

FILES_RECEIVED = Counter(
    "gateway_files_received", "Inbox files taken for processing.", registry=REGISTRY
)
DEIDENTIFIED = Counter(
    "gateway_deidentified",
    "Instances de-identified and committed to the outbox.",
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "gateway_quarantined",
    "Inputs quarantined, by machine-readable reason.",
    ["reason"],
    registry=REGISTRY,
)
UPLOAD_ATTEMPTS = Counter(
    "gateway_upload_attempts",
    "Instances per upload attempt, by destination and result (sent, retry, dead; proven, and "
    "not_stored: acknowledged but not found by the storage check).",
    ["destination", "result"],
    registry=REGISTRY,
)
BYTES_SENT = Counter(
    "gateway_bytes_sent",
    "Bytes of DICOM acknowledged, by destination.",
    ["destination"],
    registry=REGISTRY,
)
LAST_UPLOAD_SUCCESS = Gauge(
    "gateway_last_upload_success_timestamp_seconds",
    "Unix time of the last acknowledged upload, by destination.",
    ["destination"],
    registry=REGISTRY,
)
INTAKE_PAUSED = Gauge(
    "gateway_intake_paused", "1 while intake is paused (disk guard), else 0.", registry=REGISTRY
)
QC_OUTLIERS = Gauge(
    "gateway_qc_outliers", "Outliers in the latest fleet QC model.", registry=REGISTRY
)
DEID_SECONDS = Histogram(
    "gateway_deid_seconds",
    "Time to de-identify and durably write one instance.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
    registry=REGISTRY,
)
UPLOAD_SECONDS = Histogram(
    "gateway_upload_seconds",
    "Time per upload request, by destination.",
    ["destination"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
LISTENER_ASSOCIATIONS = Counter(
    "gateway_listener_associations",
    "C-STORE listener associations by calling AE title and result (accepted, rejected).",
    ["calling_ae", "result"],
    registry=REGISTRY,
)
LISTENER_INSTANCES = Counter(
    "gateway_listener_instances",
    "Instances received over C-STORE by calling AE title and result (stored: kept durably and "
    "answered 0x0000; refused: answered 0xA700).",
    ["calling_ae", "result"],
    registry=REGISTRY,
)
# Outbox depth by state, oldest waiting age and disk free are computed at scrape time by a collector
# registered by the health server (agent/health.py), from the outbox itself.


class ScannerQCCollector(Collector):
    """Per-scanner QC gauges, from the QC job's latest states, at scrape time.

    Labels are the scanner pseudonym and the modality (and for reasons the feature name): never
    a device's own name. A scanner not measured for ``ttl_seconds`` drops out; at most
    ``max_scanners`` (the most recently measured) are exported, the others counted in
    ``gateway_qc_scanners_dropped``.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._states: tuple[ScannerState, ...] = ()
        self.ttl_seconds = 7 * 86400.0
        self.max_scanners = 500

    def publish(
        self,
        states: Sequence[ScannerState],
        *,
        ttl_seconds: float | None = None,
        max_scanners: int | None = None,
    ) -> None:
        """Replace the published states (the QC job calls this after each refit)."""
        with self._lock:
            self._states = tuple(states)
            if ttl_seconds is not None:
                self.ttl_seconds = ttl_seconds
            if max_scanners is not None:
                self.max_scanners = max_scanners

    def clear(self) -> None:
        self.publish(())

    def current(self) -> tuple[list[ScannerState], int]:
        """The states exported now (within the TTL, newest first, capped) and how many were
        dropped by the cap."""
        with self._lock:
            states, ttl, cap = self._states, self.ttl_seconds, self.max_scanners
        now = self._clock()
        live = sorted(
            (s for s in states if now - s.last_measured <= ttl),
            key=lambda s: (-s.last_measured, s.scanner, s.modality),
        )
        return live[:cap], max(0, len(live) - cap)

    def collect(self) -> Iterator[Metric]:
        states, dropped = self.current()
        labels = ["scanner", "modality"]
        values = [
            ("noise", "Image noise of the scanner's latest series (robust SD in homogeneous "
             "tissue; HU on CT, modality units otherwise)."),
            ("air_mean", "Mean outside the body of the latest series (air, about -1000 HU on "
             "CT; background otherwise)."),
            ("snr", "Signal-to-noise ratio of the latest series: (tissue mean - air mean) / "
             "noise."),
            ("density", "Mean density inside the body of the latest series (HU on CT)."),
        ]  # fmt: skip
        for name, help_text in values:
            family = GaugeMetricFamily(f"gateway_qc_scanner_{name}", help_text, labels=labels)
            for s in states:
                value = float(getattr(s, name))
                if math.isfinite(value):
                    family.add_metric([s.scanner, s.modality], value)
            yield family
        measured = GaugeMetricFamily(
            "gateway_qc_scanner_measured_instances",
            "Instances of the scanner in the QC fleet model of this edge box.",
            labels=labels,
        )
        outlier = GaugeMetricFamily(
            "gateway_qc_scanner_outlier",
            "1 when the fleet model flags the scanner's latest series, else 0.",
            labels=labels,
        )
        reason = GaugeMetricFamily(
            "gateway_qc_scanner_outlier_reason",
            "1 per feature an outlier reason of the scanner's latest series is about.",
            labels=[*labels, "reason"],
        )
        last = GaugeMetricFamily(
            "gateway_qc_scanner_last_measurement_timestamp_seconds",
            "Unix time the scanner's latest measured instance arrived on this edge box.",
            labels=labels,
        )
        for s in states:
            key = [s.scanner, s.modality]
            measured.add_metric(key, float(s.instances))
            outlier.add_metric(key, 1.0 if s.outlier else 0.0)
            for r in s.reasons:
                reason.add_metric([*key, r], 1.0)
            last.add_metric(key, s.last_measured)
        yield from (measured, outlier, reason, last)
        yield GaugeMetricFamily(
            "gateway_qc_scanners", "Scanners with QC gauges in this scrape.", value=len(states)
        )
        yield GaugeMetricFamily(
            "gateway_qc_scanners_dropped",
            "Scanners measured within the TTL but left out by qc.max_scanners.",
            value=dropped,
        )


#: The per-scanner QC gauges (the QC job publishes to it).
SCANNER_QC = ScannerQCCollector()
REGISTRY.register(SCANNER_QC)
