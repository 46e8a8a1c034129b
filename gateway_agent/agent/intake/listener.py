"""The C-STORE listener: one more inbox, fed by scanners over DICOM instead of a folder.

:class:`Listener` runs a :class:`~gateway_agent.dicom.scp.StoreSCP` on ``[listener]``'s address.
Every instance it receives is on disk (fsynced, renamed into ``state/received/<calling AE>/``)
before the scanner is told 0x0000, then handed to intake, which treats it like an inbox file
(de-identify, outbox, upload, quarantine). While the disk guard pauses intake, or when a write
fails, the answer is 0xA700 (out of resources) and the scanner keeps the instance. At start-up,
instances received before a stop or a crash and not yet committed are handed to intake again.

Counters (associations, instances stored and refused, rejections, per calling AE title) go to
Prometheus (``gateway_listener_*``) and to ``state/listener.json`` for ``gateway-agent status``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...config import ListenerSettings
from ...dicom.files import atomic_write
from ...dicom.spool import received_files, source_of
from ...logs import describe_error, get_logger
from ..metrics import LISTENER_ASSOCIATIONS, LISTENER_INSTANCES

__all__ = ["MAX_TRACKED_AES", "STATS_FILE", "Listener", "source_of"]

if TYPE_CHECKING:  # pynetdicom is imported when a listener starts, not with intake
    from ...dicom.scp import ListenerEvent, StoreSCP

log = get_logger()

STATS_FILE = "listener.json"
#: Calling AE titles counted one by one (in status and metric labels); the rest as "(other)".
MAX_TRACKED_AES = 64
#: ``listener.json`` is rewritten at most this often while instances arrive.
STATS_EVERY_SECONDS = 2.0
_OTHER = "(other)"


class Listener:
    """The listener of one agent.

    Parameters
    ----------
    settings
        ``[listener]``.
    ae_title
        Our AE title (``listener.ae_title`` or the unit name).
    spool
        Where received instances are kept until intake took them (``state/received``).
    state_dir
        Holds ``listener.json``.
    submit
        Hands a received file to intake (non-blocking).
    gate
        False while intake is paused (the disk guard): instances are then refused with 0xA700.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        *,
        ae_title: str,
        spool: Path,
        state_dir: Path,
        submit: Callable[[Path], None],
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.ae_title = ae_title
        self.spool = Path(spool)
        self.stats_path = Path(state_dir) / STATS_FILE
        self._submit = submit
        self._gate = gate
        self._scp: StoreSCP | None = None
        self._lock = threading.Lock()
        self._since = time.time()
        self._totals: dict[str, int] = dict.fromkeys(
            ("associations", "rejected", "stored", "refused", "echo"), 0
        )
        self._by_ae: dict[str, dict[str, Any]] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._later: list[tuple[float, str]] = []
        self._later_cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    # -- life cycle --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._scp.port if self._scp is not None else self.settings.port

    def start(self) -> None:
        """Listen; hand intake what an earlier run received but did not commit."""
        from ...dicom.scp import StoreSCP

        s = self.settings
        self._scp = StoreSCP(
            self.spool,
            ae_title=self.ae_title,
            host=s.host,
            port=s.port,
            allowed_calling_aes=s.allowed_calling_aes,
            max_associations=s.max_associations,
            timeout=s.timeout_seconds,
            accept=self._accept,
            on_stored=self._stored,
            on_event=self._count,
        )
        self._scp.start()
        self._stop.clear()
        waiting = 0
        for path in received_files(self.spool):
            self._submit(path)
            waiting += 1
        loops = ((self._write_stats_loop, "listener-stats"), (self._later_loop, "listener-retry"))
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._dirty.set()
        log.info(
            "listener_started",
            ae_title=self.ae_title,
            port=self._scp.port,
            allowed_calling_aes=len(s.allowed_calling_aes),
            waiting=waiting,
        )

    def stop(self) -> None:
        """Stop listening (associations in progress are aborted: their senders retry)."""
        if self._scp is not None:
            self._scp.stop()
        self._stop.set()
        self._dirty.set()
        with self._later_cond:
            self._later_cond.notify_all()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads.clear()
        self._write_stats()
        log.info("listener_stopped", **self._totals)

    def alive(self) -> bool:
        return self._scp is not None and self._scp.alive()

    def retry_later(self, path: Path, delay: float) -> None:
        """Hand ``path`` to intake again after ``delay`` s (intake deferred it: disk full...)."""
        with self._later_cond:
            heapq.heappush(self._later, (time.monotonic() + delay, str(path)))
            self._later_cond.notify_all()

    def owns(self, path: Path) -> bool:
        """True for a file of the listener's spool."""
        try:
            Path(path).relative_to(self.spool)
        except ValueError:
            return False
        return True

    # -- the SCP's callbacks -----------------------------------------------------------------
    def _accept(self) -> bool:
        return self._gate() if self._gate is not None else True

    def _stored(self, path: Path, calling_ae: str) -> None:
        self._submit(path)

    def _count(self, e: ListenerEvent) -> None:
        kind = {"association": "associations"}.get(e.kind, e.kind)
        with self._lock:
            ae = e.calling_ae if e.calling_ae in self._by_ae else None
            if ae is None:
                ae = e.calling_ae if len(self._by_ae) < MAX_TRACKED_AES else _OTHER
            per = self._by_ae.setdefault(ae, {})
            self._totals[kind] = self._totals.get(kind, 0) + 1
            per[kind] = int(per.get(kind, 0)) + 1
            per["last"] = time.time()
        if e.kind == "association":
            LISTENER_ASSOCIATIONS.labels(calling_ae=ae, result="accepted").inc()
        elif e.kind == "rejected":
            LISTENER_ASSOCIATIONS.labels(calling_ae=ae, result="rejected").inc()
            log.warning("listener_association_rejected", calling_ae=e.calling_ae, reason=e.reason)
        elif e.kind == "stored":
            LISTENER_INSTANCES.labels(calling_ae=ae, result="stored").inc()
        elif e.kind == "refused":
            LISTENER_INSTANCES.labels(calling_ae=ae, result="refused").inc()
            log.warning(
                "listener_refused", calling_ae=e.calling_ae, status="0xA700", reason=e.reason
            )
        self._dirty.set()

    # -- background --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "since": self._since,
                "updated": time.time(),
                "counters": dict(self._totals),
                "by_calling_ae": {k: dict(v) for k, v in self._by_ae.items()},
            }

    def _write_stats(self) -> None:
        data = json.dumps(self.snapshot(), sort_keys=True).encode()
        try:
            atomic_write(self.stats_path, lambda fd: os.write(fd, data), fsync=False)
        except OSError as exc:  # a full disk must not stop the listener; status shows old counts
            log.warning("listener_stats_not_written", error=describe_error(exc))

    def _write_stats_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            self._write_stats()
            self._stop.wait(STATS_EVERY_SECONDS)

    def _later_loop(self) -> None:
        while True:
            with self._later_cond:
                while not self._stop.is_set():
                    now = time.monotonic()
                    if self._later and self._later[0][0] <= now:
                        break
                    wait = self._later[0][0] - now if self._later else None
                    self._later_cond.wait(wait)
                if self._stop.is_set():
                    return
                _due, path = heapq.heappop(self._later)
            with contextlib.suppress(Exception):
                if Path(path).exists():
                    self._submit(Path(path))
