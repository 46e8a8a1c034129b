"""Service plumbing for the daemon: health/metrics server, disk guard, systemd notify."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from ..._exceptions import ConfigError
from ...config import Settings
from ...logs import get_logger
from ..upload.stall import destination_problems
from .diskguard import DiskGuard, free_bytes
from .health import Check, CheckResult, HealthServer, sqlite_writable
from .notify import Notifier

__all__ = ["ServicePlumbing", "status_line"]

log = get_logger()

MB = 1024 * 1024
_WAITING = ("queued", "sending")


def status_line(counts: Mapping[str, int] | None, paused: bool = False) -> str:
    """The one-line ``STATUS=`` text: outbox deliveries by state (every destination's) and
    whether intake runs."""
    parts = [f"{k}={counts[k]}" for k in sorted(counts)] if counts else []
    depth = " ".join(parts) if parts else "empty"
    return f"outbox {depth}; intake {'paused (low disk)' if paused else 'running'}"


class ServicePlumbing:
    """What the daemon holds: the health/metrics server and the disk guard.

    The daemon calls :meth:`start`, then :meth:`ready` once the outbox is open and the watcher
    runs, :meth:`intake_allowed` before taking each file, and :meth:`stop` on shutdown.
    ``on_disk_change(paused)`` lets it rescan the inbox when intake resumes;
    ``intake_problem()`` (why the latest file could not be committed, or None) makes ``/readyz``
    report intake; ``checks`` are more named readiness checks for ``/readyz``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        destination_report: Callable[[], Mapping[str, Mapping[str, Any]]],
        threads_alive: Callable[[], Mapping[str, bool]],
        outbox_db: Path | None = None,
        on_disk_change: Callable[[bool], None] | None = None,
        intake_problem: Callable[[], str | None] | None = None,
        free: Callable[[Path], int] = free_bytes,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        checks: Mapping[str, Check] | None = None,
    ) -> None:
        self._extra_checks = dict(checks or {})
        self.settings = settings
        self._report = destination_report
        self._threads_alive = threads_alive
        self._outbox_db = outbox_db
        self._clock = clock
        self._on_disk_change = on_disk_change
        self._intake_problem = intake_problem
        self._last_status: str | None = None
        self.notifier = Notifier(env)
        self.disk_guard = DiskGuard(
            settings.state_dir,
            int(settings.disk.min_free_mb * MB),
            free=free,
            interval=settings.disk.check_interval_seconds,
            on_change=self._disk_changed,
        )
        self.server: HealthServer | None = None
        if settings.metrics.enabled:
            try:
                self.server = self._health_server()
            except OSError as exc:
                m = settings.metrics
                cause = "in use" if exc.errno == errno.EADDRINUSE else f"unusable ({exc.strerror})"
                raise ConfigError(
                    f"metrics.port {m.port} on {m.host} is {cause}: stop what holds it (another "
                    "gateway-agent?), or set metrics.port (--metrics-port, 0 picks a free port) "
                    "or metrics.enabled = false (--no-metrics)"
                ) from None

    def _health_server(self) -> HealthServer:
        settings = self.settings
        checks = {
            "outbox": self._check_outbox,
            "intake": self._check_intake,
            "disk": self._check_disk,
        }
        for d in settings.all_destinations:
            checks[f"destination:{d.name}"] = partial(self._check_destination, d.name)
        return HealthServer(
            settings.metrics.host,
            settings.metrics.port,
            threads_alive=self._all_threads,
            checks={**checks, **self._extra_checks},
            destination_report=self._report,
            disk_free=self._disk_free,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ServicePlumbing:
        """Measure the disk, start the guard's timer and the HTTP server."""
        self.disk_guard.start()
        if self.server is not None:
            self.server.start()
        return self

    @property
    def port(self) -> int | None:
        """The metrics/health port actually bound, or None when metrics are disabled."""
        return self.server.port if self.server is not None else None

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up is done (``READY=1``) and start feeding its watchdog."""
        text = status or self._status_text()
        self._last_status = text
        self.notifier.ready(text)
        self.notifier.start_watchdog(self._threads_ok, on_tick=self._refresh_status)
        log.info("service_ready", metrics_port=self.port, watchdog=self.notifier.watchdog_seconds)

    def status(self, text: str | None = None) -> None:
        """Send ``STATUS=`` (default: the outbox depth line)."""
        text = text or self._status_text()
        self._last_status = text
        self.notifier.status(text)

    def intake_allowed(self) -> bool:
        """Per-file gate for intake: False while the disk guard has paused it."""
        return self.disk_guard.allow_intake()

    def stop(self, *, reloading: bool = False) -> None:
        """``STOPPING=1`` (``RELOADING=1`` when the agent starts again at once), then stop the
        watchdog, the disk guard and the HTTP server."""
        if reloading:
            self.notifier.reloading("reloading the configuration")
        else:
            self.notifier.stopping("stopping")
        self.notifier.close()
        self.disk_guard.stop()
        if self.server is not None:
            self.server.stop()

    # --- probes --------------------------------------------------------------------------------

    def _all_threads(self) -> dict[str, bool]:
        return {str(k): bool(v) for k, v in self._threads_alive().items()}

    def _threads_ok(self) -> bool:
        threads = dict(self._threads_alive())
        if self.server is not None:
            threads["health-http"] = self.server.alive
        return all(threads.values())

    def _status_text(self) -> str:
        counts: dict[str, int] | None = None
        try:
            report = self._report()
        except Exception:
            report = {}
        for entry in report.values():
            counts = counts or {}
            for state, n in (entry.get("counts") or {}).items():
                counts[state] = counts.get(state, 0) + int(n)
        return status_line(counts, self.disk_guard.paused)

    def _refresh_status(self) -> None:
        text = self._status_text()
        if text != self._last_status:
            self.status(text)

    def _disk_changed(self, paused: bool) -> None:
        if self._last_status is not None:  # after READY only
            self._refresh_status()
        if self._on_disk_change is not None:
            self._on_disk_change(paused)

    def _disk_free(self) -> int | None:
        # A fresh measurement per scrape (one statvfs); also keeps the guard's view current.
        self.disk_guard.check()
        return self.disk_guard.last_free_bytes

    def _check_outbox(self) -> CheckResult:
        if self._outbox_db is not None:
            return sqlite_writable(self._outbox_db)
        self._report()  # raises when the outbox cannot be read
        return CheckResult(True, "outbox readable")

    def _check_intake(self) -> CheckResult:
        problem = self._intake_problem() if self._intake_problem is not None else None
        if problem:
            return CheckResult(False, problem)
        return CheckResult(True, "files are committed and their originals disposed of")

    def _check_disk(self) -> CheckResult:
        allowed = self.disk_guard.check()
        free = self.disk_guard.last_free_bytes
        free_txt = "unknown" if free is None else f"{free / MB:.0f} MB"
        threshold = f"{self.disk_guard.min_free_bytes / MB:.0f} MB"
        if allowed:
            return CheckResult(True, f"free {free_txt}, threshold {threshold}")
        return CheckResult(False, f"intake paused: free {free_txt}, threshold {threshold}")

    def _check_destination(self, name: str) -> CheckResult:
        """One destination: refused, misaddressed or stalled (see :mod:`..upload.stall`), or its
        backlog over the limits with nothing delivered lately: not ready. The outbox's persisted
        state is the truth, not the process-global gauges (several agents, or tests, can share a
        process)."""
        m = self.settings.metrics
        status = dict(self._report().get(name) or {})
        counts = status.get("counts") or {}
        waiting = sum(int(counts.get(s, 0)) for s in _WAITING)
        raw = status.get("oldest_waiting_seconds")
        oldest = float(raw) if isinstance(raw, int | float) else None
        now = self._clock()
        window = m.ready_upload_window_seconds
        problems = destination_problems(
            status, waiting=waiting, oldest_waiting=oldest, now=now, window=window
        )
        if problems:
            return CheckResult(False, "; ".join(problems))
        last = status.get("last_success_at")
        if isinstance(last, int | float) and last and now - last <= window:
            return CheckResult(True, f"last delivery {now - last:.0f} s ago")
        age = oldest or 0.0
        if waiting <= m.ready_max_waiting and age <= m.ready_max_waiting_age_seconds:
            return CheckResult(True, f"no recent delivery; {waiting} waiting, oldest {age:.0f} s")
        return CheckResult(
            False,
            f"no delivery in {window:.0f} s and outbox over limits: "
            f"{waiting} waiting (max {m.ready_max_waiting}), oldest {age:.0f} s "
            f"(max {m.ready_max_waiting_age_seconds:.0f} s)",
        )
