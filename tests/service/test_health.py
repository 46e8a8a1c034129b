"""Real HTTP requests to /metrics, /healthz and /readyz on an ephemeral 127.0.0.1 port."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from gateway_agent.agent.service.diskguard import MB
from gateway_agent.agent.service.health import CheckResult, HealthServer, sqlite_writable
from gateway_agent.agent.service.plumbing import ServicePlumbing, status_line
from gateway_agent.config import load_settings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    c = Counter("gateway_files_received", "test counter", registry=reg)
    c.inc(3)
    return reg


@pytest.fixture
def server(registry: CollectorRegistry) -> Iterator[HealthServer]:
    alive = {"watcher": True, "uploader": True}
    ready = {"outbox": True}

    def broken() -> int | None:
        raise RuntimeError("no statvfs")

    srv = HealthServer(
        "127.0.0.1",
        0,
        threads_alive=lambda: alive,
        checks={
            "outbox": lambda: CheckResult(ready["outbox"], "x"),
            "other": lambda: CheckResult(True, "fine"),
        },
        destination_report=lambda: {
            "pacs": {
                "counts": {"queued": 2, "sending": 1, "sent": 7, "dead": 0},
                "oldest_waiting_seconds": 12.5,
                "consecutive_failures": 0,
                "auth_failing": False,
            },
            "research": {
                "counts": {"queued": 0, "sending": 0, "sent": 9, "dead": 1},
                "oldest_waiting_seconds": None,
                "consecutive_failures": 3,
                "auth_failing": False,
            },
        },
        disk_free=broken,
        registry=registry,
    )
    srv.alive_map = alive  # type: ignore[attr-defined]
    srv.ready_map = ready  # type: ignore[attr-defined]
    with srv:
        yield srv


def test_ephemeral_port_bound_on_loopback(server: HealthServer) -> None:
    assert server.port > 0
    assert server.host == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_text(server: HealthServer) -> None:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    s = samples(r.text)
    assert s[("gateway_files_received_total", ())] == 3
    for state, n in {"queued": 2, "sending": 1, "sent": 7, "dead": 0}.items():
        assert s[("gateway_outbox_depth", (("destination", "pacs"), ("state", state)))] == n
    assert s[("gateway_outbox_depth", (("destination", "research"), ("state", "dead")))] == 1
    pacs, research = (("destination", "pacs"),), (("destination", "research"),)
    assert s[("gateway_outbox_oldest_waiting_age_seconds", pacs)] == 12.5
    assert s[("gateway_outbox_oldest_waiting_age_seconds", research)] == 0
    assert s[("gateway_destination_up", pacs)] == 1
    assert s[("gateway_destination_up", research)] == 0
    assert s[("gateway_destination_consecutive_failures", research)] == 3
    # The probe that raises leaves its gauge out and the scrape intact.
    assert not any(name == "gateway_state_disk_free_bytes" for name, _ in s)
    assert ("process_cpu_seconds_total", ()) in s


def test_healthz(server: HealthServer) -> None:
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["threads"] == {"watcher": True, "uploader": True}
    server.alive_map["uploader"] = False  # type: ignore[attr-defined]
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 503
    assert r.json()["status"] == "fail"


def test_readyz(server: HealthServer) -> None:
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ready",
        "checks": {"outbox": {"ok": True, "detail": "x"}, "other": {"ok": True, "detail": "fine"}},
        "reasons": [],
    }
    server.ready_map["outbox"] = False  # type: ignore[attr-defined]
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "not ready"
    assert r.json()["checks"]["outbox"]["ok"] is False
    assert r.json()["reasons"] == ["outbox: x"]


def test_unknown_path_and_head(server: HealthServer) -> None:
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404
    assert "/metrics" in r.json()["endpoints"]
    r = httpx.head(server.url + "/healthz")
    assert r.status_code == 200 and r.content == b""


def test_keepalive_and_concurrent_clients(server: HealthServer) -> None:
    with httpx.Client(base_url=server.url) as a, httpx.Client(base_url=server.url) as b:
        for _ in range(5):
            assert a.get("/healthz").status_code == 200
            assert b.get("/metrics").status_code == 200


def test_stop_frees_the_port(registry: CollectorRegistry) -> None:
    srv = HealthServer("127.0.0.1", 0, registry=registry).start()
    port = srv.port
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    srv.stop()
    assert not srv.alive
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_sqlite_writable(tmp_path: Path) -> None:
    db = tmp_path / "outbox.db"
    assert not sqlite_writable(db).ok
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("create table t (x)")
    assert sqlite_writable(db).ok
    con.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    res = sqlite_writable(db, timeout=0.05)
    assert not res.ok and "OperationalError" in res.detail
    con.execute("ROLLBACK")
    con.close()


def _settings(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    overrides = {
        "state_dir": tmp_path / "state",
        "inbox": tmp_path / "inbox",
        "metrics.port": 0,
        "disk.min_free_mb": 100,
        **extra,
    }
    (tmp_path / "state").mkdir(exist_ok=True)
    return load_settings(None, overrides)


def test_plumbing_readyz_reflects_disk_and_destination(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **{"metrics.ready_max_waiting": 5})
    db = tmp_path / "state" / "outbox.db"
    sqlite3.connect(db).close()
    free = {"bytes": 1000 * MB}
    counts = {"queued": 0, "sending": 0, "sent": 0, "dead": 0}
    intake: dict[str, str | None] = {"problem": None}
    plumbing = ServicePlumbing(
        settings,
        destination_report=lambda: {"default": {"counts": counts}},
        threads_alive=lambda: {"watcher": True},
        outbox_db=db,
        intake_problem=lambda: intake["problem"],
        free=lambda _p: free["bytes"],
        env={},
    ).start()
    try:
        url = f"http://127.0.0.1:{plumbing.port}"
        r = httpx.get(url + "/readyz")
        assert r.status_code == 200, r.text
        assert set(r.json()["checks"]) == {"outbox", "intake", "disk", "destination:default"}

        intake["problem"] = "cannot remove originals from the inbox (PermissionError EACCES)"
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["intake"] == {"ok": False, "detail": intake["problem"]}
        intake["problem"] = None
        assert httpx.get(url + "/readyz").status_code == 200

        free["bytes"] = 10 * MB  # disk guard pauses intake: not ready, and says why
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["disk"]["detail"].startswith("intake paused")
        assert plumbing.intake_allowed() is False
        assert "paused" in status_line(counts, plumbing.disk_guard.paused)
        m = samples(httpx.get(url + "/metrics").text)
        assert m[("gateway_state_disk_free_bytes", ())] == 10 * MB
        free["bytes"] = 1000 * MB
        assert plumbing.disk_guard.check()

        counts["queued"] = 6  # destination never reached and the backlog is over its limit
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503
        assert "6 waiting (max 5)" in r.json()["checks"]["destination:default"]["detail"]
        counts["queued"] = 0
        assert httpx.get(url + "/healthz").json()["threads"] == {"watcher": True}
    finally:
        plumbing.stop()


def test_plumbing_metrics_disabled(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **{"metrics.enabled": False})
    plumbing = ServicePlumbing(
        settings,
        destination_report=dict,
        threads_alive=dict,
        env={},
    ).start()
    assert plumbing.port is None
    plumbing.ready()
    plumbing.stop()


def test_status_line() -> None:
    assert status_line({"queued": 2, "dead": 1}) == "outbox dead=1 queued=2; intake running"
    assert status_line(None, paused=True) == "outbox empty; intake paused (low disk)"
