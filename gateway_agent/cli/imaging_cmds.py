"""The imaging commands: ``window`` (presets to PNG), ``cluster`` (k-means), ``qc`` (fleet)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .._exceptions import GatewayError
from ..imaging.presets import WINDOW_PRESETS
from ._help import add_command

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# numpy, pydicom, scikit-learn and matplotlib are imported inside the handlers: the parser is
# built for every command, and these imports cost about a second.

__all__ = ["register"]

_FUNCTIONS = ["LINEAR", "LINEAR_EXACT", "SIGMOID"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``window``, ``cluster`` and ``qc``."""
    presets = ", ".join(f"{n} ({c:g}/{w:g})" for n, (c, w) in WINDOW_PRESETS.items())
    win = add_command(
        sub,
        "window",
        summary="window a DICOM image to PNG (one preset, or a panel of several)",
        description=(
            "Render FILE through the dataset's own window, a --center/--width, or named presets "
            f"(centre/width in HU): {presets}. Several --preset give a titled panel."
        ),
        examples=[
            "gateway-agent window scan.dcm --preset lung -o lung.png",
            "gateway-agent window scan.dcm --all-presets -o presets.png",
        ],
    )
    win.add_argument("file", type=Path, metavar="FILE", help="a DICOM image")
    win.add_argument(
        "--preset", action="append", choices=sorted(WINDOW_PRESETS), default=None, help="repeatable"
    )
    win.add_argument("--all-presets", action="store_true", help="a panel of every preset")
    win.add_argument("--center", type=float, default=None, help="window centre (with --width)")
    win.add_argument("--width", type=float, default=None, help="window width (with --center)")
    win.add_argument("--function", choices=_FUNCTIONS, default=None, help="VOI LUT function")
    win.add_argument("--frame", type=int, default=None, help="frame of a multi-frame image")
    win.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT.png", help="PNG or JPEG (.jpg)"
    )
    win.set_defaults(func=cmd_window)

    clu = add_command(
        sub,
        "cluster",
        summary="k-means intensity clusters of a DICOM image, beside the windowed image",
        description=(
            "k-means on the windowed intensities (a visualisation, not a segmentation); for CT "
            "also the tissue map by HU range. The silhouette is in the title."
        ),
        examples=["gateway-agent cluster scan.dcm -k 3 -o clusters.png"],
    )
    clu.add_argument("file", type=Path, metavar="FILE", help="a DICOM image")
    clu.add_argument("-k", "--clusters", type=int, default=3, help="number of clusters (3)")
    clu.add_argument(
        "--preset", choices=sorted(WINDOW_PRESETS), default="soft_tissue", help="CT window"
    )
    clu.add_argument("--frame", type=int, default=None, help="frame (default: the middle one)")
    clu.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT.png", help="PNG or JPEG (.jpg)"
    )
    clu.set_defaults(func=cmd_cluster)

    qc = add_command(
        sub,
        "qc",
        summary="fleet QC of a folder or a DICOMweb archive: groups, scanners, outliers",
        description=(
            "Measure every DICOM image under DIR (recursive), or a few instances of every series "
            "of a DICOMweb archive (--dicomweb URL), group scans with k-means, flag outliers "
            "with reasons per scanner; write features.csv, report.json and fleet.png to --report."
        ),
        examples=[
            "gateway-agent qc anon/ --report qc-report/",
            "gateway-agent qc --dicomweb https://pacs.example.org/dicom-web --auth basic"
            " --username qc --password-file qc.pw --report fleet-qc/",
        ],
    )
    qc.add_argument(
        "directory", type=Path, nargs="?", metavar="DIR", help="folder of (de-identified) DICOM"
    )
    qc.add_argument("--report", type=Path, required=True, metavar="OUT/", help="report folder")
    qc.add_argument("--clusters", type=int, default=2, help="k-means groups (2)")
    qc.add_argument("--workers", type=int, default=None, help="threads (default: up to 4)")
    qc.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .qc_archive import add_archive_arguments

    add_archive_arguments(qc)
    qc.set_defaults(func=cmd_qc)


def _fail(command: str, message: str) -> int:
    print(f"gateway-agent {command}: {message}", file=sys.stderr)
    return 1


def _read(path: Path) -> Dataset:
    import pydicom

    if not path.is_file():
        raise GatewayError("FILE does not exist or is not a file")
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for malformed input
        raise GatewayError(f"FILE is not readable DICOM ({type(exc).__name__})") from None


