"""gateway-agent's public API: de-identification, imaging, QC, exceptions (loaded lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from ._exceptions import (
        REASONS,
        ConfigError,
        DeidError,
        GatewayError,
        IngestError,
        PermanentUploadError,
        QCError,
        RetryableUploadError,
        UploadError,
    )
    from .agent.service.daemon import Daemon
    from .config import Settings, load_settings
    from .deid import (
        TAGS_TO_REMOVE,
        Deidentifier,
        DeidOptions,
        DeidResult,
        anonymize_dataset,
        load_or_create_secret,
    )
    from .imaging import (
        WINDOW_PRESETS,
        cluster_scan,
        hu_from_dataset,
        tissue_map,
        window_from_dataset,
    )
    from .qc import ScanFeatures, plot_fleet_qc, run_qc

from ._version import __version__

# name -> submodule that defines it. Loading is lazy: the CLI's hot paths (``anonymize``) must not
# pay for numpy, pydantic, scikit-learn or matplotlib when they do not use them.
_EXPORTS: dict[str, str] = {
    "REASONS": "._exceptions",
    "ConfigError": "._exceptions",
    "DeidError": "._exceptions",
    "GatewayError": "._exceptions",
    "IngestError": "._exceptions",
    "PermanentUploadError": "._exceptions",
    "QCError": "._exceptions",
    "RetryableUploadError": "._exceptions",
    "UploadError": "._exceptions",
    "Settings": ".config",
    "load_settings": ".config",
    "TAGS_TO_REMOVE": ".deid",
    "DeidOptions": ".deid",
    "DeidResult": ".deid",
    "Deidentifier": ".deid",
    "anonymize_dataset": ".deid",
    "load_or_create_secret": ".deid",
    "WINDOW_PRESETS": ".imaging",
    "window_from_dataset": ".imaging",
    "hu_from_dataset": ".imaging",
    "cluster_scan": ".imaging",
    "tissue_map": ".imaging",
    "ScanFeatures": ".qc",
    "run_qc": ".qc",
    "plot_fleet_qc": ".qc",
    "Daemon": ".agent.service.daemon",
}

__all__ = [
    "ConfigError",
    "Daemon",
    "DeidError",
    "DeidOptions",
    "DeidResult",
    "Deidentifier",
    "GatewayError",
    "IngestError",
    "PermanentUploadError",
    "QCError",
    "REASONS",
    "RetryableUploadError",
    "ScanFeatures",
    "Settings",
    "TAGS_TO_REMOVE",
    "UploadError",
    "WINDOW_PRESETS",
    "__version__",
    "anonymize_dataset",
    "cluster_scan",
    "hu_from_dataset",
    "load_or_create_secret",
    "load_settings",
    "plot_fleet_qc",
    "run_qc",
    "tissue_map",
    "window_from_dataset",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
