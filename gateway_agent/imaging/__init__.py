"""Imaging: stored values to HU, VOI windowing and presets, intensity clustering, CT tissue map.

Names load lazily (PEP 562): importing this package costs nothing until a name is used, so the
command line and the de-identification path do not pay for numpy or matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from .presets import WINDOW_PRESETS

if TYPE_CHECKING:
    from .cluster import (
        SILHOUETTE_SAMPLE,
        TISSUE_CLASSES,
        cluster_scan,
        dice_per_class,
        kmeans_1d,
        sampled_silhouette,
        tissue_map,
    )
    from .figures import cluster_figure, save_figure, save_gray_png, window_panel
    from .lut import (
        VOIFunction,
        apply_window,
        dataset_window,
        frame_count,
        hu_from_dataset,
        is_hu,
        modality_lut,
        window_from_dataset,
    )

__all__ = [
    "SILHOUETTE_SAMPLE",
    "TISSUE_CLASSES",
    "VOIFunction",
    "WINDOW_PRESETS",
    "apply_window",
    "cluster_figure",
    "cluster_scan",
    "dataset_window",
    "dice_per_class",
    "frame_count",
    "hu_from_dataset",
    "is_hu",
    "kmeans_1d",
    "modality_lut",
    "sampled_silhouette",
    "save_figure",
    "save_gray_png",
    "tissue_map",
    "window_from_dataset",
    "window_panel",
]

_WHERE = {
    **dict.fromkeys(
        (
            "SILHOUETTE_SAMPLE",
            "TISSUE_CLASSES",
            "cluster_scan",
            "dice_per_class",
            "kmeans_1d",
            "sampled_silhouette",
            "tissue_map",
        ),
        "cluster",
    ),
    **dict.fromkeys(("cluster_figure", "save_figure", "save_gray_png", "window_panel"), "figures"),
    **dict.fromkeys(
        (
            "VOIFunction",
            "apply_window",
            "dataset_window",
            "frame_count",
            "hu_from_dataset",
            "is_hu",
            "modality_lut",
            "window_from_dataset",
        ),
        "lut",
    ),
}


__getattr__, __dir__ = lazy_exports(
    __name__, {name: f".{module}" for name, module in _WHERE.items()}, __all__
)
