"""``/metrics`` of an edge box with per-scanner QC gauges: render time and size by fleet size.

Run::

    uv run python benchmarks/bench_metrics.py [--scanners 0,20,200,1000] [--scrapes 200]

Starts the agent's real metrics server (``HealthServer``, with the scrape-time gauges read from a
real outbox database holding 10,000 rows) and publishes QC states for N scanners (one modality,
every scanner flagged on one reason, so every per-scanner gauge has a sample). For each N it
times ``GET /metrics`` over HTTP (median and p95 of ``--scrapes`` requests, one client, what a
Prometheus scrape costs the box) and reports the body size and the number of samples, side by
side with N = 0 (the agent without per-scanner gauges).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from gateway_agent.agent.metrics import SCANNER_QC
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.service.health import HealthServer
from gateway_agent.qc import ScannerState

__all__ = ["main"]


def _states(n: int, now: float) -> list[ScannerState]:
    return [
        ScannerState(
            scanner=f"SCN-{i:012X}",
            modality="CT",
            noise=12.0 + i % 7 * 0.1,
            air_mean=-1000.0 + i % 5,
            snr=80.0,
            density=-120.0,
            instances=300,
            outlier=True,
            reasons=("air_mean",),
            last_measured=now - i,
        )
        for i in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scanners", default="0,20,200,1000", help="fleet sizes, comma-separated")
    p.add_argument("--scrapes", type=int, default=200)
    p.add_argument("--rows", type=int, default=10_000, help="outbox rows behind the gauges")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.scanners.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        outbox = Outbox(Path(tmp) / "outbox.db")
        outbox.add_many(
            [
                {
                    "sop_instance_uid": f"2.25.{i}",
                    "study_instance_uid": "2.25.1",
                    "series_instance_uid": f"2.25.2.{i // 100}",
                    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                    "path": Path(tmp) / f"{i}.dcm",
                    "size": 500_000,
                    "audit": {},
                }
                for i in range(args.rows)
            ]
        )
        server = HealthServer(port=0, destination_report=outbox.destination_report).start()
        client = httpx.Client(base_url=server.url, timeout=30)
        try:
            for n in sizes:
                SCANNER_QC.publish(_states(n, time.time()), max_scanners=max(sizes) or 1)
                body = client.get("/metrics").content  # warm-up
                times = []
                for _ in range(args.scrapes):
                    t0 = time.perf_counter()
                    body = client.get("/metrics").content
                    times.append(time.perf_counter() - t0)
                times.sort()
                samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
                rows.append(
                    (
                        n,
                        statistics.median(times) * 1000,
                        times[int(0.95 * (len(times) - 1))] * 1000,
                        len(body),
                        samples,
                    )
                )
        finally:
            SCANNER_QC.clear()
            client.close()
            server.stop()
            outbox.close()
    base = rows[0][1] if rows and rows[0][0] == 0 else None
    print(f"GET /metrics over HTTP, {args.scrapes} scrapes each; outbox of {args.rows} rows\n")
    print("| scanners | median ms | p95 ms | vs no scanners | body kB | samples |")
    print("|---|---|---|---|---|---|")
    for n, median, p95, size, samples in rows:
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"| {n} | {median:.2f} | {p95:.2f} | {ratio} | {size / 1000:.1f} | {samples} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
