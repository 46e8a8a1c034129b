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
    "operators": (
        "status and retry run again and again beside a running agent, then kill -9",
        [
            "commands",
            "files",
            "failed_commands",
            "deleted_fds",
            "rows_before_kill",
            "rows_after_kill",
            "lost",
            "command_s",
        ],
        "0 deleted descriptors, every row",
    ),
    "two_agents": (
        "a second agent on the state folder in use, and one on the inbox in use",
        ["files", "second_exit", "second_requeued", "duplicated", "lost"],
        "exit 2, nothing requeued, 0 / 0",
    ),
    "secret": (
        "the site secret replaced, then missing, with rows queued; restored; --new-secret",
        [
            "rows",
            "exit_replaced",
            "exit_missing",
            "secret_created_when_missing",
            "delivered_after_restore",
            "new_secret_accepted",
        ],
        "exit 2 / exit 2 / no new secret / all",
    ),
    "damaged_db": (
        "outbox.db truncated, header overwritten, random pages overwritten, between two runs",
        ["damage", "rows", "lost", "resent", "kept_aside", "agent_alive"],
        "0 lost, damaged file kept, agent runs",
    ),
    "sighup": (
        "SIGHUP while files flow, and with a changed destination",
        ["files", "alive_after_sighup", "lost", "exit"],
        "alive, 0 lost",
    ),
    "corrected": (
        "a second version of each delivered instance (same SOP Instance UID, corrected patient)",
        ["instances", "corrected_delivered", "logged"],
        "all corrected versions delivered",
    ),
    "chunked_writer": (
        "files written in 9 open/append/close rounds",
        ["files", "rounds", "delivered", "quarantined"],
        "all delivered, 0 quarantined",
    ),
    "replaced_file": (
        "a file replaced under its name (rsync-style or in place) while the agent commits it",
        ["pairs", "replaced_while_committing", "lost", "first_versions_delivered"],
        "0 lost",
    ),
    "inbox_recreated": (
        "the inbox deleted and recreated, then moved away and a new one made",
        [
            "recreated_delivery_s",
            "moved_delivery_s",
            "readyz_while_missing",
            "status_while_missing",
        ],
        "delivered in seconds, missing said",
    ),
    "names": (
        "inbox names that are not UTF-8 (delete, keep, archive)",
        ["originals", "names", "delivered", "taken_again", "errors_logged", "names_logged"],
        "all, 0 / 0 / 0",
    ),
    "readonly_inbox": (
        'a read-only inbox with originals = "delete", restarts',
        ["method", "files", "restarts", "redone", "errors_logged", "readyz", "status_undeletable"],
        "0 redone, said",
    ),
    "long_names": (
        "255-byte names (quarantine, retry, archive collision) and a path past PATH_MAX",
        [
            "retry_exit",
            "retry_traceback",
            "name_on_terminal",
            "archived",
            "long_name_left_in_inbox",
            "deep_file_accounted",
        ],
        "no traceback, no name, all taken",
    ),
    "clock": (
        "the wall clock set back a day in a backoff, a day on in flight, 4 days on in an outage",
        [
            "jump",
            "files",
            "delivered",
            "delivery_after_recovery_s",
            "duplicated",
            "dead",
            "jumps_logged",
        ],
        "all delivered, 0 duplicated, 0 dead",
    ),
    "large_inbox": (
        "an inbox full of small files when the agent starts",
        [
            "files",
            "first_delivery_s",
            "status_before_s",
            "status_before_shows",
            "status_drain_s",
            "status_drain_median_s",
            "status_drain_runs",
            "status_drain_shows",
            "drain_s",
            "files_per_s",
            "peak_main_rss_mb",
            "peak_tree_pss_mb",
            "peak_tree_rss_mb",
            "lost",
        ],
        "< 150 MB together, first delivery in 1-2 s, status < 1 s",
    ),
    "large_multiframe": (
        "a large multi-frame CT in a memory cgroup, QC sampling it",
        [
            "megabytes",
            "limit_mb",
            "oom_kills",
            "alive",
            "tree_pss_before_mb",
            "peak_tree_pss_after_mb",
            "delivered",
        ],
        "0 OOM kills, delivered",
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
