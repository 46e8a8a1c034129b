"""The fleet QC figure: density vs contrast by group with outliers named, scanners over time."""

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

__all__ = ["plot_fleet_qc", "robust_limits"]

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
    """A label that names the scan without PHI: scanner and the end of the de-identified UID."""
    ident = record.sop_instance_uid[-6:] if record.sop_instance_uid else record.file[-12:]
    first = record.reasons[0].split(" ")[0] if record.reasons else ""
    return f"{record.scanner_label} …{ident}\n{first}"


def _finite(records: Sequence[ScanFeatures], name: str) -> np.ndarray:
    return np.asarray([getattr(r, name) for r in records], dtype=np.float64)


def robust_limits(values: np.ndarray) -> tuple[float, float] | None:
    """Axis limits that show the bulk of ``values`` when one of them is extreme.

    The quartiles plus three interquartile ranges on each side (Tukey's far fences), never
    wider than the data, with a 6 % margin. None when no value is finite.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    q1, q3 = np.percentile(finite, [25, 75])
    iqr = q3 - q1
    lo, hi = float(finite.min()), float(finite.max())
    if iqr > 0:
        lo, hi = max(lo, float(q1 - 3 * iqr)), min(hi, float(q3 + 3 * iqr))
    span = hi - lo or max(abs(hi), 1.0)
    return lo - 0.06 * span, hi + 0.06 * span


def plot_fleet_qc(
    records: Sequence[ScanFeatures], labels: Sequence[int] | np.ndarray, silhouette: float
) -> Figure:
    """Fleet QC figure on an Agg canvas.

    Average density vs contrast per scan, coloured by k-means group, outliers ringed in red and
    labelled with scanner, UID tail and first reason. The axes show the bulk of the fleet
    (:func:`robust_limits`): a point beyond them is drawn at the edge as an arrow head and
    labelled with its value. Scans in HU and scans in other units never share an axis: with
    both, each has its own panel. When at least two distinct timestamps exist: noise and air
    mean per scanner over time (the HU scans, when there are any), outliers ringed.

    Parameters
    ----------
    records
        The scans' features, as :func:`run_qc` returns them.
    labels
        The k-means group of each record.
    silhouette
        The silhouette of the grouping (NaN when undefined).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not registered with pyplot; save it with ``fig.savefig``).

    Raises
    ------
    ValueError
        ``records`` and ``labels`` differ in length.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape[0] != len(records):
        raise ValueError("records and labels differ in length")
    times = _times(records)
    with_time = len({t for t in times if t is not None}) >= 2
    hu = np.asarray([r.hu_calibrated for r in records], dtype=bool)
    kinds = [(k, m) for k, m in (("HU", hu), ("modality units", ~hu)) if m.any()] or [("HU", hu)]
    width = 8.0 + (6.5 if len(kinds) > 1 else 0.0) + (7.0 if with_time else 0.0)
    fig = new_figure(width, 6.5)
    columns = [1.15] * len(kinds) + ([1.0] if with_time else [])
    grid = fig.add_gridspec(2, len(columns), width_ratios=columns)
    n_groups = int(labels.max()) + 1 if labels.size else 0
    outliers = np.asarray([r.outlier for r in records], dtype=bool)
    for column, (unit, mask) in enumerate(kinds):
        ax = fig.add_subplot(grid[:, column])
        _scatter(ax, records, labels, mask, unit, n_groups)
    sil = "undefined" if math.isnan(silhouette) else f"{silhouette:.2f}"
    fig.suptitle(
        f"Fleet QC: {len(records)} scans, {n_groups} groups (silhouette {sil}), "
        f"{int(outliers.sum())} outliers",
        fontsize=12,
    )
    if with_time:
        unit, mask = kinds[0]
        shown = [r for r, m in zip(records, mask, strict=True) if m]
        shown_times = [t for t, m in zip(times, mask, strict=True) if m]
        ax_noise = fig.add_subplot(grid[0, -1])
        ax_air = fig.add_subplot(grid[1, -1], sharex=ax_noise)
        _over_time(ax_noise, shown, shown_times, "noise", f"noise ({unit})")
        _over_time(ax_air, shown, shown_times, "air_mean", f"air mean ({unit})")
        scope = " (scans in HU)" if len(kinds) > 1 else ""
        ax_noise.set_title(f"per scanner over time{scope}", fontsize=11)
        ax_air.set_xlabel("acquisition time (de-identified header)")
        ax_noise.tick_params(axis="x", labelbottom=False)
        ax_air.tick_params(axis="x", labelrotation=25)
        for axis in (ax_noise, ax_air):
            axis.ticklabel_format(axis="y", style="plain", useOffset=False)
    return fig


