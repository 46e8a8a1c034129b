"""Crash: kill -9 at seeded random instants over a run of M files into a real Orthanc.

The feeder keeps dropping files while the agent is killed and restarted N times, so kills land in
start-up reconciliation, intake (de-identification, outbox write, commit, unlink) and upload; one
kill in five lands during a graceful shutdown (SIGTERM, then SIGKILL a moment later).
Figures: lost instances, duplicated instances at the server, originals lost, temp files left.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from ._harness import (
    AgentRun,
    assert_no_phi,
    phi_audit,
    reached,
    record_figures,
    size,
)

pytestmark = [pytest.mark.reliability, pytest.mark.orthanc, pytest.mark.slow]

SEED = 20261126


def make_inputs(run: AgentRun, n: int, *, rows: int = 48) -> dict[str, str]:
    """``n`` synthetic CT files in ``run.staging`` (several patients, studies and series), and
    the output SOP Instance UID each must get (computed with the agent's own engine)."""
    engine = run.engine()
    scratch = run.root / "expected"
    scratch.mkdir()
    expected: dict[str, str] = {}
    for i in range(n):
        # Inbox names carry a planted marker: no log line or output name may show it.
        name = f"s{i // 40:03d}/PHIDOE_IMG{i:05d}.dcm"
        path = run.stage_ct(
            name, i, study=f"crash-study-{i // 40}", rows=rows, series_number=1 + (i // 20) % 2
        )
        expected[name] = engine.deidentify_file(path, scratch).sop_instance_uid
    shutil.rmtree(scratch)
    return expected


class Feeder(threading.Thread):
    """Moves staged files into the inbox in seeded bursts (an atomic rename each)."""

    def __init__(
        self, run: AgentRun, names: list[str], rng: random.Random, duration: float
    ) -> None:
        super().__init__(daemon=True)
        self.run_ = run
        self.names = list(names)
        self.rng = rng
        # Spread the inflow over the whole kill period (bursts of 13 files on average).
        self.mean_wait = duration / max(1.0, len(names) / 13)
        self.fed = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while self.names and not self.stop_event.is_set():
            for _ in range(min(len(self.names), self.rng.randint(1, 25))):
                name = self.names.pop(0)
                target = self.run_.inbox / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.run_.staging / name, target)
                self.fed += 1
            self.stop_event.wait(self.rng.uniform(0.0, 2 * self.mean_wait))


def _phase(run: AgentRun) -> str:
    counts = run.outbox_counts()
    waiting = counts.get("queued", 0) + counts.get("sending", 0)
    busy_inbox = bool(run.inbox_files())
    return {(True, True): "intake+upload", (True, False): "intake", (False, True): "upload"}.get(
        (busy_inbox, waiting > 0), "idle"
    )


def test_kill9_crash_loop(tmp_path: Path, orthanc, agent_run) -> None:  # type: ignore[no-untyped-def]
    n_kills, n_files = size(6, 50), size(150, 1000)
    rng = random.Random(SEED)
    run = agent_run(
        destination={
            "kind": "dicomweb",
            "url": orthanc.dicomweb_url,
            "auth": "basic",
            "username": orthanc.auth[0],
            "timeout_seconds": 10.0,
            "batch_max_instances": 10,
            "backoff_base_seconds": 0.2,
            "backoff_cap_seconds": 2.0,
        },
        env={"GATEWAY_DESTINATION__PASSWORD": orthanc.auth[1]},
    )
    expected = make_inputs(run, n_files)
    # Kills come every ~1.4 s on average; keep files arriving until the last one.
    feeder = Feeder(run, sorted(expected), random.Random(SEED + 1), duration=n_kills * 1.4)
    phases: collections.Counter[str] = collections.Counter()
    shutdown_kills = 0
    run.start()
    feeder.start()
    try:
        for k in range(n_kills):
            if k % 4 == 1:  # during start-up: reconcile, requeue, first scan
                time.sleep(rng.uniform(0.05, 0.6))
                phases["startup"] += 1
            else:
                time.sleep(rng.uniform(0.6, 2.5))
                phases[_phase(run)] += 1
            run.sample()
            if k % 5 == 4:  # during a graceful shutdown
                shutdown_kills += 1
                os.kill(run.agent.pid, signal.SIGTERM)
                time.sleep(rng.uniform(0.0, 0.6))
            run.agent.kill9()
            run.start()
        feeder.join(timeout=600)
        assert feeder.fed == n_files

        def done() -> bool:
            run.sample()
            counts = run.outbox_counts()
            return not run.inbox_files() and counts.get("sent", 0) + counts.get("dead", 0) == sum(
                counts.values()
            )

        drained = reached(done, timeout=size(240, 1200))
        metrics = run.metrics_text()
        assert run.agent.alive(), "the agent died on its own"
    finally:
        feeder.stop_event.set()
        rc = run.agent.stop()
    stored = orthanc.sop_uids()
    count = collections.Counter(stored)
    want = set(expected.values())
    rows = {sop: (state, path) for sop, state, path, _size in run.outbox_rows()}
    quarantined = len(run.quarantined())
    lost = sorted(want - set(count))
    duplicated = sum(c - 1 for c in count.values()) + len(set(count) - want)
    originals_lost = [
        name
        for name, sop in expected.items()
        if not (run.inbox / name).exists()
        and not (run.staging / name).exists()
        and sop not in rows
        and sop not in count
    ]
    referenced = {Path(p).name for _state, p in rows.values()}
    orphans = [
        p.name
        for p in (run.state / "outbox").rglob("*")
        if p.is_file() and p.name not in referenced
    ]
    temp_left = run.temp_files() + orphans
    figures = {
        "kills": n_kills,
        "shutdown_kills": shutdown_kills,
        "files": n_files,
        "lost": len(lost),
        "duplicated": duplicated,
        "originals_lost": len(originals_lost),
        "temp_left": len(temp_left),
        "quarantined": quarantined,
        "dead": sum(1 for s, _p in rows.values() if s == "dead"),
        "phases": dict(phases),
        "orphan_workers": run.agent.orphans,
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "final_exit": rc,
        "drained": drained,
    }
    record_figures("crash", figures)
    assert drained, ("inbox not empty or outbox not drained in time", figures)
    assert (lost, duplicated, originals_lost, temp_left) == ([], 0, [], []), figures
    assert quarantined == 0 and figures["dead"] == 0, figures
    assert run.agent.orphans == 0, ("worker processes outlived a killed agent", figures)
    assert rc == 0
    assert_no_phi("crash", phi_audit(run, orthanc=orthanc, metrics=metrics))
