"""Fleet QC: per-scan features, the fleet model (groups, outliers, reasons), plots and reports."""

from __future__ import annotations

from .features import NUMERIC_FEATURES, ScanFeatures, features_from_dataset, features_from_file
from .fleet import FEATURE_SCALES, OutlierSettings, cluster_fleet, detect_outliers, feature_matrix
from .plots import plot_fleet_qc
from .report import build_report, latest_outliers, summary_text, write_report
from .run import analyse_fleet, find_dicom_files, run_qc, scan_directory

__all__ = [
    "FEATURE_SCALES",
    "NUMERIC_FEATURES",
    "OutlierSettings",
    "ScanFeatures",
    "analyse_fleet",
    "build_report",
    "cluster_fleet",
    "detect_outliers",
    "feature_matrix",
    "features_from_dataset",
    "features_from_file",
    "find_dicom_files",
    "latest_outliers",
    "plot_fleet_qc",
    "run_qc",
    "scan_directory",
    "summary_text",
    "write_report",
]
