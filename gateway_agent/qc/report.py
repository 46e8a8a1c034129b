"""QC report files (features.csv, report.json, fleet.png) and the one-screen text summary."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging.figures import save_figure
from .features import NUMERIC_FEATURES, ScanFeatures
from .plots import plot_fleet_qc
from .report_file import latest_outliers

__all__ = ["build_report", "latest_outliers", "summary_text", "write_report"]

_SUMMARY_OUTLIERS = 8


def _num(value: float) -> float | None:
    return None if not math.isfinite(value) else round(float(value), 4)


def build_report(
    records: Sequence[ScanFeatures],
    labels: Sequence[int] | np.ndarray,
    silhouette: float,
    failures: Sequence[tuple[str, str]] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-safe dict: groups, silhouette, scanners, devices, outliers, reasons.

    ``scanners`` is keyed by the scanner pseudonym (the StationName for objects that carry none)
    and lists, per scanner, the edge boxes (StationName of de-identified objects) it came through.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = []
    for g in sorted({int(v) for v in labels}):
        members = [r for r, lab in zip(records, labels, strict=True) if lab == g]
        means = {}
        for name in NUMERIC_FEATURES:
            vals = np.asarray([getattr(r, name) for r in members], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            means[name] = _num(float(vals.mean())) if vals.size else None
        groups.append({"group": g, "scans": len(members), "mean": means})
    devices: dict[str, dict[str, Any]] = {}
    for r in records:
        d = devices.setdefault(
            r.device or "(unnamed)",
            {
                "manufacturer": r.manufacturer,
                "model": r.model,
                "modality": r.modality,
                "scans": 0,
                "outliers": 0,
            },
        )
        d["scans"] += 1
        d["outliers"] += int(r.outlier)
    scanners = _scanners(records)
    outliers = [
        {
            "file": r.file,
            "sop_instance_uid": r.sop_instance_uid,
            "series_instance_uid": r.series_instance_uid,
            "device": r.device,
            "scanner": r.scanner_label,
            "timestamp": r.timestamp,
            "group": r.group,
            "isolation_score": None if r.isolation_score is None else round(r.isolation_score, 4),
            "reasons": list(r.reasons),
        }
        for r in records
        if r.outlier
    ]
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scans": len(records),
        "failed": [{"file": f, "reason": why} for f, why in failures],
        "not_deidentified": sum(1 for r in records if not r.deidentified),
        "silhouette": _num(silhouette),
        "groups": groups,
        "scanners": scanners,
        "devices": devices,
        "outliers": outliers,
        **(extra or {}),
    }


def _scanners(records: Sequence[ScanFeatures]) -> dict[str, dict[str, Any]]:
    """Per scanner: what it is, how many scans and series, outliers and their first reasons."""
    out: dict[str, dict[str, Any]] = {}
    series: dict[str, set[str]] = {}
    bad_series: dict[str, set[str]] = {}
    boxes: dict[str, set[str]] = {}
    reasons: dict[str, Counter[str]] = {}
    for r in records:
        key = r.scanner_label
        d = out.setdefault(
            key,
            {
                "modality": r.modality,
                "manufacturer": r.manufacturer,
                "model": r.model,
                "scans": 0,
                "outliers": 0,
                "last_timestamp": None,
            },
        )
        d["scans"] += 1
        d["outliers"] += int(r.outlier)
        if r.timestamp and (d["last_timestamp"] is None or r.timestamp > d["last_timestamp"]):
            d["last_timestamp"] = r.timestamp
        uid = r.series_instance_uid or r.file
        series.setdefault(key, set()).add(uid)
        if r.device:
            boxes.setdefault(key, set()).add(r.device)
        if r.outlier:
            bad_series.setdefault(key, set()).add(uid)
            # The measured feature of each reason ("noise 31.2 HU (...)" -> "noise").
            reasons.setdefault(key, Counter()).update({t.split(" ")[0] for t in r.reasons})
    for key, d in out.items():
        d["series"] = len(series[key])
        d["outlier_series"] = len(bad_series.get(key, ()))
        d["edge_boxes"] = sorted(boxes.get(key, ()))
        d["reasons"] = dict(reasons.get(key, Counter()).most_common())
    return dict(sorted(out.items()))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_report(
    records: Sequence[ScanFeatures],
    labels: Sequence[int] | np.ndarray,
    silhouette: float,
    out_dir: Path,
    failures: Sequence[tuple[str, str]] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``features.csv``, ``report.json`` and ``fleet.png`` into ``out_dir`` atomically.

    ``extra`` adds top-level keys to ``report.json`` (e.g. what a run over an archive did).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ScanFeatures.field_names(), lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(r.as_row())
    paths = {
        "features": out_dir / "features.csv",
        "report": out_dir / "report.json",
        "plot": out_dir / "fleet.png",
    }
    _atomic_write(paths["features"], buf.getvalue())
    report = build_report(records, labels, silhouette, failures, extra)
    _atomic_write(paths["report"], json.dumps(report, indent=2) + "\n")
    fig = plot_fleet_qc(records, labels, silhouette)
    tmp_png = out_dir / ".fleet.png.tmp"
    save_figure(fig, tmp_png, fmt="png")
    tmp_png.replace(paths["plot"])
    return paths


def summary_text(
    records: Sequence[ScanFeatures],
    labels: Sequence[int] | np.ndarray,
    silhouette: float,
    failures: Sequence[tuple[str, str]] = (),
) -> str:
    """A one-screen summary: counts, groups, devices, and the outliers with their first reasons."""
    labels = np.asarray(labels, dtype=np.int64)
    sil = "undefined" if math.isnan(silhouette) else f"{silhouette:.2f}"
    outliers = [r for r in records if r.outlier]
    lines = [
        f"QC: {len(records)} images measured, {len(failures)} skipped, "
        f"{len(outliers)} outliers; silhouette {sil}",
    ]
    if records:
        counts = Counter(int(v) for v in labels)
        lines.append("groups:  " + ", ".join(f"{g}: {n} scans" for g, n in sorted(counts.items())))
        per_device = Counter(r.scanner_label for r in records)
        bad_device = Counter(r.scanner_label for r in outliers)
        # Scanners with outliers first, then the busiest.
        ranked = sorted(per_device.items(), key=lambda kv: (-bad_device[kv[0]], -kv[1], kv[0]))
        shown = ", ".join(
            f"{d} {n}" + (f" ({bad_device[d]} outl.)" if bad_device[d] else "")
            for d, n in ranked[:6]
        )
        more = len(per_device) - 6
        lines.append("scanners: " + shown + (f", +{more} more" if more > 0 else ""))
    not_deid = sum(1 for r in records if not r.deidentified)
    if not_deid:
        lines.append(
            f"warning: {not_deid} images are not marked de-identified (PatientIdentityRemoved)"
        )
    for r in outliers[:_SUMMARY_OUTLIERS]:
        lines.append(f"  ! {r.scanner_label} {r.file}")
        for reason in r.reasons[:2]:
            lines.append(f"      {reason}")
        if len(r.reasons) > 2:
            lines.append(f"      (+{len(r.reasons) - 2} more reasons)")
    if len(outliers) > _SUMMARY_OUTLIERS:
        lines.append(
            f"  ... and {len(outliers) - _SUMMARY_OUTLIERS} more outliers (see report.json)"
        )
    return "\n".join(lines)
