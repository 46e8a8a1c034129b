"""Named CT reading windows (center, width in HU); no heavy imports, so the CLI can list them."""

from __future__ import annotations

__all__ = ["WINDOW_PRESETS"]

#: Named CT windows in HU as ``(center, width)`` (the usual radiology reading windows).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "soft_tissue": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (60.0, 400.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
