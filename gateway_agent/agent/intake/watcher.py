"""The inbox watcher: inotify events plus start-up and periodic scans; hands over complete files."""

from __future__ import annotations

import heapq
import os
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from ...logs import get_logger

__all__ = ["IGNORED_SUFFIXES", "InboxWatcher", "inbox_backlog", "is_ignored"]

log = get_logger()

#: Names ending like this are temporaries of copy tools, browsers and editors: never taken as
#: they are; the rename to the final name (a move event) makes the file eligible.
IGNORED_SUFFIXES = (
    ".partial",
    ".part",
    ".tmp",
    ".temp",
    ".crdownload",
    ".download",
    ".filepart",
    ".swp",
    ".swx",
    "~",
)

#: Seconds between safety re-scans of the whole inbox (covers events lost to an inotify overflow).
RESCAN_SECONDS = 60.0
#: Empty sub-folders of the inbox older than this are removed by the re-scan.
EMPTY_DIR_AGE_SECONDS = 600.0


def is_ignored(relative: PurePath) -> bool:
    """True for hidden paths (any component starting with a dot) and temporary names."""
    if any(part.startswith(".") for part in relative.parts):
        return True
    name = relative.name.lower()
    return name.startswith("~$") or name.endswith(IGNORED_SUFFIXES)


def inbox_backlog(inbox: Path, limit: int = 100_000) -> tuple[int, float | None]:
    """Files in ``inbox`` the agent would take but has not (yet): their count (stopping at
    ``limit``) and the oldest one's mtime (epoch seconds; None when there are none).

    Counts what the watcher hands over (regular files, not hidden or temporary, symlinks never
    followed), so a file the agent cannot take shows up here with its age.
    """
    count, oldest = 0, None
    for _path, st in _inbox_files(Path(inbox), str(inbox)):
        count += 1
        oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        if count >= limit:
            break
    return count, oldest


