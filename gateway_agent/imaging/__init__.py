"""Imaging: stored values to HU, VOI windowing and presets, intensity clustering, CT tissue map."""

from __future__ import annotations

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
    WINDOW_PRESETS,
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
