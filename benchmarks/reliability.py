"""Run the reliability suite and print its figures as a Markdown table (docs/reliability.md).

    uv run python benchmarks/reliability.py --full          # full sizes (long: tens of minutes)
    uv run python benchmarks/reliability.py                 # CI sizes
    uv run python benchmarks/reliability.py --full -k crash # one case

Each test of ``tests/reliability`` appends its figures as a JSON line to the file named by
``RELIABILITY_FIGURES``; this script runs pytest once (sequentially, so the sizes do not
compete for the two cores), then prints one row per case.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Case -> (what it measures, figure keys in table order, target).
CASES: dict[str, tuple[str, list[str], str]] = {
    "crash": (
        "kill -9 at seeded instants (intake, outbox write, upload, shutdown), real Orthanc",
        ["kills", "files", "lost", "duplicated", "originals_lost", "temp_left", "phases"],
        "0 / 0 / 0 / 0",
    ),
    "powercut": (
        "fsync ordering under strace: output fsync+rename, dir fsync, db sync before unlink",
        ["files", "checked", "problems", "file_fsync", "dir_fsync", "db_sync"],
        "0 problems",
    ),
    "faults": (
        "seeded fault plan through a proxy (503 +/- Retry-After, resets, lost replies, stalls,"
        " outage, 401)",
        [
            "files",
            "delivered",
            "duplicated",
            "resent",
            "outage_s",
            "outage_rps",
            "drain_s",
            "auth_s",
            "auth_rps",
            "auth_drain_s",
            "dead",
            "actions",
        ],
        "all delivered, 0 duplicated, backoff < 1 req/s",
    ),
    "lying_archive": (
        "Orthanc acknowledging every instance and storing none (Lua filter), then fixed and"
        " `gateway-agent retry`",
        [
            "files",
            "lie_s",
            "counted_delivered_during_lie",
            "outbox_files_kept",
            "dead_not_stored",
            "status_after_s",
            "not_ready_after_s",
            "window_s",
            "drain_after_retry_s",
            "delivered",
            "lost",
            "duplicated",
        ],
        "0 counted delivered, every copy kept, visible within the window, 0 lost",
    ),
    "hostile_server": (
        "a proxy answering every request with one misbehaviour for a while, then recovering (or"
        " a name that does not resolve, then the URL fixed)",
        [
            "server",
            "files",
            "fault_s",
            "status_after_s",
            "not_ready_after_s",
            "window_s",
            "requests_per_s",
            "dead",
            "drain_s",
            "lost",
            "duplicated",
        ],
        "visible within the window, 0 dead, 0 lost, backoff",
    ),
    "proper_answers": (
        "STOW-RS answers of other shapes: DICOM XML; a 202 refusing every 4th instance",
        ["answer", "files", "settled_s", "proven", "dead", "outbox_files_kept", "posts", "lost"],
        "XML: all proven; 202: exactly the refused dead (files kept), the rest proven; 0 lost",
    ),
    "hostile_direct": (
        "every mutant through Deidentifier.deidentify_file",
        ["inputs", "ok", "ingest_errors", "other_exceptions", "phi_in_outputs", "by_kind"],
        "0 other exceptions, 0 PHI",
    ),
    "hostile_daemon": (
        "mutants dropped into a running agent",
        ["inputs", "crashes", "hangs", "unaccounted", "peak_rss_mb", "peak_tree_rss_mb", "seconds"],
        "0 / 0 / 0 / < 300 MB",
    ),
    "fuzz": ("atheris on the header path", ["engine", "seconds", "runs", "crashes"], "0 crashes"),
    "diskfull": (
        "state folder on a small file system",
        ["method", "files", "paused_seen", "originals_lost", "corrupt_rows", "recovered"],
        "no loss, no corrupt row, recovery",
    ),
    "phi": (
        "planted PHI in uploads, logs, metrics, names",
        ["runs", "uploaded_bytes_hits", "log_hits", "metrics_hits", "name_hits", "mode_problems"],
        "0",
    ),
}


def _table(rows: list[dict[str, Any]]) -> str:
    by_case: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(str(r["case"]), []).append(r)
    out = ["| Case | What | Figures | Target |", "|---|---|---|---|"]
    for case, (what, keys, target) in CASES.items():
        for r in by_case.get(case, []):
            figs = "; ".join(f"{k} {r[k]}" for k in keys if k in r)
            out.append(f"| {case} | {what} | {figs} | {target} |")
    for case, rs in by_case.items():
        if case not in CASES:
            for r in rs:
                figs = "; ".join(f"{k} {v}" for k, v in r.items() if k not in ("case", "full"))
                out.append(f"| {case} | | {figs} | |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="full sizes (docs/reliability.md)")
    p.add_argument("-k", default=None, help="pytest -k expression")
    p.add_argument("--figures", type=Path, default=None, help="keep the JSON lines here")
    args = p.parse_args()
    figures = args.figures or Path(tempfile.mkstemp(prefix="reliability-", suffix=".jsonl")[1])
    figures.write_text("")
    env = dict(os.environ, RELIABILITY_FIGURES=str(figures))
    if args.full:
        env["RELIABILITY_FULL"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q"]
    cmd += ["-m", "reliability", "-o", "timeout=14400", "tests/reliability"]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    took = time.monotonic() - t0
    rows = [json.loads(line) for line in figures.read_text().splitlines() if line.strip()]
    print()
    print(
        f"Measured {dt.date.today().isoformat()} on {platform.node()} "
        f"({os.cpu_count()} cores), {'full' if args.full else 'CI'} size, "
        f"{took / 60:.1f} min, pytest exit {rc}:"
    )
    print()
    print(_table(rows))
    return rc


if __name__ == "__main__":
    sys.exit(main())
