"""The fleet QC figure: density vs contrast by group with outliers named, and devices over time."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import numpy as np
from matplotlib.axes import Axes
from matplotlib.dates import date2num
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..imaging.figures import new_figure
from .features import ScanFeatures

__all__ = ["plot_fleet_qc"]

_GROUP_COLOURS = ("#4c78a8", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#9d755d", "#bab0ac")
_OUTLIER = "#e45756"
_MAX_LABELS = 12


def _times(records: Sequence[ScanFeatures]) -> list[datetime | None]:
    out: list[datetime | None] = []
    for r in records:
        try:
            out.append(datetime.fromisoformat(r.timestamp) if r.timestamp else None)
        except ValueError:
            out.append(None)
    return out


def _short(record: ScanFeatures) -> str:
    """A label that names the scan without PHI: device and the end of the de-identified UID."""
    ident = record.sop_instance_uid[-6:] if record.sop_instance_uid else record.file[-12:]
    first = record.reasons[0].split(" ")[0] if record.reasons else ""
    return f"{record.device or '?'} …{ident}\n{first}"


def _finite(records: Sequence[ScanFeatures], name: str) -> np.ndarray:
    return np.asarray([getattr(r, name) for r in records], dtype=np.float64)


def plot_fleet_qc(
    records: Sequence[ScanFeatures], labels: Sequence[int] | np.ndarray, silhouette: float
) -> Figure:
    """Fleet QC figure on an Agg canvas.

    Left: average density vs contrast per scan, coloured by k-means group, outliers ringed in red
    and labelled with device, UID tail and first reason. Right (when at least two distinct
    timestamps exist): noise and air mean per device over time, outliers ringed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != len(records):
        raise ValueError("records and labels differ in length")
    times = _times(records)
    with_time = len({t for t in times if t is not None}) >= 2
    fig = new_figure(15.0 if with_time else 8.0, 6.5)
    if with_time:
        grid = fig.add_gridspec(2, 2, width_ratios=(1.15, 1.0))
        ax = fig.add_subplot(grid[:, 0])
        ax_noise = fig.add_subplot(grid[0, 1])
        ax_air = fig.add_subplot(grid[1, 1], sharex=ax_noise)
    else:
        ax = fig.add_subplot(1, 1, 1)
    hu = bool(records) and all(r.hu_calibrated for r in records)
    unit = "HU" if hu else "modality units"
    x, y = _finite(records, "avg_density"), _finite(records, "contrast")
    outliers = np.asarray([r.outlier for r in records], dtype=bool)
    n_groups = int(labels.max()) + 1 if labels.size else 0
    for g in range(n_groups):
        m = labels == g
        ax.scatter(
            x[m], y[m], s=36, color=_GROUP_COLOURS[g % len(_GROUP_COLOURS)],
            label=f"group {g} (n={int(m.sum())})", alpha=0.85, edgecolors="white", linewidths=0.5,
        )  # fmt: skip
    if outliers.any():
        ax.scatter(
            x[outliers], y[outliers], s=160, facecolors="none", edgecolors=_OUTLIER, linewidths=2.0,
            label=f"outlier (n={int(outliers.sum())})",
        )  # fmt: skip
        shown = [int(i) for i in np.flatnonzero(outliers)][:_MAX_LABELS]
        for j, i in enumerate(shown):
            if not (math.isfinite(x[i]) and math.isfinite(y[i])):
                continue
            ax.annotate(
                _short(records[i]), (x[i], y[i]), xytext=(12, 14 - 22 * (j % 3)),
                textcoords="offset points", fontsize=8, color=_OUTLIER,
                arrowprops={"arrowstyle": "-", "color": _OUTLIER, "lw": 0.8},
            )  # fmt: skip
    sil = "undefined" if math.isnan(silhouette) else f"{silhouette:.2f}"
    ax.set_title(
        f"Fleet QC: {len(records)} scans, {n_groups} groups (silhouette {sil}), "
        f"{int(outliers.sum())} outliers",
        fontsize=11,
    )
    ax.set_xlabel(f"average density inside the body ({unit})")
    ax.set_ylabel(f"contrast: SD inside the body ({unit})")
    ax.grid(True, alpha=0.3)
    if len(records):
        ax.legend(loc="best", fontsize=9)
    if with_time:
        _over_time(ax_noise, records, times, "noise", f"noise ({unit})")
        _over_time(ax_air, records, times, "air_mean", f"air mean ({unit})")
        ax_noise.set_title("per device over time", fontsize=11)
        ax_air.set_xlabel("acquisition time (de-identified header)")
        ax_noise.tick_params(axis="x", labelbottom=False)
        ax_air.tick_params(axis="x", labelrotation=25)
    return fig


def _over_time(
    ax: Axes, records: Sequence[ScanFeatures], times: list[datetime | None], name: str, label: str
) -> None:
    series: dict[str, list[tuple[datetime, float, bool]]] = defaultdict(list)
    for r, t in zip(records, times, strict=True):
        value = getattr(r, name)
        if t is not None and math.isfinite(value):
            series[r.device or "(unnamed)"].append((t, float(value), r.outlier))
    handles = []
    for k, (device, points) in enumerate(sorted(series.items())):
        points.sort()
        colour = _GROUP_COLOURS[k % len(_GROUP_COLOURS)]
        ts = date2num([p[0] for p in points])  # type: ignore[no-untyped-call]
        vs = [p[1] for p in points]
        ax.plot(ts, vs, marker="o", ms=4, lw=1.0, color=colour, alpha=0.85)
        bad = [(float(t), p[1]) for t, p in zip(ts, points, strict=True) if p[2]]
        if bad:
            ax.scatter(
                [b[0] for b in bad], [b[1] for b in bad],
                s=110, facecolors="none", edgecolors=_OUTLIER, linewidths=1.8, zorder=3,
            )  # fmt: skip
        handles.append(Line2D([], [], color=colour, marker="o", ms=4, label=device))
    ax.xaxis_date()
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    if handles:
        if any(r.outlier for r in records):
            handles.append(
                Line2D([], [], marker="o", ms=9, mfc="none", mec=_OUTLIER, ls="", label="outlier")
            )
        ax.legend(handles=handles, fontsize=8, loc="best", ncols=2)
