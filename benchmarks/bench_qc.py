"""Per-slice cost of QC and imaging on 512x512 CT: features, windowing, clustering, tissue map.

Run::

    uv run python benchmarks/bench_qc.py [--repeat 30] [--files 200] [--size 512]

Prints a Markdown table of per-slice wall time (median and p90 over ``--repeat`` runs, one
thread, warm caches) for each step on one synthetic CT slice, then the throughput of
``run_qc`` on ``--files`` slices written to a temporary folder with 1 and 2 worker threads
(read + features + fleet model), and its CPU time per slice; finally the periodic QC job's
CPU share (its thread's CPU time / wall time) while rows arrive in a real Outbox (SQLite file)
at ``--ingest-rate`` rows/s (300/s: about the uploader's measured ceiling on this VM), for
series of 100 slices (CT) and of 1 instance (CR/DX: every instance is a sampling candidate),
with the default sampling and CPU budget. Last, the fleet model's numerical methods
(gateway_agent.imaging.numeric) next to the scikit-learn and SciPy calls they replace, on
``--fleet-records`` rows of 8 features (5000: the QC job's cap), in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from gateway_agent.imaging import cluster_scan, hu_from_dataset, tissue_map, window_from_dataset
from gateway_agent.qc import features_from_dataset, features_from_file, run_qc
from gateway_agent.synthetic import make_ct_series, make_ct_slice, write_series

__all__ = ["main"]


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    fn()  # warm-up (imports, first allocation)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.9 * len(samples)))]


def bench_job(
    size: int, seconds: float, interval: float, rate: float, series_slices: int
) -> tuple[float, float, int, int, int, float]:
    """The QC job's CPU while rows arrive in a real Outbox at ``rate`` rows/s.

    Returns ``(rows/s, CPU share of one core, runs, sampled, skipped_budget, CPU s per run)``.
    """
    from gateway_agent.agent.outbox.store import Outbox
    from gateway_agent.agent.service.qcjob import QCJob
    from gateway_agent.config import QCSettings

    with tempfile.TemporaryDirectory(prefix="bench-qcjob-") as tmp:
        state = Path(tmp) / "state"
        # 40 real files; rows point at them in turn under new series/instance UIDs.
        files = write_series(
            make_ct_series(40, study_seed="job", rows=size, cols=size, plant_phi=False),
            state / "outbox",
        )
        outbox = Outbox(state / "outbox.db")
        job = QCJob(outbox, state, QCSettings(interval_seconds=interval))  # default sampling
        stop = threading.Event()
        added = 0

        def ingest() -> None:
            nonlocal added
            start = time.perf_counter()
            while not stop.is_set():
                due = start + added / rate
                if due > time.perf_counter():
                    stop.wait(due - time.perf_counter())
                    continue
                path = files[added % len(files)]
                outbox.add(
                    sop_instance_uid=f"2.25.{10**20 + added}",
                    study_instance_uid="2.25.1",
                    series_instance_uid=f"2.25.{10**19 + added // series_slices}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    path=path,
                    size=path.stat().st_size,
                    audit={},
                )
                added += 1

        feeder = threading.Thread(target=ingest, name="ingest")
        t0 = time.perf_counter()
        feeder.start()
        job.start()
        time.sleep(seconds)
        stop.set()
        feeder.join()
        wall = time.perf_counter() - t0
        job.stop()
        outbox.close()
        runs = int(job.stats["runs"])
        cpu = job.stats["cpu_seconds"]
        return (
            added / wall,
            cpu / wall,
            runs,
            int(job.stats["sampled"]),
            int(job.stats["skipped_budget"]),
            cpu / max(runs, 1),
        )


def bench_numeric(records: int, size: int, repeat: int) -> None:
    """The fleet model's methods next to the scikit-learn / SciPy calls they replace."""
    import numpy as np
    from scipy import ndimage
    from sklearn.cluster import KMeans
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import silhouette_score as sk_silhouette

    from gateway_agent.imaging.numeric import (
        border_connected,
        isolation_scores,
        kmeans,
        silhouette_score,
    )
    from gateway_agent.synthetic import ct_phantom_hu

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (records // 2, 8)), rng.normal(3, 1, (records // 2, 8))])
    labels = (np.arange(x.shape[0]) >= records // 2).astype(np.int64)
    sample = x[: min(2000, x.shape[0])]
    sample_labels = labels[: sample.shape[0]]
    if np.unique(sample_labels).size < 2:
        sample_labels = np.arange(sample.shape[0]) % 2
    background = ct_phantom_hu(size, size)[0] <= -500
    pairs: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            f"k-means k=2, 10 inits, {x.shape[0]}x8",
            lambda: kmeans(x, 2, seed=0),
            lambda: KMeans(n_clusters=2, n_init=10, random_state=0).fit(x),
        ),
        (
            f"isolation forest, 200 trees, {x.shape[0]}x8",
            lambda: isolation_scores(x, seed=0),
            lambda: IsolationForest(n_estimators=200, random_state=0).fit(x).score_samples(x),
        ),
        (
            f"silhouette, {sample.shape[0]} samples",
            lambda: silhouette_score(sample, sample_labels),
            lambda: sk_silhouette(sample, sample_labels),
        ),
        (
            f"border-connected background, {size}x{size}",
            lambda: border_connected(background),
            lambda: ndimage.label(background),
        ),
    ]
    print("\n## Fleet model: gateway_agent.imaging.numeric and the library call it replaces\n")
    print("| method | numeric ms | scikit-learn / SciPy ms | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs in pairs:
        a, _ = _time(ours, repeat)
        b, _ = _time(theirs, repeat)
        print(f"| {name} | {a * 1000:.1f} | {b * 1000:.1f} | {a / b:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--job-seconds", type=float, default=130.0, help="0 skips the job part")
    parser.add_argument("--job-interval", type=float, default=60.0)
    parser.add_argument("--ingest-rate", type=float, default=300.0, help="outbox rows/s")
    parser.add_argument("--fleet-records", type=int, default=5000, help="0 skips the comparison")
    args = parser.parse_args(argv)

    ds = make_ct_slice(rows=args.size, cols=args.size, noise_sd=15.0)
    with tempfile.TemporaryDirectory(prefix="bench-qc-") as tmp:
        one = write_series([ds], Path(tmp) / "one")[0]
        steps: list[tuple[str, Callable[[], object]]] = [
            ("read file (dcmread + pixels)", lambda: hu_from_dataset(pydicom.dcmread(one))),
            ("HU (modality LUT)", lambda: hu_from_dataset(ds)),
            ("window (soft_tissue preset)", lambda: window_from_dataset(ds, "soft_tissue")),
            ("features (from dataset)", lambda: features_from_dataset(ds)),
            ("features (from file)", lambda: features_from_file(one)),
            ("cluster_scan k=3 (+ silhouette)", lambda: cluster_scan(ds, 3)),
            ("tissue map (HU ranges)", lambda: tissue_map(ds)),
        ]
        print(f"## Per slice, {args.size}x{args.size} CT, {args.repeat} runs, one thread\n")
        print("| step | median ms | p90 ms |")
        print("|---|---:|---:|")
        for name, fn in steps:
            med, p90 = _time(fn, args.repeat)
            print(f"| {name} | {med * 1000:.1f} | {p90 * 1000:.1f} |")

        folder = Path(tmp) / "fleet"
        per_series = 20
        for s in range(max(1, args.files // per_series)):
            series = make_ct_series(
                per_series,
                study_seed=f"bench-{s}",
                rows=args.size,
                cols=args.size,
                station_name=f"EDGE{s % 4:02d}",
                plant_phi=False,
            )
            write_series(series, folder / f"s{s:03d}")
        n = sum(1 for _ in folder.rglob("*.dcm"))
        print(
            f"\n## run_qc on {n} files ({args.size}x{args.size}), read + features + fleet model\n"
        )
        print("| workers | wall s | slices/s | CPU ms per slice |")
        print("|---:|---:|---:|---:|")
        for workers in (1, 2):
            cpu0, t0 = time.process_time(), time.perf_counter()
            records, _m, _l, _s = run_qc(folder, workers=workers, progress=False)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            assert len(records) == n
            print(f"| {workers} | {wall:.2f} | {n / wall:.0f} | {cpu / n * 1000:.1f} |")
    if args.job_seconds > 0:
        print(
            f"\n## QC job during ingest: {args.size}x{args.size}, {args.job_seconds:.0f} s, "
            f"interval {args.job_interval:g} s, default sampling (3 slices/series, 5 % budget)\n"
        )
        print(
            "| series size | rows/s | QC runs | sampled | over budget | CPU s/run | QC CPU share |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for series_slices in (100, 1):
            rate, share, runs, sampled, skipped, per_run = bench_job(
                args.size, args.job_seconds, args.job_interval, args.ingest_rate, series_slices
            )
            print(
                f"| {series_slices} | {rate:.0f} | {runs} | {sampled} | {skipped} "
                f"| {per_run:.2f} | {100 * share:.1f} % of one core |"
            )
    if args.fleet_records > 0:
        bench_numeric(args.fleet_records, args.size, max(3, args.repeat // 10))
    versions = f"python {sys.version.split()[0]}, pydicom {pydicom.__version__}"
    print(f"\n(cpu count {os.cpu_count()}, {versions})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
