"""Scale: an inbox full of files when the agent starts (200,000 at full size), and a 500 MB
multi-frame instance under a memory limit.

Memory is measured for the agent and its workers together: the sum of their RSS, and the sum of
their PSS (``/proc/<pid>/smaps_rollup``: pages shared after the fork server's fork counted once).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.cli.agent_cmds import INBOX_COUNT_LIMIT
from gateway_agent.synthetic import make_ct_slice
from tests._procs import descendants
from tests.conftest import IN_CI, require

from ._accidents import ct_bytes, multiframe_file
from ._harness import AgentRun, record_figures, size, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

MB = 1024 * 1024


def _tree_memory(pid: int) -> tuple[float, float]:
    """``(sum of RSS, sum of PSS)`` in MiB over ``pid`` and its descendants."""
    rss = pss = 0.0
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
    return rss, pss


class Sampler(threading.Thread):
    """Peak memory of the agent's process tree, sampled every ``interval`` seconds."""

    def __init__(self, run: AgentRun, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.run_, self.interval = run, interval
        self.peak_rss = self.peak_pss = self.peak_main = 0.0
        self.stop_event = threading.Event()

    def current_pss(self) -> float:
        agent = self.run_.agent
        return _tree_memory(agent.pid)[1] if agent.alive() else 0.0

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            agent = self.run_.agent
            if not agent.alive():
                continue
            rss, pss = _tree_memory(agent.pid)
            main, _ = _tree_memory_one(agent.pid)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_main = max(self.peak_main, main)


def _tree_memory_one(pid: int) -> tuple[float, float]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0, 0.0
    values = {ln.split()[0]: int(ln.split()[1]) / 1024 for ln in text.splitlines()[1:]}
    return values.get("Rss:", 0.0), values.get("Pss:", 0.0)


def _many_files(inbox: Path, n: int) -> None:
    """``n`` small CT files (unique SOP Instance UIDs) in folders of 10,000, old enough to be
    taken at once (a backlog that waited while the agent was down)."""
    template = io.BytesIO()
    ds = make_ct_slice(rows=16, cols=16, study_seed="backlog")
    uid = str(ds.SOPInstanceUID)
    ds.save_as(template, enforce_file_format=True)
    data = template.getvalue()
    assert data.count(uid.encode()) == 2  # file meta and data set
    head, width = uid[: len(uid) - 8], 8
    old = time.time() - 3600
    for i in range(n):
        folder = inbox / f"batch{i // 10_000:03d}"
        if i % 10_000 == 0:
            folder.mkdir()
        new = f"{head}{i:0{width}d}"[: len(uid)]
        path = folder / f"PHIDOE_{i:06d}.dcm"
        path.write_bytes(data.replace(uid.encode(), new.encode()))
        os.utime(path, (old, old))


def _timed_status(run: AgentRun) -> tuple[float, dict[str, Any]]:
    """``gateway-agent status --json`` as an operator runs it (an installed package: Python may
    keep its compiled modules), timed from the command to its answer; and its answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(run.agent.env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "gateway_agent", "--config", str(run.config), "status", "--json"],
        cwd=run.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    return took, json.loads(done.stdout)


def _shown(inbox: dict[str, Any]) -> str:
    """The inbox count as ``status`` prints it."""
    return f"more than {inbox['waiting']}" if inbox["waiting_capped"] else str(inbox["waiting"])


def test_a_large_inbox_at_start_up(tmp_path: Path, agent_run: Any) -> None:
    """The whole backlog is delivered with bounded memory; ``status`` answers before the agent
    starts and while it drains the inbox, with a count it can stand behind."""
    n = size(20_000, 200_000)
    run = agent_run(overrides={"intake_workers": 2})
    _many_files(run.inbox, n)
    _timed_status(run)  # Python's compiled modules, as on an installed system
    status_before_s, before = _timed_status(run)
    sampler = Sampler(run)
    t0 = time.monotonic()
    run.start()
    sampler.start()
    first = None
    during: list[tuple[float, dict[str, Any]]] = []
    try:
        wait_until(lambda: run.dest.exists() and any(run.dest.rglob("*.dcm")), 120, interval=0.02)
        first = time.monotonic() - t0
        every = size(10, 30)  # seconds between two status while the agent drains the inbox
        end, last = time.monotonic() + size(600, 3600), 0.0
        while any(run.inbox.rglob("*.dcm")):
            assert time.monotonic() < end, "drain"
            if time.monotonic() - last >= every:
                last = time.monotonic()
                during.append(_timed_status(run))
            time.sleep(1.0)
        drained = time.monotonic() - t0
        wait_until(lambda: len(run.delivered_uids()) >= n, 300, interval=1.0, what="delivered")
    finally:
        sampler.stop_event.set()
        run.agent.stop()
    delivered = len(run.delivered_uids())
    assert during, "no status while the agent drained the inbox"
    figures = {
        "files": n,
        "first_delivery_s": round(first or -1, 2),
        "status_before_s": round(status_before_s, 2),
        "status_before_shows": _shown(before["inbox"]),
        "status_drain_s": round(max(t for t, _ in during), 2),
        "status_drain_median_s": round(statistics.median(t for t, _ in during), 2),
        "status_drain_runs": len(during),
        "status_drain_shows": " to ".join(_shown(st["inbox"]) for _, st in (during[0], during[-1])),
        "drain_s": round(drained, 1),
        "files_per_s": round(n / drained, 1),
        "peak_main_rss_mb": round(sampler.peak_main, 1),
        "peak_tree_rss_mb": round(sampler.peak_rss, 1),
        "peak_tree_pss_mb": round(sampler.peak_pss, 1),
        "lost": n - delivered,
    }
    record_figures("large_inbox", figures)
    assert delivered == n, figures
    # The bound is the point: memory does not grow with the files waiting.
    assert sampler.peak_pss < 150, figures
    # What status shows: every file before the drain (or "more than" its limit, with the oldest
    # file's age as a lower bound), then a count that goes down as it drains.
    inbox = before["inbox"]
    assert inbox["waiting_capped"] == (n > INBOX_COUNT_LIMIT), inbox
    assert inbox["waiting"] == min(n, INBOX_COUNT_LIMIT), inbox
    assert inbox["oldest_seconds"] >= 3600 and not inbox["oldest_exact"], inbox
    # Files only leave the inbox: each count is at most the one before, and the last is below
    # the first unless the limit capped it.
    counts = [st["inbox"]["waiting"] for _, st in during]
    assert all(0 <= c <= min(n, INBOX_COUNT_LIMIT) for c in counts), figures
    assert all(b <= a for a, b in itertools.pairwise(counts)), counts
    assert counts[-1] < counts[0] or during[-1][1]["inbox"]["waiting_capped"], counts


# --------------------------------------------------------------------------- a large multi-frame


def _memory_cgroup(limit_mb: int) -> Path | None:
    """A memory cgroup (v2, else v1) with ``limit_mb``, as root; None where none can be made."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists():
        group = v2 / f"gateway-test-{os.getpid()}"
        try:
            group.mkdir()
            (group / "memory.max").write_text(str(limit_mb * MB))
            (group / "memory.swap.max").write_text("0")
        except OSError:
            return None
        return group
    own = Path("/proc/self/cgroup").read_text()
    line = next((ln for ln in own.splitlines() if ":memory:" in ln), None)
    if line is None:
        return None
    base = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/")
    group = base / f"gateway-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_mb * MB))
        with contextlib.suppress(OSError):
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mb * MB))
    except OSError:
        return None
    return group


