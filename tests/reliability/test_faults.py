"""Faults: a seeded plan through a fault proxy between the agent and a real Orthanc.

Three waves of files: the first meets 30 % 503 (half with Retry-After), resets mid-body, resets
after the head, replies lost after the server stored the instance, and stalls past the timeout;
the second an outage (Orthanc down behind the proxy); the third a period of 401s. Figures:
delivered, duplicated, requests per second during the outage and the 401 period (the backoff
working), time to drain after each recovery.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from pathlib import Path

import pytest

from tests._faultproxy import FaultProxy

from ._harness import assert_no_phi, phi_audit, reached, record_figures, size
from .test_crash import make_inputs

pytestmark = [pytest.mark.reliability, pytest.mark.orthanc, pytest.mark.slow]

SEED = 6
TIMEOUT = 2.0


class Plan:
    """The proxy's plan: seeded faults in the ``mixed`` phase, 401 in ``auth``, else ``ok``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.phase = "mixed"
        self.lock = threading.Lock()
        # 30 % 503 (half with Retry-After) and 20 % other faults; half the requests pass.
        self.weights = {
            "ok": 50,
            "503": 15,
            "503:1": 15,
            "drop": 5,
            "reset": 5,
            "lost-reply": 5,
            f"delay:{TIMEOUT + 1.5}": 5,
        }

    def __call__(self, i: int) -> str:
        with self.lock:
            if self.phase == "auth":
                return "401"
            if self.phase == "mixed" and i < len(self.weights) - 1:
                return list(self.weights)[i + 1]  # each fault once first, then the seeded mix
            if self.phase == "mixed":
                names = list(self.weights)
                return self.rng.choices(names, [self.weights[k] for k in names])[0]
            return "ok"


def _rate(proxy: FaultProxy, start: float, end: float) -> float:
    n = sum(1 for r in proxy.requests if start <= r.at < end)
    return round(n / max(end - start, 1e-9), 2)


def test_seeded_faults_outage_and_401(tmp_path: Path, orthanc, agent_run) -> None:  # type: ignore[no-untyped-def]
    wave = size(20, 200)
    outage_s, auth_s = size(5, 60), size(5, 60)
    plan = Plan(SEED)
    with FaultProxy(orthanc.base_url, plan=plan) as proxy:
        run = agent_run(
            destination={
                "kind": "dicomweb",
                "url": proxy.url + "/dicom-web",
                "auth": "basic",
                "username": orthanc.auth[0],
                "timeout_seconds": TIMEOUT,
                "batch_max_instances": 5,
                "parallel_requests": 2,
                "max_attempts": 50,
                "backoff_base_seconds": 0.5,
                "backoff_cap_seconds": float(size(4, 300)),
            },
            env={"GATEWAY_DESTINATION__PASSWORD": orthanc.auth[1]},
        )
        expected = make_inputs(run, 3 * wave, rows=32)
        names = sorted(expected)
        waves = [names[:wave], names[wave : 2 * wave], names[2 * wave :]]

        def feed(batch: list[str]) -> None:
            for name in batch:
                target = run.inbox / name
                target.parent.mkdir(parents=True, exist_ok=True)
                (run.staging / name).replace(target)

        def delivered(batch: list[str]) -> bool:
            run.sample()
            return (
                all(orthanc.lookup(expected[n]) for n in batch[-3:])
                and all(
                    state == "sent"
                    for sop, state, _p, _s in run.outbox_rows()
                    if sop in {expected[n] for n in batch}
                )
                and not run.inbox_files()
            )

        run.start()
        timed_out: list[str] = []
        try:
            # 1. seeded mixed faults
            feed(waves[0])
            timed_out += (
                []
                if reached(lambda: delivered(waves[0]), size(180, 1800))
                else ["wave 1 under faults"]
            )
            actions = collections.Counter(r.action for r in proxy.requests)

            # 2. outage: Orthanc down behind the proxy
            with plan.lock:
                plan.phase = "ok"
            orthanc.stop()
            t_out = time.monotonic()
            feed(waves[1])
            time.sleep(outage_s)
            t_up = time.monotonic()
            orthanc.start()
            outage_rps = _rate(proxy, t_out + min(2.0, outage_s / 3), t_up)
            timed_out += (
                []
                if reached(lambda: delivered(waves[1]), size(180, 1800))
                else ["wave 2 after outage"]
            )
            drain_outage = round(time.monotonic() - t_up, 1)

            # 3. 401 for a while
            with plan.lock:
                plan.phase = "auth"
            t_auth = time.monotonic()
            feed(waves[2])
            time.sleep(auth_s)
            with plan.lock:
                plan.phase = "ok"
            t_ok = time.monotonic()
            auth_rps = _rate(proxy, t_auth + min(2.0, auth_s / 3), t_ok)
            dead_during_auth = run.outbox_counts().get("dead", 0)
            timed_out += (
                []
                if reached(lambda: delivered(waves[2]), size(180, 1800))
                else ["wave 3 after 401"]
            )
            drain_auth = round(time.monotonic() - t_ok, 1)
            metrics = run.metrics_text()
        finally:
            rc = run.agent.stop()
        stored = collections.Counter(orthanc.sop_uids())
        want = set(expected.values())
        figures = {
            "files": len(expected),
            "delivered": len(want & set(stored)),
            "duplicated": sum(c - 1 for c in stored.values()) + len(set(stored) - want),
            "resent": actions.get("lost-reply", 0) + actions.get(f"delay:{TIMEOUT + 1.5}", 0),
            "actions": dict(actions),
            "outage_s": outage_s,
            "outage_rps": outage_rps,
            "drain_s": drain_outage,
            "auth_s": auth_s,
            "auth_rps": auth_rps,
            "auth_drain_s": drain_auth,
            "dead": run.outbox_counts().get("dead", 0),
            "dead_during_auth": dead_during_auth,
            "timed_out": timed_out,
        }
    record_figures("faults", figures)
    assert timed_out == [], figures
    assert figures["delivered"] == len(want) and figures["duplicated"] == 0, figures
    assert figures["dead"] == 0, figures
    # Backoff: an agent retrying in a loop would make hundreds of requests per second.
    assert outage_rps < 5 and auth_rps < 5, figures
    assert rc == 0
    assert_no_phi("faults", phi_audit(run, orthanc=orthanc, metrics=metrics))
