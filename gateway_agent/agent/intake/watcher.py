"""The inbox watcher: inotify events plus start-up and periodic scans; hands over complete files."""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
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

__all__ = [
    "IGNORED_SUFFIXES",
    "PATH_MAX",
    "DeepFile",
    "Backlog",
    "InboxWatcher",
    "inbox_backlog",
    "is_ignored",
]

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


#: Linux's PATH_MAX: a path this long (in bytes, with its final NUL) cannot be opened by name.
PATH_MAX = 4096
#: A folder whose path is longer than this may hold names that cannot be opened by name: it is
#: walked through folder descriptors instead.
_DEEP_FOLDER = PATH_MAX - 256 - 1

#: ``on_deep(folder_fd, name, rel)``: a file whose path is too long to be opened by name, given
#: as an open descriptor of its folder (valid during the call), its name and its inbox-relative
#: path.
DeepFile = Callable[[int, str, str], None]


def _ignored_name(name: str) -> bool:
    low = name.lower()
    return name.startswith((".", "~$")) or low.endswith(IGNORED_SUFFIXES)


#: ``inbox_backlog`` reads the age of this many files at most (a read of each file's inode, on
#: the disk the agent is draining; counting names needs no such read).
BACKLOG_AGES = 1_000


@dataclass(frozen=True)
class Backlog:
    """Files waiting in the inbox, as :func:`inbox_backlog` counted them."""

    count: int  # files counted (at most the limit)
    more: bool  # more files wait beyond ``count`` (the count stopped at its limit)
    oldest: float | None  # the oldest mtime among the files whose age was read (None: none)
    oldest_exact: bool  # every waiting file's age was read: ``oldest`` is the oldest of all


def inbox_backlog(inbox: Path, limit: int = 100_000, ages: int = BACKLOG_AGES) -> Backlog:
    """Files in ``inbox`` the agent would take but has not (yet): their count (stopping at
    ``limit``) and the oldest mtime among the first ``ages`` of them (epoch seconds).

    Counts what the watcher hands over (regular files, not hidden or temporary, symlinks never
    followed, also below paths too long to open by name), so a file the agent cannot take shows
    up here with its age. Names are counted from the folder listings alone (the file type comes
    with each name); only the ``ages`` files whose age is read cost a read of their inode, so a
    count of 100,000 files stays cheap while the agent drains them.
    """
    count, oldest = 0, None

    def seen(mtime: float | None) -> None:
        nonlocal count, oldest
        count += 1
        if mtime is not None:
            oldest = mtime if oldest is None else min(oldest, mtime)

    def deep(fd: int, name: str, _rel: str) -> None:
        mtime = None
        if count < ages:
            with contextlib.suppress(OSError):
                mtime = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime
        seen(mtime)

    more = False
    for _path, entry in _inbox_entries(Path(inbox), str(inbox), on_deep=deep):
        if count >= limit:
            more = True
            break
        mtime = None
        if count < ages:
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue  # taken since the folder was listed
        seen(mtime)
    more = more or count > limit
    return Backlog(min(count, limit), more, oldest, count <= ages and not more)


