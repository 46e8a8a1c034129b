"""The prototype's story end to end on the public API: de-identify, window, cluster, fleet QC.

Run:  uv run python examples/walkthrough.py [OUT_DIR]      (default ./walkthrough-out)

Every figure is saved as PNG in OUT_DIR. The script exits 1 if the fleet QC does not flag exactly
the two anomalous scans, so CI catches a regression in the story, not only a crash.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset

from gateway_agent import (
    WINDOW_PRESETS,
    anonymize_dataset,
    cluster_scan,
    plot_fleet_qc,
    run_qc,
    window_from_dataset,
)
from gateway_agent.imaging import cluster_figure, save_figure, tissue_map, window_panel
from gateway_agent.imaging.figures import new_figure
from gateway_agent.qc import summary_text, write_report
from gateway_agent.synthetic import Patient, make_ct_slice, write_series

SITE_SECRET = b"walkthrough-site-secret-0123456789"

SHOWN = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StudyDate",
    "StationName",
    "StudyInstanceUID",
    "PatientIdentityRemoved",
)


def _value(ds: Dataset, keyword: str) -> str:
    text = str(ds.get(keyword, "(absent)"))
    return text if len(text) <= 34 else text[:31] + "..."


def step(title: str) -> None:
    print(f"\n== {title}")


def deid_figure(before: Dataset, after: Dataset, path: Path) -> None:
    fig = new_figure(11.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_axis_off()
    rows = [[k, _value(before, k), _value(after, k)] for k in SHOWN]
    table = ax.table(
        cellText=rows, colLabels=["attribute", "before", "after"], loc="center", cellLoc="left"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.35)
    ax.set_title("De-identification (PS3.15 Annex E): the same instance before and after")
    save_figure(fig, path)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path("walkthrough-out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    step("1. a synthetic CT slice with planted PHI")
    original = make_ct_slice(noise_sd=14.0, seed=1)
    for keyword in SHOWN[:6]:
        print(f"  {keyword:<24} {_value(original, keyword)}")
    print(f"  pixels {original.Rows}x{original.Columns}, {original.BitsStored} bits, "
          f"rescale {original.RescaleSlope} / {original.RescaleIntercept}")  # fmt: skip

    step("2. anonymize_dataset: before and after")
    ds = anonymize_dataset(copy.deepcopy(original), station_name="EDGE01")
    for keyword in SHOWN:
        print(f"  {keyword:<24} {_value(original, keyword):<36} -> {_value(ds, keyword)}")
    deid_figure(original, ds, out / "01_deidentification.png")

    step("3. windowing through every preset")
    for name, (center, width) in WINDOW_PRESETS.items():
        image = window_from_dataset(ds, name)
        print(f"  {name:<14} C {center:>6g} W {width:>6g}  mean grey {image.mean():6.1f}")
    save_figure(window_panel(ds, list(WINDOW_PRESETS)), out / "02_window_presets.png")

    step("4. intensity clustering (a visualisation, not a segmentation)")
    windowed, cluster_map, silhouette = cluster_scan(ds, n_clusters=3, preset="soft_tissue")
    sizes = [int((cluster_map == c).sum()) for c in range(int(cluster_map.max()) + 1)]
    print(f"  k=3 on the soft-tissue window: cluster sizes {sizes}, silhouette {silhouette:.3f}")
    fig = cluster_figure(
        windowed, cluster_map, silhouette, tissue=tissue_map(ds), preset="soft_tissue"
    )
    save_figure(fig, out / "03_clusters.png")

    step("5. a fleet of 6 normal and 2 anomalous scans, de-identified, then QC")
    fleet = [
        # (edge unit, scanner settings); two scans per unit, one detuned and one noisy.
        ("EDGE01", {}),
        ("EDGE01", {}),
        ("EDGE02", {"noise_sd": 11.0}),
        ("EDGE02", {"noise_sd": 13.0}),
        ("EDGE03", {"noise_sd": 12.5}),
        ("EDGE03", {"air_offset": 120.0}),  # detuned: air reads about -900 HU
        ("EDGE04", {"noise_sd": 10.5}),
        ("EDGE04", {"noise_sd": 40.0}),  # noisy tube or detector
    ]
    expected = {5: "air_mean", 7: "noise"}
    with tempfile.TemporaryDirectory(prefix="walkthrough-") as tmp:
        folder = Path(tmp)
        for i, (unit, settings) in enumerate(fleet):
            scan = make_ct_slice(
                rows=256,
                cols=256,
                patient=Patient(name=f"PHIDOE^PATIENT{i}", patient_id=f"PHIMRN{i:04d}"),
                study_seed=f"walkthrough-{i}",
                seed=100 + i,
                model="Scanner 3000" if unit in ("EDGE01", "EDGE02") else "Scanner 4000",
                station_name=f"CT-{unit[-2:]}",  # one scanner behind each edge unit
                device_serial=f"SN-{unit[-2:]}",
                **{"noise_sd": 12.0, **settings},  # type: ignore[arg-type]
            )
            # One site secret: a scanner keeps its pseudonym (DeviceSerialNumber) across scans.
            anonymize_dataset(scan, station_name=unit, secret=SITE_SECRET)
            write_series([scan], folder / unit, prefix=f"SCAN{i}_")
        records, _matrix, labels, silhouette = run_qc(folder, n_clusters=2, progress=False)
    by_scan = {int(r.file.split("SCAN")[1].split("_")[0]): r for r in records}
    print(summary_text(records, labels, silhouette))
    save_figure(plot_fleet_qc(records, labels, silhouette), out / "04_fleet_qc.png")
    write_report(records, labels, silhouette, out / "qc-report")

    flagged = {i: r.reasons[0].split()[0] for i, r in by_scan.items() if r.outlier}
    print(f"\n  flagged scans: {flagged} (expected {expected})")
    print(f"  figures in {out}/ ({time.perf_counter() - started:.1f} s)")
    for png in sorted(out.rglob("*.png")):
        print(f"    {png.relative_to(out)}  {png.stat().st_size // 1024} KiB")
    if flagged != expected:
        print("walkthrough: the fleet QC did not flag exactly the two anomalies", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
