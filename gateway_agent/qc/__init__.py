"""Fleet QC: per-scan features, the fleet model (groups, outliers, reasons), plots and reports.

Names load lazily (PEP 562), so importing the package is free until a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .archive import ArchiveQC, ArchiveRun, FeatureCache
    from .features import (
        NUMERIC_FEATURES,
        ScanFeatures,
        features_from_dataset,
        features_from_file,
        scanner_of,
    )
    from .fleet import (
        FEATURE_SCALES,
        OutlierSettings,
        cluster_fleet,
        detect_outliers,
        feature_matrix,
    )
    from .plots import plot_fleet_qc
    from .report import build_report, latest_outliers, summary_text, write_report
    from .run import analyse_fleet, find_dicom_files, run_qc, scan_directory
    from .sample import pick_spread
    from .scanners import ScannerState, scanner_states

__all__ = [
    "ArchiveQC",
    "ArchiveRun",
    "FeatureCache",
    "FEATURE_SCALES",
    "NUMERIC_FEATURES",
    "OutlierSettings",
    "ScanFeatures",
    "ScannerState",
    "analyse_fleet",
    "build_report",
    "cluster_fleet",
    "detect_outliers",
    "feature_matrix",
    "features_from_dataset",
    "features_from_file",
    "find_dicom_files",
    "latest_outliers",
    "pick_spread",
    "plot_fleet_qc",
    "run_qc",
    "scan_directory",
    "scanner_of",
    "scanner_states",
    "summary_text",
    "write_report",
]

_WHERE = {
    **dict.fromkeys(("ArchiveQC", "ArchiveRun", "FeatureCache"), "archive"),
    "pick_spread": "sample",
    **dict.fromkeys(("ScannerState", "scanner_states"), "scanners"),
    **dict.fromkeys(
        (
            "NUMERIC_FEATURES",
            "ScanFeatures",
            "features_from_dataset",
            "features_from_file",
            "scanner_of",
        ),
        "features",
    ),
    **dict.fromkeys(
        ("FEATURE_SCALES", "OutlierSettings", "cluster_fleet", "detect_outliers", "feature_matrix"),
        "fleet",
    ),
    "plot_fleet_qc": "plots",
    **dict.fromkeys(("build_report", "latest_outliers", "summary_text", "write_report"), "report"),
    **dict.fromkeys(("analyse_fleet", "find_dicom_files", "run_qc", "scan_directory"), "run"),
}


__getattr__, __dir__ = lazy_exports(
    __name__, {name: f".{module}" for name, module in _WHERE.items()}, __all__
)
