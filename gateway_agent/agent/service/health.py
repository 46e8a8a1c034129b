"""The agent's HTTP endpoints: Prometheus ``/metrics``, JSON ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import json
import selectors
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ...logs import get_logger
from ..metrics import REGISTRY

__all__ = [
    "Check",
    "CheckResult",
    "HealthServer",
    "StateCollector",
    "sqlite_writable",
]

log = get_logger()


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one readiness check; ``detail`` is short and free of PHI."""

    ok: bool
    detail: str = ""


#: A readiness check: called at request time, returns a :class:`CheckResult`.
Check = Callable[[], CheckResult]


def sqlite_writable(db_path: Path, timeout: float = 2.0) -> CheckResult:
    """Whether SQLite can write: take the write lock (``BEGIN IMMEDIATE``), then roll back."""
    if not db_path.exists():
        return CheckResult(False, "outbox database missing")
    try:
        con = sqlite3.connect(db_path, timeout=timeout, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.Error as exc:
        return CheckResult(False, f"outbox not writable ({type(exc).__name__})")
    return CheckResult(True, "outbox writable")


class StateCollector(Collector):
    """Scrape-time gauges computed from the outbox and the disk, through the callables given.

    ``destination_report`` returns, per destination name, its deliveries by state (``counts``),
    ``oldest_waiting_seconds``, ``consecutive_failures`` and ``auth_failing`` (see
    ``Outbox.destination_report``). A callable that raises leaves its metrics out of that scrape
    (and is logged), never the scrape.
    """

    def __init__(
        self,
        *,
        destination_report: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
        disk_free: Callable[[], int | None] | None = None,
    ) -> None:
        self._report = destination_report
        self._disk = disk_free

    def _call(self, name: str, fn: Callable[[], Any] | None) -> Any:
        if fn is None:
            return None
        try:
            return fn()
        except Exception as exc:
            log.warning("metrics_probe_failed", probe=name, error=type(exc).__name__)
            return None

    def collect(self) -> Iterator[Metric]:
        report = self._call("destination_report", self._report)
        if report is not None:
            depth = GaugeMetricFamily(
                "gateway_outbox_depth",
                "Outbox deliveries by destination and state.",
                labels=["destination", "state"],
            )
            age = GaugeMetricFamily(
                "gateway_outbox_oldest_waiting_age_seconds",
                "Age of the oldest instance still waiting for the destination (0 when none).",
                labels=["destination"],
            )
            up = GaugeMetricFamily(
                "gateway_destination_up",
                "1 while the destination accepts uploads (circuit closed, credentials accepted).",
                labels=["destination"],
            )
            failures = GaugeMetricFamily(
                "gateway_destination_consecutive_failures",
                "Requests to the destination that failed in a row.",
                labels=["destination"],
            )
            for name in sorted(report):
                entry = report[name]
                counts = entry.get("counts") or {}
                for state in sorted(counts):
                    depth.add_metric([name, str(state)], float(counts[state]))
                age.add_metric([name], float(entry.get("oldest_waiting_seconds") or 0.0))
                n = int(entry.get("consecutive_failures") or 0)
                ok = not n and not entry.get("auth_failing")
                up.add_metric([name], 1.0 if ok else 0.0)
                failures.add_metric([name], float(n))
            yield from (depth, age, up, failures)
        free = self._call("disk_free", self._disk)
        if free is not None:
            yield GaugeMetricFamily(
                "gateway_state_disk_free_bytes",
                "Free bytes on the filesystem of the state folder.",
                value=float(free),
            )


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "gateway-agent"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        owner = self.server.owner
        try:
            if path == "/metrics":
                self._reply(200, owner.render_metrics(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                code, body = owner.health()
                self._json(code, body)
            elif path == "/readyz":
                code, body = owner.readiness()
                self._json(code, body)
            else:
                self._json(
                    404, {"error": "not found", "endpoints": ["/metrics", "/healthz", "/readyz"]}
                )
        except Exception as exc:  # never let a probe bug kill the server thread
            log.exception("health_request_failed", endpoint=path[:32])
            self._json(500, {"error": type(exc).__name__})

    def do_HEAD(self) -> None:
        self.do_GET()

    def _json(self, code: int, body: Mapping[str, Any]) -> None:
        self._reply(code, (json.dumps(body, sort_keys=True) + "\n").encode(), "application/json")

    def _reply(self, code: int, payload: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Access logs are noise for a scrape endpoint; errors are logged where they happen."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: HealthServer

    def __init__(self, address: tuple[str, int], owner: HealthServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class HealthServer:
    """The metrics and health HTTP server, on its own thread; idle, it sleeps in one ``select``.

    Parameters
    ----------
    host, port:
        Where to listen; port 0 picks a free port (see :attr:`port`).
    threads_alive:
        ``() -> {thread name: alive}`` for ``/healthz`` (200 when all alive, else 503).
    checks:
        Named readiness checks for ``/readyz`` (200 when all pass, else 503).
    destination_report, disk_free:
        Scrape-time sources for the outbox per destination (see :class:`StateCollector`) and the
        free bytes of the state folder.
    registry:
        The registry of counters to serve (default: the agent's ``REGISTRY``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        threads_alive: Callable[[], Mapping[str, bool]] | None = None,
        checks: Mapping[str, Check] | None = None,
        destination_report: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
        disk_free: Callable[[], int | None] | None = None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._threads_alive = threads_alive
        self._checks = dict(checks or {})
        self._registry = registry
        # Scrape-time gauges live in a private registry: nothing global to undo.
        self._scrape = CollectorRegistry(auto_describe=True)
        self._scrape.register(
            StateCollector(destination_report=destination_report, disk_free=disk_free)
        )
        ProcessCollector(registry=self._scrape)
        self._started = time.monotonic()
        self._httpd = _Server((host, port), self)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The address actually bound."""
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:9464``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def render_metrics(self) -> bytes:
        """The Prometheus text exposition of the counters and the scrape-time gauges."""
        return generate_latest(self._registry) + generate_latest(self._scrape)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/healthz``: is the process alive and are its threads running."""
        threads: dict[str, bool] = {}
        if self._threads_alive is not None:
            threads = {str(k): bool(v) for k, v in self._threads_alive().items()}
        ok = all(threads.values())
        body = {
            "status": "ok" if ok else "fail",
            "threads": threads,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
        }
        return (200 if ok else 503), body

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """``/readyz``: run every readiness check now; ``reasons`` lists the failing ones."""
        results: dict[str, dict[str, Any]] = {}
        for name, check in self._checks.items():
            try:
                res = check()
            except Exception as exc:
                res = CheckResult(False, f"check failed ({type(exc).__name__})")
            results[name] = {"ok": res.ok, "detail": res.detail}
        ok = all(r["ok"] for r in results.values())
        reasons = [f"{name}: {r['detail']}" for name, r in results.items() if not r["ok"]]
        body = {"status": "ready" if ok else "not ready", "checks": results, "reasons": reasons}
        return (200 if ok else 503), body

    def start(self) -> HealthServer:
        """Serve on a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="health-http", daemon=True)
            self._thread.start()
            log.info("health_server_started", host=self.host, port=self.port)
        return self

    def _serve(self) -> None:
        # No poll interval: block in select until a client connects or stop() writes to the pipe.
        with selectors.DefaultSelector() as sel:
            sel.register(self._httpd, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._httpd.handle_request()

    @property
    def alive(self) -> bool:
        """True while the serving thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._wake_w.send(b"x")
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
