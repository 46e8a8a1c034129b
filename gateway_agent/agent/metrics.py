"""Prometheus metrics of the agent: one registry, names fixed here, no PHI in any label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BYTES_SENT",
    "DEIDENTIFIED",
    "DEID_SECONDS",
    "FILES_RECEIVED",
    "INTAKE_PAUSED",
    "LAST_UPLOAD_SUCCESS",
    "QC_OUTLIERS",
    "QUARANTINED",
    "REGISTRY",
    "UPLOAD_ATTEMPTS",
    "UPLOAD_SECONDS",
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
    "Instances per upload attempt, by result (sent, retry, dead).",
    ["result"],
    registry=REGISTRY,
)
BYTES_SENT = Counter(
    "gateway_bytes_sent", "Bytes of DICOM acknowledged by the destination.", registry=REGISTRY
)
LAST_UPLOAD_SUCCESS = Gauge(
    "gateway_last_upload_success_timestamp_seconds",
    "Unix time of the last acknowledged upload.",
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
    "Time per upload request.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
# Outbox depth by state, oldest waiting age and disk free are computed at scrape time by a collector
# registered by the health server (agent/health.py), from the outbox itself.
