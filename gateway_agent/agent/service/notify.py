"""The systemd notify protocol (sd_notify) spoken directly over the AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from ...logs import get_logger

__all__ = ["Notifier", "watchdog_interval"]

log = get_logger()


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when not asked for.

    ``WATCHDOG_PID``, when set, must name this process; otherwise the watchdog is someone else's.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def _address(raw: str) -> str | bytes | None:
    """The address for ``NOTIFY_SOCKET``: a path, or ``@name`` in the abstract namespace."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock: and anything else: not supported here


class Notifier:
    """Send sd_notify messages; every method is a no-op when ``NOTIFY_SOCKET`` is unset.

    Parameters
    ----------
    env:
        Where to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
        (default: ``os.environ``).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _address(raw) if raw else None
        if raw and self._address is None:
            log.warning("notify_socket_unsupported", scheme=raw.split(":", 1)[0])
        self._interval = watchdog_interval(env) if self._address is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._address is not None

    @property
    def watchdog_seconds(self) -> float | None:
        """The ping interval (``WATCHDOG_USEC / 2``), or None when the service has no watchdog."""
        return self._interval

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False (never raises) if it cannot."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                log.warning("notify_failed", error=type(exc).__name__, errno=exc.errno)
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (plus ``STATUS=`` and ``MAINPID=``): start-up is complete."""
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(f"STATUS={status}")
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """``STATUS=``: a one-line free-text status shown by ``systemctl status``."""
        return self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1``: the configuration is being reloaded; ``READY=1`` follows."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = ["RELOADING=1", f"MONOTONIC_USEC={usec}"]
        return self.send(*fields, *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """One ``WATCHDOG=1`` keep-alive ping."""
        return self.send("WATCHDOG=1")

    def start_watchdog(
        self, alive: Callable[[], bool], on_tick: Callable[[], None] | None = None
    ) -> bool:
        """Ping ``WATCHDOG=1`` every ``WATCHDOG_USEC/2`` from a thread while ``alive()`` is true.

        When ``alive()`` turns false (a worker thread died, or it raises), pings stop and systemd
        restarts the service after ``WatchdogSec``. ``on_tick`` runs on each tick (e.g. to refresh
        ``STATUS=``). Returns False when there is no watchdog to feed.
        """
        interval = self._interval
        if interval is None or self._thread is not None:
            return False

        def run() -> None:
            healthy = True
            while True:
                try:
                    ok = bool(alive())
                except Exception as exc:  # a broken probe counts as dead, and is said once
                    ok = False
                    log.warning("watchdog_probe_failed", error=type(exc).__name__)
                if ok:
                    self.watchdog()
                elif healthy:
                    log.error("watchdog_withheld", reason="worker threads not alive")
                healthy = ok
                if on_tick is not None:
                    try:
                        on_tick()
                    except Exception as exc:
                        log.warning("watchdog_tick_failed", error=type(exc).__name__)
                if self._stop.wait(interval):
                    return

        self._thread = threading.Thread(target=run, name="sd-watchdog", daemon=True)
        self._thread.start()
        return True

    def close(self) -> None:
        """Stop the watchdog thread and close the socket (sends nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