def _inbox_files(
    root: Path,
    start: str,
    *,
    on_empty_dir: Callable[[str], None] | None = None,
    stopping: Callable[[], bool] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, lstat)`` of the files below ``start`` the watcher may take: regular files whose
    path relative to ``root`` is not hidden or temporary, depth first, symlinks never followed.

    ``on_empty_dir`` is called with every empty folder below ``root``; the walk ends early once
    ``stopping()`` is true (checked per folder).
    """
    stack = [start]
    while stack:
        current = stack.pop()
        if stopping is not None and stopping():
            return
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        if not entries and current != str(root):
            if on_empty_dir is not None:
                on_empty_dir(current)
            continue
        for entry in entries:
            try:
                rel = PurePath(entry.path).relative_to(root)
            except ValueError:
                continue
            if is_ignored(rel):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path, entry.stat(follow_symlinks=False)
            except OSError:
                continue


@dataclass
class _Observation:
    size: int
    mtime_ns: int
    since: float  # monotonic time this (size, mtime) was first seen
    deadline: float  # when the timer entry for this path is due


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: InboxWatcher) -> None:
        self._w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        w = self._w
        try:
            if isinstance(event, FileClosedEvent):
                w._consider(_fs(event.src_path), complete=True)
            elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
                w._consider(_fs(event.src_path), complete=False)
            elif isinstance(event, FileMovedEvent):
                w._forget(_fs(event.src_path))
                w._consider(_fs(event.dest_path), complete=True)
            elif isinstance(event, FileDeletedEvent):
                w._forget(_fs(event.src_path))
            elif isinstance(event, DirCreatedEvent):
                w._request_scan(_fs(event.src_path))
            elif isinstance(event, DirMovedEvent):
                w._request_scan(_fs(event.dest_path))
        except Exception as exc:  # never let one event kill the observer thread
            log.error("watcher_event_failed", event=type(event).__name__, error=type(exc).__name__)


# When folders are created inside a new folder (mkdir -p), watchdog's recursive watch can add
# the inner folder twice and warns that the callback "will be Overwritten" (with itself). That
# is harmless, and a warning raised in the inotify thread must not end it.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)

#: The event types ``_Handler`` acts on (``event_filter`` of the inotify watch).
_EVENTS = (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
)


def _fs(p: bytes | str) -> str:
    return os.fsdecode(p)


class InboxWatcher:
    """Watch ``inbox`` recursively and call ``on_ready(path)`` once per complete file.

    A file is complete when the writer closed it (close-after-write), when it was renamed into
    place, or when its size and mtime stayed unchanged for ``settle_seconds``. The settle check is
    a timer heap served by one thread that sleeps until the next deadline: an idle inbox costs no
    CPU. Hidden and temporary names (:func:`is_ignored`) and anything that is not a regular file
    (symlinks included) are never handed over; symlinks are never followed.

    ``on_ready`` must not block for long; it may be called more than once for the same path
    (the consumer deduplicates).
    """

    def __init__(
        self,
        inbox: Path,
        on_ready: Callable[[Path], None],
        *,
        settle_seconds: float = 2.0,
        rescan_seconds: float = RESCAN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = Path(inbox).resolve()
        self._on_ready = on_ready
        self._settle = float(settle_seconds)
        self._rescan_every = float(rescan_seconds)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, _Observation] = {}
        self._heap: list[tuple[float, str]] = []
        self._scan_requests: list[str] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._next_rescan = 0.0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the inotify observer, then the timer thread (which does the start-up scan)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        # Only the events the handler uses: without a filter inotify also reports IN_OPEN and
        # IN_CLOSE_NOWRITE, two events per read of an inbox file by the de-id workers.
        observer.schedule(
            _Handler(self), str(self.inbox), recursive=True, event_filter=list(_EVENTS)
        )
        observer.daemon = True
        observer.start()
        self._observer = observer
        with self._cond:
            self._stopping = False
            self._scan_requests.append(str(self.inbox))
            self._next_rescan = self._clock() + self._rescan_every
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()
        log.info("watcher_started", settle_seconds=self._settle)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop observing; files not handed over yet stay in the inbox for the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def alive(self) -> bool:
        """True while both the observer and the timer thread run."""
        obs = self._observer
        th = self._thread
        return bool(obs is not None and obs.is_alive() and th is not None and th.is_alive())

    def pending_count(self) -> int:
        """Files seen but not yet complete (waiting for their settle time)."""
        with self._cond:
            return len(self._pending)

    def resettle(self, path: Path) -> None:
        """Watch ``path`` again until it is unchanged for the settle time (it changed under us)."""
        self.retry_later(path, self._settle)

    def retry_later(self, path: Path, delay: float) -> None:
        """Offer ``path`` again in ``delay`` seconds, if it is still there (a file intake could
        not take for want of resources, e.g. a full disk). A change before then settles as usual.
        """
        key = str(path)
        try:
            st = os.lstat(path)
        except OSError:
            self._forget(key)  # gone: nothing to offer
            return
        due = self._clock() + max(0.0, delay)
        with self._cond:
            # "since" is set so that, unchanged at the deadline, the file counts as settled.
            obs = _Observation(st.st_size, st.st_mtime_ns, due - self._settle, due)
            self._pending[key] = obs
            self._push(due, key)

    def rescan(self) -> None:
        """Ask for a full scan of the inbox now (e.g. after ``retry --quarantine``)."""
        self._request_scan(str(self.inbox))

    # ----------------------------------------------------------------- event side
    def _relative(self, path: str) -> PurePath | None:
        try:
            rel = PurePath(path).relative_to(self.inbox)
        except ValueError:
            return None  # moved out of the inbox
        if not rel.parts:
            return None
        return rel

    def _consider(self, path: str, *, complete: bool) -> None:
        rel = self._relative(path)
        if rel is None or is_ignored(rel):
            return
        try:
            st = os.lstat(path)
        except OSError:
            self._forget(path)
            return
        if not stat.S_ISREG(st.st_mode):
            self._forget(path)
            return  # symlinks, fifos, devices: never taken, never followed
        if complete:
            self._forget(path)
            self._hand_over(path)
            return
        now = self._clock()
        with self._cond:
            if path in self._pending:
                return  # its timer re-checks size and mtime
            obs = _Observation(st.st_size, st.st_mtime_ns, now, now + self._settle)
            self._pending[path] = obs
            self._push(obs.deadline, path)

    def _forget(self, path: str) -> None:
        with self._cond:
            self._pending.pop(path, None)

    def _request_scan(self, directory: str) -> None:
        with self._cond:
            self._scan_requests.append(directory)
            self._cond.notify_all()

    def _push(self, deadline: float, path: str) -> None:
        # caller holds self._cond
        wake = not self._heap or deadline < self._heap[0][0]
        heapq.heappush(self._heap, (deadline, path))
        if wake:
            self._cond.notify_all()

    def _hand_over(self, path: str) -> None:
        try:
            self._on_ready(Path(path))
        except Exception as exc:
            log.error("watcher_handover_failed", error=type(exc).__name__)

    # ----------------------------------------------------------------- timer thread
    def _run(self) -> None:
        while True:
            due: list[str] = []
            scans: list[str] = []
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    if self._scan_requests or (self._heap and self._heap[0][0] <= now):
                        break
                    if now >= self._next_rescan:
                        self._scan_requests.append(str(self.inbox))
                        break
                    until = self._next_rescan
                    if self._heap:
                        until = min(until, self._heap[0][0])
                    self._cond.wait(max(0.0, until - now))
                if self._stopping:
                    return
                now = self._clock()
                scans, self._scan_requests = self._scan_requests, []
                if str(self.inbox) in scans:
                    self._next_rescan = now + self._rescan_every
                while self._heap and self._heap[0][0] <= now:
                    deadline, path = heapq.heappop(self._heap)
                    obs = self._pending.get(path)
                    if obs is not None and obs.deadline == deadline:
                        due.append(path)
            for directory in dict.fromkeys(scans):
                self._scan(directory)
            for path in due:
                self._check_settled(path)

    def _check_settled(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            self._forget(path)
            return
        if not stat.S_ISREG(st.st_mode):
            self._forget(path)
            return
        now = self._clock()
        with self._cond:
            obs = self._pending.get(path)
            if obs is None:
                return
            if (st.st_size, st.st_mtime_ns) != (obs.size, obs.mtime_ns):
                obs.size, obs.mtime_ns, obs.since = st.st_size, st.st_mtime_ns, now
                obs.deadline = now + self._settle
                self._push(obs.deadline, path)
                return
            if now - obs.since < self._settle:
                obs.deadline = obs.since + self._settle
                self._push(obs.deadline, path)
                return
            del self._pending[path]
        self._hand_over(path)

    def _scan(self, directory: str) -> None:
        """Walk ``directory`` (never following symlinks); old files are ready, fresh ones settle."""
        ready = 0
        wall = time.time()
        for path, st in _inbox_files(
            self.inbox,
            directory,
            on_empty_dir=lambda folder: self._remove_if_stale_empty(folder, wall),
            stopping=lambda: self._stopping,
        ):
            if wall - st.st_mtime >= self._settle:
                # Unchanged for longer than the settle time already: complete.
                self._forget(path)
                self._hand_over(path)
                ready += 1
            else:
                self._consider(path, complete=False)
        if ready:
            log.info("watcher_scan", ready=ready)

    def _remove_if_stale_empty(self, directory: str, wall: float) -> None:
        try:
            if wall - os.lstat(directory).st_mtime >= EMPTY_DIR_AGE_SECONDS:
                Path(directory).rmdir()
        except OSError:
            pass