def test_a_large_multiframe_under_a_memory_limit(tmp_path: Path, agent_run: Any) -> None:
    """A multi-frame far larger than one frame: delivered, and QC (which samples it) never reads
    it whole. The agent runs in a memory cgroup (limit ``limit_mb``) when one can be made; the
    memory of its processes is measured either way: the peak after the object arrived, against
    the same agent before (QC's libraries already loaded by a pass over a small instance)."""
    megabytes, limit_mb = size(120, 500), size(250, 400)
    run = agent_run(
        overrides={"qc": {"enabled": True, "interval_seconds": 1.0, "max_cpu_fraction": 1.0}}
    )
    multiframe_file(run.staging / "PHIDOE_big.dcm", megabytes)
    (run.staging / "PHIDOE_small.dcm").write_bytes(ct_bytes(0, study="small"))
    group = _memory_cgroup(limit_mb)
    if group is None:
        require(not IN_CI, "a memory cgroup (root)")
    sampler = Sampler(run)

    def qc_passes(sampled: int) -> int:
        return sum(
            '"qc_run"' in ln and f'"sampled": {sampled}' in ln for ln in run.agent.log_lines()
        )

    try:
        run.start()
        if group is not None:
            # At once, before the agent forks its workers (they inherit the group).
            (group / "cgroup.procs").write_text(str(run.agent.pid))
        sampler.start()
        run.feed("PHIDOE_small.dcm")
        wait_until(lambda: qc_passes(1) >= 1, 120, what="a QC pass over the small instance")
        time.sleep(2.0)
        before = sampler.current_pss()
        sampler.peak_pss = 0.0
        run.feed("PHIDOE_big.dcm")
        wait_until(lambda: len(run.delivered_uids()) == 2, 300, what="delivered")
        wait_until(
            lambda: qc_passes(1) >= 2 or not run.agent.alive(), 120, what="a QC pass over it"
        )
        time.sleep(3.0)
        alive = run.agent.alive()
        oom = _oom_kills(group)
    finally:
        sampler.stop_event.set()
        run.agent.stop()
        if group is not None:
            with contextlib.suppress(OSError):
                group.rmdir()
    figures = {
        "megabytes": megabytes,
        "limit_mb": limit_mb if group is not None else None,
        "oom_kills": oom,
        "alive": alive,
        "starts": run.agent.starts,
        "tree_pss_before_mb": round(before, 1),
        "peak_tree_pss_after_mb": round(sampler.peak_pss, 1),
        "delivered": len(run.delivered_uids()),
    }
    record_figures("large_multiframe", figures)
    assert alive and oom == 0 and figures["delivered"] == 2, figures
    # No process held the object whole: the agent grew by far less than its size.
    assert sampler.peak_pss - before < megabytes * 0.25, figures


def _oom_kills(group: Path | None) -> int:
    if group is None:
        return 0
    for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
        with contextlib.suppress(OSError):
            for line in (group / name).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
    return 0
