"""An archive that lies, and servers that hang, drip or answer garbage, against a running agent.

``lying_archive``: a real Orthanc whose Lua filter drops every instance while STOW-RS answers 200
for all of them. Nothing may count as delivered, no outbox file may go, `status` and /readyz must
say so; once the archive is fixed and the operator runs `gateway-agent retry`, everything arrives.

``hostile_server``: a scripted proxy in front of a real Orthanc answers every request with one
misbehaviour (an empty 200, a captive portal's HTML page, a black hole, a server that never reads,
one byte per second, 404) for a while, then behaves. Figures: seconds until `status` shows the
error and /readyz turns not ready, requests per second meanwhile, rows killed (must be 0), time to
drain after recovery, lost and duplicated instances.
"""

from __future__ import annotations

import collections
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._faultproxy import FaultProxy
from tests._orthanc import OrthancServer, start_orthanc

from ._harness import (
    AgentRun,
    assert_no_phi,
    phi_audit,
    reached,
    record_figures,
    size,
    write_config,
)
from .test_crash import make_inputs

pytestmark = [pytest.mark.reliability, pytest.mark.orthanc, pytest.mark.slow]

DROP_ALL = "function ReceivedInstanceFilter(dicom, origin, info)\n  return false\nend\n"


def _destination(url: str, orthanc: OrthancServer, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "dicomweb",
        "url": url,
        "auth": "basic",
        "username": orthanc.auth[0],
        "timeout_seconds": 2.0,
        "batch_max_instances": 10,
        "parallel_requests": 2,
        "backoff_base_seconds": 0.5,
        "backoff_cap_seconds": float(size(4, 30)),
        **extra,
    }


def _state(run: AgentRun) -> dict[str, Any]:
    """Rows by (state, proven) and the destination's last error, read-only."""
    db = run.state / "outbox.db"
    out: dict[str, Any] = {"rows": collections.Counter(), "last_error": None}
    if not db.exists():
        return out
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        for state, confirmed, n in conn.execute(
            "select state, confirmed, count(*) from deliveries group by state, confirmed"
        ):
            key = "proven" if (state, confirmed) == ("sent", 1) else str(state)
            out["rows"][key] += int(n)
        row = conn.execute("select last_error from destinations order by name").fetchone()
        out["last_error"] = row[0] if row else None
    except sqlite3.OperationalError:
        pass
    finally:
        conn.close()
    return out


