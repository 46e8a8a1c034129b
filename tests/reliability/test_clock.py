"""The wall clock jumps under a running agent (an edge box without a real-time clock boots at an
old date and jumps when NTP syncs; an operator sets the time by hand): backward during a backoff,
forward with uploads in flight, forward past ``max_age`` during an outage.

The agent's wall clock is moved by a ``sitecustomize`` that shifts ``time.time`` (the monotonic
clock stays, as when the system clock is set). libfaketime cannot do this for a Python process:
with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` (needed to leave the monotonic clock alone) its
``clock_nanosleep`` fails every ``time.sleep`` with EINVAL (0.9.10, Debian 12).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ._accidents import CountingStow, Inputs, MovableClock, ct_bytes, start_agent
from ._harness import AgentRun, record_figures, size, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

DAY = 86400.0


def _reached(predicate: Any, timeout: float) -> float | None:
    t0 = time.monotonic()
    try:
        wait_until(predicate, timeout, interval=0.05)
    except AssertionError:
        return None
    return time.monotonic() - t0


def _run(tmp_path: Path, agent_run: Any, stow: CountingStow, clock: MovableClock) -> AgentRun:
    run: AgentRun = agent_run(
        tmp_path,
        destination={
            "kind": "dicomweb",
            "url": stow.url,
            "timeout_seconds": 10.0,
            "backoff_base_seconds": 0.5,
            "backoff_cap_seconds": 2.0,
            "batch_max_instances": 5,
        },
        env=clock.env(),
    )
    return run


@pytest.mark.parametrize("case", ["back_in_backoff", "forward_in_flight", "forward_in_outage"])
def test_clock_jumps(tmp_path: Path, agent_run: Any, case: str) -> None:
    n = size(20, 200)
    clock = MovableClock(tmp_path / "clock")
    with CountingStow(set()) as stow:
        run = _run(tmp_path, agent_run, stow, clock)
        inputs = Inputs(run)
        for i in range(n):
            inputs.add(f"PHIDOE_{i:03d}.dcm", ct_bytes(i, study=f"clock-{case}"))
        want = set(inputs.expected.values())
        stow.uids = {u.encode() for u in want}
        if case == "forward_in_flight":
            # One upload held (in flight, its lease running) while the others go through.
            stow.hold = {inputs.expected[sorted(inputs.expected)[0]]}
            stow.delay = 20.0
        else:
            stow.down = True
        start_agent(run)
        for name, data in inputs.data.items():
            run.drop(name, data)
        if case == "forward_in_flight":
            wait_until(lambda: stow.held >= 1, 60, what="an upload in flight")
            clock.jump(DAY)
            time.sleep(3.0)  # the other workers are free: would they take the held rows?
            stow.release.set()
        else:
            wait_until(lambda: len(run.outbox_rows()) == n, 60, what="rows committed")
            time.sleep(1.5)  # a few failed attempts: rows in backoff, the circuit open
            clock.jump(-DAY if case == "back_in_backoff" else 4 * DAY)
            time.sleep(0.5)
            stow.down = False
        took = _reached(lambda: set(stow.counts) >= want, 60)
        time.sleep(1.0)
        counts = dict(stow.counts)
        states = run.outbox_counts()
        jumps = sum('"clock_jumped"' in ln for ln in run.agent.log_lines())
        run.agent.stop()
    figures = {
        "jump": case,
        "files": n,
        "delivered": len(want & set(counts)),
        "delivery_after_recovery_s": None if took is None else round(took, 1),
        "duplicated": sum(c - 1 for c in counts.values()),
        "dead": states.get("dead", 0),
        "jumps_logged": jumps,
    }
    record_figures("clock", figures)
    assert took is not None, figures
    assert figures["duplicated"] == 0 and figures["dead"] == 0, figures
    assert jumps >= 1, figures
