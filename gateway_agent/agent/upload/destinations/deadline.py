"""Whole-request deadlines for httpx: a watchdog thread shuts the socket of a request that overran.

httpx's timeouts apply to each network operation: a server that answers one byte per second, or
reads the request a little at a time, never trips them, and a worker would wait for ever. Here
each request of a thread gets a deadline (:meth:`Deadlines.limit`, moved on by
:meth:`Deadlines.restart` when the request is sent); a thread that passes it has the socket it is
using shut down, so the blocked read or write returns at once and the request fails with an
httpx error. The caller then sees :attr:`Slot.expired` and reports a timeout with the phase.

The sockets are seen through a wrapper around the httpcore network backend of the client's
transports (:func:`install`), so connection pooling, TLS and proxies stay httpx's own. Idle, the
watchdog sleeps on a condition variable: no polling.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

__all__ = ["Deadlines", "Slot", "install"]

#: Phase names, as they appear in reasons ("no complete reply within 30 s (reading the reply)").
CONNECTING = "connecting"
SENDING = "sending the request"
WAITING = "reading the reply"


@dataclass
class Slot:
    """The deadline of one request in one thread."""

    seconds: float
    due: float
    phase: str = CONNECTING
    sock: socket.socket | None = None
    expired: bool = False
    active: bool = True


class Deadlines:
    """Per-thread request deadlines, enforced by one watchdog thread (started on first use)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._slots: dict[int, Slot] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self.fired = 0

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[Slot]:
        """Give the calling thread's request ``seconds`` from now; the slot says if it expired."""
        slot = Slot(seconds=seconds, due=self._clock() + seconds)
        key = threading.get_ident()
        with self._cond:
            self._slots[key] = slot
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._watch, name="request-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        try:
            yield slot
        finally:
            with self._cond:
                slot.active = False
                if self._slots.get(key) is slot:
                    del self._slots[key]

    def restart(self, seconds: float) -> None:
        """The calling thread's request gets ``seconds`` from now (e.g. once its body is sent)."""
        with self._cond:
            slot = self._slots.get(threading.get_ident())
            if slot is not None and not slot.expired:
                slot.seconds = seconds
                slot.due = self._clock() + seconds
                self._cond.notify()

    def using(self, sock: socket.socket | None, phase: str) -> None:
        """Called by the network stream before each read or write of the calling thread."""
        slot = self._slots.get(threading.get_ident())
        if slot is None:
            return
        with self._cond:
            slot.sock = sock
            slot.phase = phase
            expired = slot.expired
        if expired and sock is not None:
            # The deadline passed before this socket was known to the watchdog: cut it now.
            _shutdown(sock)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- the watchdog --------------------------------------------------------------------------
    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = self._clock()
                due = [s for s in self._slots.values() if s.active and not s.expired]
                for slot in due:
                    if slot.due <= now:
                        self._expire(slot)
                pending = [s.due for s in due if not s.expired]
                self._cond.wait(None if not pending else max(0.0, min(pending) - now) + 0.01)

    def _expire(self, slot: Slot) -> None:
        slot.expired = True
        self.fired += 1
        if slot.sock is not None:
            _shutdown(slot.sock)


def _shutdown(sock: socket.socket) -> None:
    """Shut both directions: a read or write blocked in another thread returns at once. The
    base class's method: on a TLS socket it acts on the descriptor without touching the TLS
    object the worker thread is inside."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Stream(httpcore.NetworkStream):
    """A network stream that tells :class:`Deadlines` which socket the thread is using."""

    def __init__(self, inner: httpcore.NetworkStream, deadlines: Deadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines
        sock = inner.get_extra_info("socket")
        self._sock = sock if isinstance(sock, socket.socket) else None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._deadlines.using(self._sock, WAITING)
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._deadlines.using(self._sock, SENDING)
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        self._deadlines.using(self._sock, CONNECTING)
        inner = self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _Stream(inner, self._deadlines)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, deadlines: Deadlines) -> None:
        self._inner = inner
        self._deadlines = deadlines

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        self._deadlines.using(None, CONNECTING)
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream, self._deadlines)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _Stream(
            self._inner.connect_unix_socket(path, timeout, socket_options), self._deadlines
        )

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def install(client: httpx.Client, deadlines: Deadlines) -> int:
    """Route the sockets of ``client``'s httpx transports (direct and proxies) through
    ``deadlines``; returns how many connection pools now report to it (0 for a mock transport).

    httpx does not expose the network backend of its transports; the pools it builds keep it in
    ``_network_backend`` (httpcore's ``ConnectionPool``, which its proxies extend). A test with
    a server that never answers checks that this still holds.
    """
    transports: list[Any] = [getattr(client, "_transport", None)]
    transports += list(getattr(client, "_mounts", {}).values())
    wrapped = 0
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        inner = getattr(pool, "_network_backend", None)
        if isinstance(inner, httpcore.NetworkBackend) and not isinstance(inner, _Backend):
            pool._network_backend = _Backend(inner, deadlines)  # type: ignore[union-attr]
            wrapped += 1
    return wrapped