def _ready(run: AgentRun) -> tuple[int, dict[str, Any]]:
    port = run.metrics_port()
    if port is None:
        return 0, {}
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def _cli(run: AgentRun, *args: str) -> str:
    """``gateway-agent --config CONFIG ARGS`` with the agent's environment; its stdout."""
    import os

    env = dict(os.environ, **run.agent.env)
    cmd = [sys.executable, "-m", "gateway_agent", "--config", str(run.config), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def _feed(run: AgentRun, names: list[str]) -> None:
    for name in names:
        run.feed(name)


def _retention_now(run: AgentRun) -> int:
    """What the agent's housekeeping does every 5 minutes, now, on its outbox (sent rows'
    files, 0 hours after their proof); returns the files removed."""
    from gateway_agent.agent.outbox.store import Outbox

    ob = Outbox(run.state / "outbox.db")
    try:
        return ob.purge_sent_files(0.0)
    finally:
        ob.close()


def _when(t0: float, predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds from ``t0`` until ``predicate`` held (waiting ``timeout`` at most); None if never."""
    return round(time.monotonic() - t0, 1) if reached(predicate, timeout) else None


def _says(run: AgentRun, error: str) -> Callable[[], bool]:
    """Whether the destination's last error, as ``status`` shows it, starts with ``error``."""
    return lambda: str(_state(run)["last_error"] or "").startswith(error)


def _outage_seen(run: AgentRun, t0: float, error: str, fault_s: float) -> dict[str, float | None]:
    """Seconds from ``t0`` until `status` shows ``error``, then until /readyz answers 503 (None:
    not within the ``fault_s`` seconds of the fault)."""
    return {
        "status_after_s": _when(t0, _says(run, error), fault_s),
        "not_ready_after_s": _when(
            t0, lambda: _ready(run)[0] == 503, max(1.0, t0 + fault_s - time.monotonic())
        ),
    }


def _drained(run: AgentRun, n: int) -> Callable[[], bool]:
    """Whether all ``n`` instances are delivered and proven, and the agent is ready again."""
    return lambda: _state(run)["rows"].get("proven", 0) == n and _ready(run)[0] == 200


def _delivery(want: set[str], stored: collections.Counter[str]) -> dict[str, int]:
    """What the archive holds of ``want``: delivered, lost and duplicated instances."""
    return {
        "delivered": len(want & set(stored)),
        "lost": len(want - set(stored)),
        "duplicated": sum(c - 1 for c in stored.values()),
    }


def _outbox_files(run: AgentRun) -> int:
    root = run.state / "outbox"
    return sum(1 for p in root.rglob("*.dcm")) if root.exists() else 0


def test_lying_archive_loses_nothing(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    n, lie_s, window = size(12, 200), size(25, 150), size(8, 60)
    lua = tmp_path / "drop.lua"
    lua.write_text(DROP_ALL)
    server = start_orthanc(extra_config={"LuaScripts": [str(lua)]})
    try:
        run = agent_run(
            destination=_destination(server.dicomweb_url, server),
            overrides={
                "metrics": {"ready_upload_window_seconds": float(window)},
                "disk": {"min_free_mb": 0, "sent_retention_hours": 0.0},
            },
            env={"GATEWAY_DESTINATION__PASSWORD": server.auth[1]},
        )
        expected = make_inputs(run, n, rows=32)
        run.start()
        t0 = time.monotonic()
        _feed(run, sorted(expected))
        status_after = _when(t0, _says(run, "not_stored_after_ack"), lie_s)
        not_ready_after = _when(t0, lambda: _ready(run)[0] == 503, window + lie_s)
        _, ready_body = _ready(run)
        time.sleep(max(0.0, t0 + lie_s - time.monotonic()))
        during = _state(run)
        _retention_now(run)  # nothing unproven may go
        files_during = _outbox_files(run)
        status_text = _cli(run, "status")
        stored_during = server.count_instances()

        # The archive is fixed (the filter removed); the operator runs `gateway-agent retry`.
        server.stop()
        (server.workdir / "config" / "extra.json").unlink()
        server.extra_config = {}
        server.start()
        _cli(run, "retry")
        want = set(expected.values())
        drain_s = _when(
            time.monotonic(),
            lambda: _state(run)["rows"].get("proven", 0) == n and set(server.sop_uids()) >= want,
            size(120, 600),
        )
        after = _state(run)
        metrics = run.metrics_text()
        rc = run.agent.stop()
        stored = collections.Counter(server.sop_uids())
        figures = {
            "files": n,
            "lie_s": lie_s,
            "stored_during_lie": stored_during,
            "counted_delivered_during_lie": during["rows"].get("proven", 0),
            "dead_not_stored": during["rows"].get("dead", 0),
            "outbox_files_kept": files_during,
            "status_after_s": status_after,
            "not_ready_after_s": not_ready_after,
            "window_s": window,
            "drain_after_retry_s": drain_s,
            **_delivery(want, stored),
        }
        record_figures("lying_archive", figures)
        assert figures["counted_delivered_during_lie"] == 0 and stored_during == 0, figures
        assert files_during == n, figures  # every local copy kept
        assert status_after is not None and not_ready_after is not None, figures
        assert any("stalled" in r for r in ready_body.get("reasons", [])), ready_body
        assert "not_stored_after_ack" in status_text and "does not hold" in status_text
        assert drain_s is not None and figures["lost"] == 0 and figures["duplicated"] == 0, figures
        assert after["rows"].get("dead", 0) == 0, after
        assert rc == 0
        assert_no_phi("lying_archive", phi_audit(run, metrics=metrics))
    finally:
        server.close()


#: Each misbehaviour: the proxy action, and the start of the error ``status`` must show.
MISBEHAVIOURS = {
    "empty_200": ("empty200", "http_200 not_a_stow_response: empty body"),
    "html_200": ("html200", "http_200 not_a_stow_response: text/html"),
    "black_hole": ("blackhole", "timeout"),
    "never_reads": ("noread", "timeout"),
    "one_byte_per_second": ("drip:1", "timeout"),
    "404_everywhere": ("status:404", "http_404"),
}


def _hostile_figures(
    server: str,
    n: int,
    fault_s: float,
    window: float,
    seen: dict[str, float | None],
    rps: float | None,
    during: dict[str, Any],
    drain_s: float | None,
    want: set[str],
    stored: list[str],
) -> dict[str, Any]:
    """One row of the ``hostile_server`` table, recorded (the same columns for every server)."""
    figures = {
        "server": server,
        "files": n,
        "fault_s": fault_s,
        "window_s": window,
        **seen,
        "requests_per_s": rps,
        "dead": during["rows"].get("dead", 0),
        "drain_s": drain_s,
        **_delivery(want, collections.Counter(stored)),
    }
    record_figures("hostile_server", figures)
    return figures


@pytest.mark.parametrize("case", list(MISBEHAVIOURS))
def test_hostile_server(tmp_path: Path, orthanc: OrthancServer, agent_run, case: str) -> None:  # type: ignore[no-untyped-def]
    action, error = MISBEHAVIOURS[case]
    n, fault_s, window = size(8, 100), size(14, 120), size(6, 60)
    with FaultProxy(orthanc.base_url, default=action, rcvbuf=4096) as proxy:
        run = agent_run(
            destination=_destination(proxy.url + "/dicom-web", orthanc),
            overrides={"metrics": {"ready_upload_window_seconds": float(window)}},
            env={"GATEWAY_DESTINATION__PASSWORD": orthanc.auth[1]},
        )
        expected = make_inputs(run, n, rows=64)
        run.start()
        assert run.metrics_port() is not None
        t0 = time.monotonic()
        _feed(run, sorted(expected))
        seen = _outage_seen(run, t0, error, fault_s)
        _, ready_body = _ready(run)
        time.sleep(max(0.0, t0 + fault_s - time.monotonic()))
        t_end = time.monotonic()
        rps = round(sum(1 for r in proxy.requests if t0 + 2 <= r.at < t_end) / (t_end - t0 - 2), 2)
        during = _state(run)
        status = json.loads(_cli(run, "status", "--json"))

        proxy.set_plan([], default="ok")
        want = set(expected.values())
        drain_s = _when(time.monotonic(), _drained(run, n), size(120, 600))
        rc = run.agent.stop()
    figures = _hostile_figures(
        case, n, fault_s, window, seen, rps, during, drain_s, want, orthanc.sop_uids()
    )
    assert None not in seen.values(), figures
    assert ready_body.get("reasons"), ready_body
    assert status["destinations"][0]["problems"], status["destinations"][0]
    assert status["destinations"][0]["hint"], status["destinations"][0]
    assert figures["dead"] == 0, figures
    assert rps < 5, figures  # backoff: one probe at a time, not a request per row
    assert drain_s is not None and figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert rc == 0


def test_a_name_that_does_not_resolve(tmp_path: Path, orthanc: OrthancServer, agent_run) -> None:  # type: ignore[no-untyped-def]
    """A destination host name that does not resolve (a typo, DNS down): an outage, visible in
    `status` and /readyz, nothing killed; once the operator fixes the URL and restarts the agent,
    everything arrives once."""
    n, fault_s, window = size(8, 100), size(14, 120), size(6, 60)
    run = agent_run(
        destination=_destination("http://pacs.invalid/dicom-web", orthanc),
        overrides={"metrics": {"ready_upload_window_seconds": float(window)}},
        env={"GATEWAY_DESTINATION__PASSWORD": orthanc.auth[1]},
    )
    expected = make_inputs(run, n, rows=64)
    run.start()
    t0 = time.monotonic()
    _feed(run, sorted(expected))
    seen = _outage_seen(run, t0, "network_error", fault_s)
    time.sleep(max(0.0, t0 + fault_s - time.monotonic()))
    during = _state(run)
    status = json.loads(_cli(run, "status", "--json"))
    assert run.agent.stop() == 0

    run.settings["destination"]["url"] = orthanc.dicomweb_url  # the operator fixes the URL
    write_config(run.config, run.settings)
    run.start()
    want = set(expected.values())
    drain_s = _when(time.monotonic(), _drained(run, n), size(120, 600))
    rc = run.agent.stop()
    figures = _hostile_figures(
        "name_not_resolved", n, fault_s, window, seen, None, during, drain_s, want,
        orthanc.sop_uids(),
    )  # fmt: skip
    assert None not in seen.values(), figures
    assert status["destinations"][0]["problems"] and status["destinations"][0]["hint"], status
    assert "cannot be reached" in status["destinations"][0]["hint"]
    assert figures["dead"] == 0, figures
    assert drain_s is not None and figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert rc == 0


@pytest.mark.parametrize("case", ["xml_200", "refused_202"])
def test_proper_answers_of_other_shapes(  # type: ignore[no-untyped-def]
    tmp_path: Path, orthanc: OrthancServer, agent_run, case: str
) -> None:
    """Answers that are proper STOW-RS responses in another shape: a 200 in DICOM XML (every
    instance delivered and proven, nothing reported wrong), and a 202 whose FailedSOPSequence
    refuses every 4th instance (exactly those `dead` with the archive's reason, files kept; the
    others delivered and proven; the destination never reported down)."""
    action = {"xml_200": "xml", "refused_202": "refuse:4"}[case]
    n = size(12, 100)
    with FaultProxy(orthanc.base_url, default=action) as proxy:
        run = agent_run(
            destination=_destination(proxy.url + "/dicom-web", orthanc),
            overrides={"disk": {"min_free_mb": 0, "sent_retention_hours": 0.0}},
            env={"GATEWAY_DESTINATION__PASSWORD": orthanc.auth[1]},
        )
        expected = make_inputs(run, n, rows=64)
        run.start()
        t0 = time.monotonic()
        _feed(run, sorted(expected))
        settled = reached(
            lambda: sum(_state(run)["rows"].get(k, 0) for k in ("proven", "dead")) == n,
            size(120, 600),
        )
        settle_s = round(time.monotonic() - t0, 1)
        state = _state(run)
        ready = _ready(run)[0]
        status = json.loads(_cli(run, "status", "--json"))
        db = sqlite3.connect(f"file:{run.state / 'outbox.db'}?mode=ro", uri=True)
        dead = dict(
            db.execute(
                "select i.sop_instance_uid, d.last_error from deliveries d"
                " join instances i on i.id = d.instance_id where d.state = 'dead'"
            )
        )
        db.close()
        _retention_now(run)
        kept = _outbox_files(run)
        posts = sum(1 for r in proxy.requests if r.method == "POST")
        rc = run.agent.stop()
    stored = set(orthanc.sop_uids())
    want = set(expected.values())
    figures = {
        "answer": case,
        "files": n,
        "settled_s": settle_s if settled else None,
        "proven": state["rows"].get("proven", 0),
        "dead": len(dead),
        "outbox_files_kept": kept,
        "posts": posts,
        "lost": len(want - stored - set(dead)),
    }
    record_figures("proper_answers", figures)
    assert settled, figures
    assert not status["destinations"][0]["problems"], status["destinations"][0]
    assert ready == 200
    if case == "xml_200":
        assert figures["proven"] == n and not dead, figures
    else:
        assert dead and set(dead.values()) == {"http_202 failure_reason_0xc000"}, dead
        assert figures["proven"] == n - len(dead), figures
        assert kept == len(dead), figures  # the refused ones' copies stay; proven ones went
    assert figures["lost"] == 0, figures
    assert rc == 0
