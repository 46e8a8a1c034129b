"""Disk guard: pause intake while the state folder runs short of space, resume when it returns."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Gauge

from ...logs import get_logger
from ..metrics import INTAKE_PAUSED

__all__ = ["DiskGuard", "free_bytes"]

log = get_logger()

MB = 1024 * 1024


def free_bytes(path: Path) -> int:
    """Bytes available to this (unprivileged) process on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


class DiskGuard:
    """Decides whether intake may take new files, from the free space of one folder.

    Intake pauses when free space drops below ``min_free_bytes`` and resumes once it is back
    above ``resume_free_bytes`` (default: the threshold plus 10 %, at least 16 MiB more), so a
    folder hovering at the threshold does not flap. Originals simply stay in the inbox while paused.

    The check is a single ``statvfs``: ``allow_intake()`` runs it at most once per ``min_recheck``
    seconds (the intake path calls it per file), and ``start()`` adds a slow timer (``interval``)
    that notices recovery while nothing arrives. Transitions call ``on_change(paused)``.

    Parameters
    ----------
    path:
        The folder to watch (the state folder).
    min_free_bytes:
        Threshold; 0 disables pausing.
    free:
        Injectable ``path -> free bytes`` (tests); default :func:`free_bytes`.
    """

    def __init__(
        self,
        path: Path,
        min_free_bytes: int,
        *,
        resume_free_bytes: int | None = None,
        free: Callable[[Path], int] = free_bytes,
        interval: float = 10.0,
        min_recheck: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
        gauge: Gauge = INTAKE_PAUSED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_free_bytes < 0:
            raise ValueError('Argument "min_free_bytes" must be >= 0.')
        if interval <= 0:
            raise ValueError('Argument "interval" must be > 0.')
        self.path = Path(path)
        self.min_free_bytes = int(min_free_bytes)
        if resume_free_bytes is None:
            margin = max(self.min_free_bytes // 10, 16 * MB) if self.min_free_bytes else 0
            resume_free_bytes = self.min_free_bytes + margin
        if resume_free_bytes < self.min_free_bytes:
            raise ValueError('Argument "resume_free_bytes" must be >= "min_free_bytes".')
        self.resume_free_bytes = int(resume_free_bytes)
        self._free = free
        self._interval = interval
        self._min_recheck = min_recheck
        self._on_change = on_change
        self._gauge = gauge
        self._clock = clock
        self._lock = threading.Lock()
        self._paused = False
        self._last_free: int | None = None
        self._last_check = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gauge.set(0)

    @property
    def paused(self) -> bool:
        """True while intake is paused for lack of space."""
        return self._paused

    @property
    def last_free_bytes(self) -> int | None:
        """Free bytes seen by the latest check (None before the first, or if it failed)."""
        return self._last_free

    def check(self) -> bool:
        """Measure now, update the paused state; True when intake may go on."""
        try:
            free = int(self._free(self.path))
        except OSError as exc:
            # The folder vanished or is unreadable: treat as no space rather than write blindly.
            log.error("disk_check_failed", error=type(exc).__name__, errno=exc.errno)
            free = None
        changed = False
        with self._lock:
            self._last_free = free
            self._last_check = self._clock()
            if self.min_free_bytes == 0 and free is not None:
                now_paused = False
            elif free is None:
                now_paused = True
            elif self._paused:
                now_paused = free < self.resume_free_bytes
            else:
                now_paused = free < self.min_free_bytes
            if now_paused != self._paused:
                self._paused = now_paused
                changed = True
        if changed:
            self._gauge.set(1 if now_paused else 0)
            event = "intake_paused" if now_paused else "intake_resumed"
            (log.warning if now_paused else log.info)(
                event,
                free_mb=None if free is None else round(free / MB, 1),
                min_free_mb=round(self.min_free_bytes / MB, 1),
                resume_free_mb=round(self.resume_free_bytes / MB, 1),
            )
            if self._on_change is not None:
                try:
                    self._on_change(now_paused)
                except Exception:
                    log.exception("disk_guard_callback_failed")
        return not now_paused

    def allow_intake(self) -> bool:
        """Cheap per-file gate: re-measures at most every ``min_recheck`` seconds."""
        if self._clock() - self._last_check >= self._min_recheck:
            return self.check()
        return not self._paused

    def start(self) -> None:
        """Check once now, then every ``interval`` seconds on a daemon thread."""
        self.check()
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(self._interval):
                self.check()

        self._thread = threading.Thread(target=run, name="disk-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread (the state stays as last measured)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
