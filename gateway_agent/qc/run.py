"""QC of a folder: find DICOM images recursively, features in parallel, then the fleet model."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .._exceptions import QCError
from ..logs import get_logger
from .features import ScanFeatures, features_from_file
from .fleet import OutlierSettings, cluster_fleet, detect_outliers, feature_matrix
from .progress import Progress

__all__ = ["Progress", "analyse_fleet", "find_dicom_files", "run_qc", "scan_directory"]

log = get_logger()

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima", ""}


def _is_dicom_candidate(path: Path) -> bool:
    """Part-10 magic at byte 128, or a name a scanner would give a raw dataset."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return path.suffix.lower() in _DICOM_SUFFIXES and len(head) >= 8


def find_dicom_files(directory: Path) -> list[Path]:
    """Every file under ``directory`` (recursive, sorted) that looks like DICOM."""
    if not directory.is_dir():
        raise QCError("QC input is not a folder")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [p for p in files if _is_dicom_candidate(p)]


def scan_directory(
    directory: Path,
    *,
    workers: int | None = None,
    progress: bool | None = None,
) -> tuple[list[ScanFeatures], list[tuple[str, str]]]:
    """Features of every DICOM image under ``directory``: ``(records, failures)``.

    ``failures`` lists ``(relative file, reason)`` for files that look like DICOM but could not be
    measured (no pixel data, colour, undecodable); they never stop the run.
    """
    directory = Path(directory)
    files = find_dicom_files(directory)
    bar = Progress(len(files), enabled=progress)
    n_workers = workers or min(4, os.cpu_count() or 1)

    def one(path: Path) -> ScanFeatures | tuple[str, str]:
        try:
            return features_from_file(path, root=directory)
        except QCError as exc:
            return (str(path.relative_to(directory)), str(exc))
        finally:
            bar.step()

    records: list[ScanFeatures] = []
    failures: list[tuple[str, str]] = []
    results: Iterable[ScanFeatures | tuple[str, str]]
    # pydicom warns about odd values of real-world files: printed, the warnings would break the
    # progress line, and their text may quote header values. They are counted, and logged as a
    # count by category once the bar is done.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if n_workers > 1 and len(files) > 1:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="qc") as pool:
                results = list(pool.map(one, files))
        else:
            results = [one(p) for p in files]
    if caught:
        by_category = Counter(w.category.__name__ for w in caught)
        log.info("qc_read_warnings", count=len(caught), categories=dict(by_category))
    for result in results:
        if isinstance(result, ScanFeatures):
            records.append(result)
        else:
            failures.append(result)
    log.info("qc_scanned", images=len(records), failed=len(failures))
    return records, failures


def analyse_fleet(
    records: list[ScanFeatures],
    n_clusters: int = 2,
    *,
    settings: OutlierSettings | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit the fleet model on ``records`` (updated in place): ``(matrix, labels, silhouette)``."""
    matrix = feature_matrix(records)
    labels, silhouette = cluster_fleet(matrix, n_clusters)
    for record, label in zip(records, labels, strict=True):
        record.group = int(label)
    detect_outliers(records, matrix, settings)
    return matrix, labels, silhouette


def run_qc(
    directory: Path | str,
    n_clusters: int = 2,
    *,
    workers: int | None = None,
    progress: bool | None = None,
    on_failures: Callable[[list[tuple[str, str]]], None] | None = None,
) -> tuple[list[ScanFeatures], np.ndarray, np.ndarray, float]:
    """QC of every DICOM image under ``directory``: features, fleet groups and outliers.

    Features per image (recursive, in parallel threads), the standardised feature matrix,
    k-means labels and their silhouette, and the outlier model: each record gets ``group``,
    ``outlier`` and ``reasons``. Files that look like DICOM but cannot be measured are skipped
    and passed to ``on_failures``. Nothing is printed except the progress bar (on a terminal,
    or with ``progress=True``); events go to the ``gateway_agent`` logger.

    Parameters
    ----------
    directory
        The folder to scan, recursively.
    n_clusters
        The number of k-means groups of the fleet.
    workers
        Threads measuring images (default: up to 4).
    progress
        Show a progress bar on stderr; default: only when stderr is a terminal.
    on_failures
        Called once with ``[(file relative to directory, reason), ...]`` of skipped files.

    Returns
    -------
    records : list[ScanFeatures]
        One per measured image, in file order.
    matrix : numpy.ndarray
        The standardised feature matrix, one row per record.
    labels : numpy.ndarray
        The k-means group of each record.
    silhouette : float
        The silhouette of the grouping (NaN when undefined).

    Raises
    ------
    QCError
        ``directory`` is not a folder.
    """
    records, failures = scan_directory(Path(directory), workers=workers, progress=progress)
    if on_failures is not None:
        on_failures(failures)
    matrix, labels, silhouette = analyse_fleet(records, n_clusters)
    return records, matrix, labels, silhouette