def _inbox_files(
    root: Path,
    start: str,
    *,
    on_empty_dir: Callable[[str], None] | None = None,
    stopping: Callable[[], bool] | None = None,
    on_deep: DeepFile | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """``(path, lstat)`` of the files :func:`_inbox_entries` finds (a file gone before its
    ``lstat`` is left out)."""
    for path, entry in _inbox_entries(
        root, start, on_empty_dir=on_empty_dir, stopping=stopping, on_deep=on_deep
    ):
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        yield path, st


def _inbox_entries(
    root: Path,
    start: str,
    *,
    on_empty_dir: Callable[[str], None] | None = None,
    stopping: Callable[[], bool] | None = None,
    on_deep: DeepFile | None = None,
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """``(path, entry)`` of the files below ``start`` the watcher may take: regular files whose
    path relative to ``root`` is not hidden or temporary, depth first, symlinks never followed.

    Folders are read as they are walked (a folder of 200,000 files is never held in memory).
    ``on_empty_dir`` is called with every empty folder below ``root``; the walk ends early once
    ``stopping()`` is true (checked per folder). Below a folder whose path is near ``PATH_MAX``
    the walk goes on through folder descriptors, and a file whose path is too long to open by
    name goes to ``on_deep`` instead of being yielded.
    """
    root_s = str(root)
    try:
        rel = PurePath(start).relative_to(root)
    except ValueError:
        return
    if is_ignored(rel):
        return
    stack = [start]
    while stack:
        current = stack.pop()
        if stopping is not None and stopping():
            return
        try:
            entries = os.scandir(current)
        except OSError:
            continue
        empty = True
        with entries:
            for entry in entries:
                empty = False
                if _ignored_name(entry.name):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if len(os.fsencode(entry.path)) > _DEEP_FOLDER:
                            yield from _deep_files(current, entry.name, root_s, on_deep, stopping)
                        else:
                            stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield entry.path, entry
                except OSError:
                    continue
        if empty and current != root_s and on_empty_dir is not None:
            on_empty_dir(current)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _deep_files(
    parent: str,
    name: str,
    root: str,
    on_deep: DeepFile | None,
    stopping: Callable[[], bool] | None,
) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """The walk below ``parent/name`` through folder descriptors (see :func:`_inbox_entries`)."""
    try:
        parent_fd = os.open(parent, _DIR_FLAGS)
    except OSError:
        return
    try:
        first = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return
    finally:
        os.close(parent_fd)
    stack: list[tuple[int, str]] = [(first, f"{parent}/{name}")]
    try:
        while stack:
            fd, path = stack.pop()
            try:
                if stopping is not None and stopping():
                    return
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if _ignored_name(entry.name):
                            continue
                        full = f"{path}/{entry.name}"
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                                stack.append((child, full))
                            elif entry.is_file(follow_symlinks=False):
                                if len(os.fsencode(full)) < PATH_MAX:
                                    yield full, entry
                                elif on_deep is not None:
                                    on_deep(fd, entry.name, full[len(root) + 1 :])
                        except OSError:
                            continue
            finally:
                os.close(fd)
    finally:
        for fd, _path in stack:
            os.close(fd)


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
            elif isinstance(event, DirDeletedEvent) and _fs(event.src_path) == str(w.inbox):
                w._check_inbox_soon()
        except Exception as exc:  # never let one event kill the observer thread
            log.error("watcher_event_failed", event=type(event).__name__, error=type(exc).__name__)


# When folders are created inside a new folder (mkdir -p), watchdog's recursive watch can add
# the inner folder twice and warns that the callback "will be Overwritten" (with itself). That
# is harmless, and a warning raised in the inotify thread must not end it.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


class _StopRace(logging.Filter):
    """watchdog logs an error when an event arrives while its watch is being stopped (on the
    agent's shutdown, or when the watch is moved to a recreated inbox): harmless, dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRace())

#: The event types ``_Handler`` acts on (``event_filter`` of the inotify watch).
_EVENTS = (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
)
#: How often the inbox folder's identity is checked (deleted, moved away, replaced, remounted).
INBOX_CHECK_SECONDS = 1.0
#: Files refused by a full intake and remembered to be offered first when it has room; past
#: this many, the rest are found by a scan of the inbox then.
MAX_REFUSED = 10_000


def _fs(p: bytes | str) -> str:
    return os.fsdecode(p)


def _folder_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class InboxWatcher:
    """Watch ``inbox`` recursively and call ``on_ready(path)`` once per complete file.

    A file is complete when the writer closed it (close-after-write), when it was renamed into
    place, or when its size and mtime stayed unchanged for ``settle_seconds``. The settle check is
    a timer heap served by one thread that sleeps until the next deadline. Hidden and temporary
    names (:func:`is_ignored`) and anything that is not a regular file (symlinks included) are
    never handed over; symlinks are never followed.

    ``on_ready`` must not block for long; it may be called more than once for the same path
    (the consumer deduplicates). It may return False when it cannot take more now (intake full):
    a scan then pauses where it is, and resumes (refused files first) when :meth:`room` is
    called; memory stays bounded however many files wait in the inbox.

    The inbox folder itself is checked every ``INBOX_CHECK_SECONDS``: deleted (or unmounted) it
    is reported (:attr:`missing`, a log line); when a folder is back under its name (recreated,
    moved back, remounted) the watch moves to it at once, a scan follows, and ``on_inbox_back``
    is called (the daemon locks the new folder). Files too deep to open by name go to
    ``on_deep`` (see :data:`DeepFile`).
    """

    def __init__(
        self,
        inbox: Path,
        on_ready: Callable[[Path], bool | None],
        *,
        settle_seconds: float = 2.0,
        rescan_seconds: float = RESCAN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        on_deep: DeepFile | None = None,
        on_inbox_back: Callable[[], None] | None = None,
        inbox_check_seconds: float = INBOX_CHECK_SECONDS,
    ) -> None:
        self.inbox = Path(inbox).resolve()
        self._on_ready = on_ready
        self._on_deep = on_deep
        self._on_inbox_back = on_inbox_back
        self._settle = float(settle_seconds)
        self._rescan_every = float(rescan_seconds)
        self._inbox_every = float(inbox_check_seconds)
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[str, _Observation] = {}
        self._heap: list[tuple[float, str]] = []
        self._scan_requests: list[str] = []
        # Scans in progress, oldest first: the walk, and the file intake refused (if parked).
        self._scans: deque[tuple[str, Iterator[tuple[str, os.stat_result]], str | None]] = deque()
        self._refused: dict[str, None] = {}
        self._refused_lost = False
        self._room = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._next_rescan = 0.0
        self._next_inbox_check = 0.0
        self._identity: tuple[int, int] | None = None
        self.missing = False

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the inotify observer, then the timer thread (which does the start-up scan)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._identity = _folder_identity(self.inbox)
        observer = Observer()
        observer.daemon = True
        self._observer = observer
        self._watch()
        observer.start()
        with self._cond:
            self._stopping = False
            self._scan_requests.append(str(self.inbox))
            now = self._clock()
            self._next_rescan = now + self._rescan_every
            self._next_inbox_check = now + self._inbox_every
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()
        log.info("watcher_started", settle_seconds=self._settle)

    def _watch(self) -> None:
        """(Re)place the inotify watch on the inbox folder as it is now."""
        assert self._observer is not None
        self._observer.unschedule_all()
        # Only the events the handler uses: without a filter inotify also reports IN_OPEN and
        # IN_CLOSE_NOWRITE, two events per read of an inbox file by the de-id workers.
        self._observer.schedule(
            _Handler(self), str(self.inbox), recursive=True, event_filter=list(_EVENTS)
        )

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
        with self._cond:
            for _directory, walk, _refused in self._scans:
                close = getattr(walk, "close", None)
                if close is not None:
                    close()
            self._scans.clear()

    def alive(self) -> bool:
        """True while both the observer and the timer thread run."""
        obs = self._observer
        th = self._thread
        return bool(obs is not None and obs.is_alive() and th is not None and th.is_alive())

    def pending_count(self) -> int:
        """Files seen but not yet complete (waiting for their settle time), or waiting for room."""
        with self._cond:
            return len(self._pending) + len(self._refused) + len(self._scans)

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

    def room(self) -> None:
        """Intake can take files again: refused files first, then the paused scans go on."""
        with self._cond:
            self._room = True
            self._cond.notify_all()

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
        st = self._regular_file(path)
        if st is None:
            return
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

    def _regular_file(self, path: str) -> os.stat_result | None:
        """``path``'s ``lstat`` when it is a regular file; else None, and it is forgotten (gone,
        or a symlink, fifo or device: never taken, never followed)."""
        try:
            st = os.lstat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            self._forget(path)
            return None
        return st

    def _forget(self, path: str) -> None:
        with self._cond:
            self._pending.pop(path, None)

    def _request_scan(self, directory: str) -> None:
        with self._cond:
            self._scan_requests.append(directory)
            self._cond.notify_all()

    def _check_inbox_soon(self) -> None:
        with self._cond:
            self._next_inbox_check = 0.0
            self._cond.notify_all()

    def _push(self, deadline: float, path: str) -> None:
        # caller holds self._cond
        wake = not self._heap or deadline < self._heap[0][0]
        heapq.heappush(self._heap, (deadline, path))
        if wake:
            self._cond.notify_all()

    def _offer(self, path: str) -> bool:
        """``on_ready(path)``: False if intake refused it (full), True otherwise."""
        try:
            return self._on_ready(Path(path)) is not False
        except Exception as exc:
            log.error("watcher_handover_failed", error=type(exc).__name__)
            return True

    def _hand_over(self, path: str) -> None:
        """Offer a complete file; one refused waits (bounded) for :meth:`room`."""
        if self._offer(path):
            return
        with self._cond:
            if len(self._refused) < MAX_REFUSED:
                self._refused[path] = None
            else:
                self._refused_lost = True  # a scan finds it when there is room

    # ----------------------------------------------------------------- timer thread
    def _run(self) -> None:
        while True:
            due: list[str] = []
            scans: list[str] = []
            with self._cond:
                while not self._stopping:
                    now = self._clock()
                    if (
                        self._scan_requests
                        or self._room
                        or (self._heap and self._heap[0][0] <= now)
                        or now >= self._next_inbox_check
                    ):
                        break
                    if now >= self._next_rescan:
                        self._scan_requests.append(str(self.inbox))
                        break
                    until = min(self._next_rescan, self._next_inbox_check)
                    if self._heap:
                        until = min(until, self._heap[0][0])
                    self._cond.wait(max(0.0, until - now))
                if self._stopping:
                    return
                now = self._clock()
                check_inbox = now >= self._next_inbox_check
                if check_inbox:
                    self._next_inbox_check = now + self._inbox_every
                room, self._room = self._room, False
                scans, self._scan_requests = self._scan_requests, []
                if str(self.inbox) in scans:
                    self._next_rescan = now + self._rescan_every
                while self._heap and self._heap[0][0] <= now:
                    deadline, path = heapq.heappop(self._heap)
                    obs = self._pending.get(path)
                    if obs is not None and obs.deadline == deadline:
                        due.append(path)
            if check_inbox:
                self._check_inbox()
            if room:
                self._offer_refused()
            for directory in dict.fromkeys(scans):
                self._start_scan(directory)
            self._advance_scans()
            for path in due:
                self._check_settled(path)

    def _check_inbox(self) -> None:
        """Follow the inbox folder: missing (say so), or back under its name (watch it)."""
        identity = _folder_identity(self.inbox)
        if identity == self._identity:
            return
        if identity is None:
            if not self.missing:
                self.missing = True
                log.error("inbox_missing", inbox=str(self.inbox))
            self._identity = None
            return
        assert self._observer is not None
        try:
            self._watch()
        except OSError as exc:
            log.error("inbox_watch_failed", errno=exc.errno)
            return
        was_missing = self.missing
        self._identity = identity
        self.missing = False
        log.warning("inbox_back" if was_missing else "inbox_replaced", inbox=str(self.inbox))
        if self._on_inbox_back is not None:
            try:
                self._on_inbox_back()
            except Exception as exc:
                log.error("inbox_back_failed", error=type(exc).__name__)
        self._start_scan(str(self.inbox))

    def _offer_refused(self) -> None:
        with self._cond:
            refused = list(self._refused)
        for i, path in enumerate(refused):
            if not self._offer(path):
                return  # full again: the rest wait for the next room()
            with self._cond:
                self._refused.pop(path, None)
            if i % 64 == 63 and self._stopping:
                return
        with self._cond:
            lost, self._refused_lost = self._refused_lost, False
        if lost:
            self._start_scan(str(self.inbox))

    def _check_settled(self, path: str) -> None:
        st = self._regular_file(path)
        if st is None:
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

    # ----------------------------------------------------------------- scans
    def _start_scan(self, directory: str) -> None:
        """Queue a walk of ``directory`` (one of the whole inbox replaces any not started yet)."""
        walk = _inbox_files(
            self.inbox,
            directory,
            on_empty_dir=self._remove_if_stale_empty,
            stopping=lambda: self._stopping,
            on_deep=self._on_deep,
        )
        with self._cond:
            if any(d == directory and r is None for d, _w, r in self._scans):
                return  # the same walk is queued and has not met a full intake yet
            self._scans.append((directory, walk, None))

    def _advance_scans(self) -> None:
        """Walk the queued scans, handing over what is complete, until intake is full (the walk
        is parked where it is) or every scan is done. Old files are ready; fresh ones settle."""
        ready = 0
        while not self._stopping:
            with self._cond:
                if not self._scans or self._refused:
                    break
                directory, walk, refused = self._scans[0]
            if refused is not None:
                if not self._offer(refused):
                    break
                with self._cond:
                    self._scans[0] = (directory, walk, None)
            wall = time.time()
            parked = False
            for path, st in walk:
                if wall - st.st_mtime >= self._settle:
                    # Unchanged for longer than the settle time already: complete.
                    self._forget(path)
                    if not self._offer(path):
                        with self._cond:
                            self._scans[0] = (directory, walk, path)
                        parked = True
                        break
                    ready += 1
                else:
                    self._consider(path, complete=False)
                if self._stopping:
                    break
            if parked or self._stopping:
                break
            with self._cond:
                self._scans.popleft()
        if ready:
            log.info("watcher_scan", ready=ready)

    def _remove_if_stale_empty(self, directory: str) -> None:
        try:
            if time.time() - os.lstat(directory).st_mtime >= EMPTY_DIR_AGE_SECONDS:
                Path(directory).rmdir()
        except OSError:
            pass