def _quiet_logs(args: argparse.Namespace) -> None:
    from ..logs import configure  # structlog: only the commands that log pay for it

    configure(getattr(args, "log_format", None) or "auto", "warning")


def cmd_window(args: argparse.Namespace) -> int:
    """``gateway-agent window``: one PNG at native size, or a titled panel of presets."""
    from ..imaging import (
        frame_count,
        is_hu,
        save_figure,
        save_gray_png,
        window_from_dataset,
        window_panel,
    )
    from ..imaging.figures import image_format

    _quiet_logs(args)
    if (args.center is None) != (args.width is None):
        return _fail("window", "--center and --width go together")
    presets: list[str | None] = (
        list(WINDOW_PRESETS) if args.all_presets else list(args.preset or [])
    )
    try:
        image_format(args.output)
        ds = _read(args.file)
        if presets and not is_hu(ds):
            # The presets are HU ranges: through one, an MR or X-ray image comes out white.
            modality = str(ds.get("Modality", "")) or "this"
            print(
                f"gateway-agent window: warning: the presets are CT windows in HU and the "
                f"{modality} image has no HU values; using the image's own window instead",
                file=sys.stderr,
            )
            presets = []
        if len(presets) > 1:
            save_figure(window_panel(ds, presets, frame=args.frame), args.output)
            print(f"wrote {args.output} ({len(presets)} presets)")
            return 0
        frame = args.frame if args.frame is not None else frame_count(ds) // 2
        image = window_from_dataset(
            ds,
            presets[0] if presets else None,
            center=args.center,
            width=args.width,
            function=args.function,
            frame=frame,
        )
        save_gray_png(image, args.output)
    except (GatewayError, ValueError) as exc:
        return _fail("window", str(exc))
    print(f"wrote {args.output} ({image.shape[1]}x{image.shape[0]})")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    """``gateway-agent cluster``: windowed image | cluster map (| CT tissue map)."""
    from ..imaging import cluster_figure, cluster_scan, frame_count, is_hu, save_figure, tissue_map

    _quiet_logs(args)
    if args.clusters < 1:
        return _fail("cluster", "--clusters must be at least 1")
    try:
        ds = _read(args.file)
        frame = args.frame if args.frame is not None else frame_count(ds) // 2
        windowed, cluster_map, silhouette = cluster_scan(
            ds, args.clusters, args.preset, frame=frame
        )
        tissue = tissue_map(ds, frame=frame) if is_hu(ds) else None
        fig = cluster_figure(
            windowed,
            cluster_map,
            silhouette,
            tissue=tissue,
            preset=args.preset if is_hu(ds) else None,
        )
        save_figure(fig, args.output)
    except (GatewayError, ValueError) as exc:
        return _fail("cluster", str(exc))
    sil = "undefined" if math.isnan(silhouette) else f"{silhouette:.3f}"
    print(f"wrote {args.output}: k={int(cluster_map.max()) + 1}, silhouette {sil}")
    return 0


def cmd_qc(args: argparse.Namespace) -> int:
    """``gateway-agent qc``: features, groups and outliers of a folder (or an archive)."""
    _quiet_logs(args)
    if args.dicomweb is not None:
        from .qc_archive import cmd_qc_archive

        if args.directory is not None:
            return _fail("qc", "give DIR or --dicomweb URL, not both")
        return cmd_qc_archive(args)
    from ..qc import analyse_fleet, scan_directory, summary_text, write_report

    if args.directory is None:
        return _fail("qc", "give DIR (a folder) or --dicomweb URL (an archive)")
    if not args.directory.is_dir():
        return _fail("qc", "DIR is not a folder")
    if args.clusters < 1:
        return _fail("qc", "--clusters must be at least 1")
    try:
        records, failures = scan_directory(
            args.directory,
            workers=args.workers,
            progress=False if args.no_progress else None,
        )
    except GatewayError as exc:
        return _fail("qc", str(exc))
    if not records:
        print(f"QC: no measurable DICOM images under DIR ({len(failures)} skipped)")
        return 1
    _matrix, labels, silhouette = analyse_fleet(records, args.clusters)
    paths = write_report(records, labels, silhouette, args.report, failures)
    print(summary_text(records, labels, silhouette, failures))
    print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0
