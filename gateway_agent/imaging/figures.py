"""Matplotlib figures of windowed images and cluster maps (Agg canvas, no pyplot global state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from pydicom.dataset import Dataset

from .cluster import TISSUE_CLASSES
from .lut import WINDOW_PRESETS, dataset_window, frame_count, window_from_dataset

__all__ = [
    "IMAGE_FORMATS",
    "cluster_figure",
    "image_format",
    "new_figure",
    "save_figure",
    "save_gray_png",
    "window_panel",
]

_TISSUE_COLOURS = ("#000000", "#4c78a8", "#f2cf5b", "#e45756", "#f5f5f5")


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (thread-safe; nothing registered with pyplot)."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


#: File name suffix -> the image format written (matplotlib's Agg writers).
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


def image_format(path: Path) -> str:
    """The format for ``path`` from its suffix: PNG (also without a suffix) or JPEG.

    Raises
    ------
    ValueError
        Any other suffix: the file would not be what its name says.
    """
    suffix = path.suffix.lower()
    if suffix == "":
        return "png"
    found = IMAGE_FORMATS.get(suffix)
    if found is None:
        raise ValueError(f"cannot write {suffix} images: name the output .png, .jpg or .jpeg")
    return found


def save_figure(fig: Figure, path: Path, *, fmt: str | None = None) -> Path:
    """Write ``fig`` as PNG or JPEG: ``fmt``, else after the suffix of ``path``.

    Parent folders are created.
    """
    fmt = fmt or image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    return path


def save_gray_png(image: np.ndarray, path: Path) -> Path:
    """Write a uint8 image in grey at its native size (one pixel per pixel), PNG or JPEG."""
    from matplotlib.image import imsave

    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, image, cmap="gray", vmin=0, vmax=255, format=fmt)
    return path


def window_panel(ds: Dataset, presets: Sequence[str | None], *, frame: int | None = None) -> Figure:
    """The image through each preset side by side, titled ``name (C c / W w)``.

    ``None`` in ``presets`` stands for the dataset's own window.
    """
    if not presets:
        raise ValueError('Argument "presets" must name at least one preset')
    index = frame_count(ds) // 2 if frame is None else frame
    images = [window_from_dataset(ds, preset, frame=index) for preset in presets]
    n = len(presets)
    ncols = min(n, 5)
    nrows = math.ceil(n / ncols)
    rows, cols = images[0].shape[:2]
    # Each row: the image at the column's width and its aspect, plus room for a two-line title;
    # the "compressed" layout places fixed-aspect images without cutting their titles.
    fig = new_figure(3.2 * ncols, (3.0 * rows / max(cols, 1) + 0.75) * nrows)
    fig.set_layout_engine("compressed")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_axis_off()
    for ax, preset, image in zip(axes.ravel(), presets, images, strict=False):
        if preset is None:
            own = dataset_window(ds, index)
            title = "dataset window" + (f"\nC {own[0]:g} / W {own[1]:g}" if own else "\nfull range")
        else:
            c, w = WINDOW_PRESETS[preset]
            title = f"{preset}\nC {c:g} / W {w:g}"
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    return fig


def cluster_figure(
    windowed: np.ndarray,
    cluster_map: np.ndarray,
    silhouette: float,
    *,
    tissue: np.ndarray | None = None,
    preset: str | None = None,
) -> Figure:
    """The windowed image beside its cluster map (and the CT tissue map when given)."""
    k = int(cluster_map.max()) + 1
    panels = 3 if tissue is not None else 2
    fig = new_figure(4.2 * panels, 4.6)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(windowed, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes[0].set_title(f"windowed ({preset})" if preset else "windowed (dataset window)")
    sil = "undefined" if math.isnan(silhouette) else f"{silhouette:.3f}"
    cmap = colormaps["viridis"].resampled(max(k, 2))
    axes[1].imshow(cluster_map, cmap=cmap, vmin=-0.5, vmax=max(k, 2) - 0.5, interpolation="nearest")
    axes[1].set_title("k-means clusters (0 = darkest)")
    grey = [
        float(windowed[cluster_map == c].mean()) if (cluster_map == c).any() else 0.0
        for c in range(k)
    ]
    handles = [
        Patch(facecolor=cmap(c), edgecolor="grey", label=f"{c}: mean grey {grey[c]:.0f}")
        for c in range(k)
    ]
    axes[1].legend(handles=handles, loc="lower center", fontsize=8, ncols=min(k, 3), framealpha=0.9)
    fig.suptitle(
        f"k-means on windowed intensities, k={k}, silhouette {sil} "
        "(a visualisation, not a segmentation)",
        fontsize=11,
    )
    if tissue is not None:
        colours = ListedColormap(list(_TISSUE_COLOURS))
        axes[2].imshow(
            tissue, cmap=colours, vmin=0, vmax=len(TISSUE_CLASSES) - 1, interpolation="nearest"
        )
        axes[2].set_title("CT tissue map by HU range")
        handles = [
            Patch(facecolor=_TISSUE_COLOURS[i], edgecolor="grey", label=name)
            for i, (name, _lo, _hi) in enumerate(TISSUE_CLASSES)
        ]
        axes[2].legend(handles=handles, loc="lower center", fontsize=8, ncols=3, framealpha=0.9)
    for ax in axes:
        ax.set_axis_off()
    return fig