def _scatter(
    ax: Axes,
    records: Sequence[ScanFeatures],
    labels: np.ndarray,
    mask: np.ndarray,
    unit: str,
    n_groups: int,
) -> None:
    """Density vs contrast of the records in ``mask`` (one unit), extreme points at the edge."""
    x, y = _finite(records, "avg_density"), _finite(records, "contrast")
    xlim, ylim = robust_limits(x[mask]), robust_limits(y[mask])
    # Points beyond the limits are drawn on the edge, as arrow heads pointing their way.
    px = np.clip(x, *xlim) if xlim else x
    py = np.clip(y, *ylim) if ylim else y
    beyond = mask & ((px != x) | (py != y)) & np.isfinite(x) & np.isfinite(y)
    inside = mask & ~beyond
    outliers = np.asarray([r.outlier for r in records], dtype=bool)
    for g in range(n_groups):
        colour = _GROUP_COLOURS[g % len(_GROUP_COLOURS)]
        m = labels == g
        if not (m & mask).any():
            continue
        ax.scatter(
            px[m & inside], py[m & inside], s=36, color=colour,
            label=f"group {g} (n={int((m & mask).sum())})", alpha=0.85, edgecolors="white",
            linewidths=0.5,
        )  # fmt: skip
        for k in np.flatnonzero(m & beyond):
            ax.scatter(
                [px[k]], [py[k]], s=90, color=colour, marker=_edge_marker(x[k], y[k], xlim, ylim),
                edgecolors="black", linewidths=0.6, zorder=3, clip_on=False,
            )  # fmt: skip
    if (outliers & mask).any():
        ringed = outliers & mask
        ax.scatter(
            px[ringed], py[ringed], s=160, facecolors="none", edgecolors=_OUTLIER,
            linewidths=2.0, label=f"outlier (n={int(ringed.sum())})", clip_on=False,
        )  # fmt: skip
    labelled = [int(i) for i in np.flatnonzero((outliers | beyond) & mask)][:_MAX_LABELS]
    for j, i in enumerate(labelled):
        if not (math.isfinite(x[i]) and math.isfinite(y[i])):
            continue
        text = _short(records[i])
        if beyond[i]:
            text += f"\n(at {x[i]:.0f}, {y[i]:.0f}: off the axes)"
        # Labels point inwards, so a point on the right or top edge keeps its label inside.
        dx = -12 if xlim and px[i] > (xlim[0] + xlim[1]) / 2 else 12
        dy = (-14 if ylim and py[i] > (ylim[0] + ylim[1]) / 2 else 14) - 22 * (j % 3)
        ax.annotate(
            text, (px[i], py[i]), xytext=(dx, dy), textcoords="offset points", fontsize=8,
            color=_OUTLIER, ha="right" if dx < 0 else "left",
            arrowprops={"arrowstyle": "-", "color": _OUTLIER, "lw": 0.8},
        )  # fmt: skip
    if xlim:
        ax.set_xlim(*xlim)
    if ylim:
        ax.set_ylim(*ylim)
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    ax.set_title(f"{int(mask.sum())} scans in {unit}", fontsize=11)
    ax.set_xlabel(f"average density inside the body ({unit})")
    ax.set_ylabel(f"contrast: SD inside the body ({unit})")
    ax.grid(True, alpha=0.3)
    if mask.any():
        ax.legend(loc="best", fontsize=9)


def _edge_marker(
    x: float, y: float, xlim: tuple[float, float] | None, ylim: tuple[float, float] | None
) -> str:
    """An arrow-head marker pointing the way the point lies beyond the axes."""
    if xlim and x > xlim[1]:
        return ">"
    if xlim and x < xlim[0]:
        return "<"
    if ylim and y > ylim[1]:
        return "^"
    return "v"


def _over_time(
    ax: Axes, records: Sequence[ScanFeatures], times: list[datetime | None], name: str, label: str
) -> None:
    series: dict[str, list[tuple[datetime, float, bool]]] = defaultdict(list)
    for r, t in zip(records, times, strict=True):
        value = getattr(r, name)
        if t is not None and math.isfinite(value):
            series[r.scanner_label].append((t, float(value), r.outlier))
    handles = []
    for k, (scanner, points) in enumerate(sorted(series.items())):
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
        handles.append(Line2D([], [], color=colour, marker="o", ms=4, label=scanner))
    ax.xaxis_date()
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    if handles:
        if any(r.outlier for r in records):
            handles.append(
                Line2D([], [], marker="o", ms=9, mfc="none", mec=_OUTLIER, ls="", label="outlier")
            )
        ax.legend(handles=handles, fontsize=8, loc="best", ncols=2)
