"""The inbox watcher on real inotify: complete files only; temporaries and symlinks never."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath

import pytest

from gateway_agent.agent.intake.watcher import InboxWatcher, is_ignored


class Collector:
    """Records hand-overs; ``check`` runs inside the watcher's callback."""

    def __init__(self, check: Callable[[Path], None] | None = None) -> None:
        self.paths: list[Path] = []
        self.errors: list[str] = []
        self._check = check
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        if self._check is not None:
            try:
                self._check(path)
            except AssertionError as exc:
                self.errors.append(str(exc))
        with self._lock:
            self.paths.append(path)

    def names(self) -> set[str]:
        with self._lock:
            return {p.name for p in self.paths}

    def wait_for(self, names: set[str], timeout: float = 15.0) -> set[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not names <= self.names():
            time.sleep(0.05)
        return self.names()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    d.mkdir()
    return d


@pytest.fixture
def run_watcher() -> Iterator[Callable[..., InboxWatcher]]:
    started: list[InboxWatcher] = []

    def start(inbox: Path, collector: Collector, settle: float = 0.5) -> InboxWatcher:
        w = InboxWatcher(inbox, collector, settle_seconds=settle)
        w.start()
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def _old(path: Path) -> None:
    t = time.time() - 3600
    os.utime(path, (t, t))


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        ("IMG0001.dcm", False),
        ("IMG0001", False),
        ("DICOMDIR", False),
        (".hidden.dcm", True),
        ("x.partial", True),
        ("x.PART", True),
        ("x.tmp", True),
        ("x.dcm~", True),
        (".#x.dcm", True),
        ("~$x.dcm", True),
        ("x.crdownload", True),
        (".staging/IMG1.dcm", True),
        ("study/.rsync-tmp/IMG1.dcm", True),
        ("study/series/IMG1.dcm", False),
    ],
)
def test_is_ignored(name: str, ignored: bool) -> None:
    assert is_ignored(PurePath(name)) is ignored


def test_startup_scan_takes_old_files_and_settles_fresh_ones(
    inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    (inbox / "a" / "b").mkdir(parents=True)
    old = inbox / "a" / "b" / "old.dcm"
    old.write_bytes(b"x" * 10)
    _old(old)
    fresh = inbox / "fresh.dcm"
    fresh.write_bytes(b"y" * 10)
    (inbox / ".hidden").write_bytes(b"z")
    (inbox / "copy.partial").write_bytes(b"z")
    c = Collector()
    run_watcher(inbox, c)
    assert c.wait_for({"old.dcm", "fresh.dcm"}) == {"old.dcm", "fresh.dcm"}
    time.sleep(1.0)  # give ignored names every chance to show up
    assert c.names() == {"old.dcm", "fresh.dcm"}
    assert len(c.paths) == 2


def test_close_after_write_is_taken_once(
    inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    c = Collector()
    (inbox / "study").mkdir()
    run_watcher(inbox, c, settle=30.0)  # only the close event can make it ready in time
    (inbox / "study" / "IMG1.dcm").write_bytes(b"d" * 1000)
    assert c.wait_for({"IMG1.dcm"}) == {"IMG1.dcm"}
    time.sleep(0.5)
    assert [p.name for p in c.paths] == ["IMG1.dcm"]


def test_slow_writer_is_not_taken_before_complete(
    inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    target = inbox / "slow.dcm"
    chunks, chunk = 12, b"s" * 4096
    done = threading.Event()

    def check(path: Path) -> None:
        assert done.is_set(), "handed over while the writer was still writing"
        assert path.stat().st_size == chunks * len(chunk), "handed over incomplete"

    c = Collector(check)
    run_watcher(inbox, c, settle=1.0)
    with target.open("wb") as fh:
        for _ in range(chunks):  # ~3.6 s in total, each pause shorter than the settle time
            fh.write(chunk)
            fh.flush()
            time.sleep(0.3)
        done.set()
    assert c.wait_for({"slow.dcm"}) == {"slow.dcm"}
    assert c.errors == []


def test_settle_time_without_close_event(
    inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    """A writer that stops writing but keeps the file open: size+mtime settle decides."""
    c = Collector()
    run_watcher(inbox, c, settle=0.5)
    with (inbox / "open.dcm").open("wb") as fh:
        fh.write(b"o" * 2048)
        fh.flush()
        assert c.wait_for({"open.dcm"}) == {"open.dcm"}


def test_temporary_names_wait_for_the_rename(
    inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    c = Collector()
    run_watcher(inbox, c, settle=0.3)
    for name in ("a.partial", "b.tmp", "c.dcm~", ".#d.dcm", ".e.dcm"):
        (inbox / name).write_bytes(b"t" * 100)
    (inbox / ".staging").mkdir()
    (inbox / ".staging" / "f.dcm").write_bytes(b"t")
    time.sleep(1.2)
    assert c.names() == set()
    (inbox / "a.partial").rename(inbox / "a.dcm")
    (inbox / ".e.dcm").rename(inbox / "e.dcm")
    assert c.wait_for({"a.dcm", "e.dcm"}) == {"a.dcm", "e.dcm"}


def test_symlinks_are_never_followed(
    tmp_path: Path, inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    secret = outside / "secret.dcm"
    secret.write_bytes(b"not yours")
    (outside / "sub" / "deep.dcm").write_bytes(b"not yours either")
    (inbox / "link.dcm").symlink_to(secret)
    (inbox / "linkdir").symlink_to(outside / "sub", target_is_directory=True)
    c = Collector()
    run_watcher(inbox, c, settle=0.3)
    (inbox / "later-link.dcm").symlink_to(secret)
    (inbox / "real.dcm").write_bytes(b"mine")
    assert c.wait_for({"real.dcm"}) == {"real.dcm"}
    time.sleep(1.0)
    assert c.names() == {"real.dcm"}
    assert secret.read_bytes() == b"not yours"


def test_folder_moved_in_and_nested_folders(
    tmp_path: Path, inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    c = Collector()
    run_watcher(inbox, c, settle=0.3)
    staged = tmp_path / "staged" / "series"
    staged.mkdir(parents=True)
    for i in range(5):
        (staged / f"M{i}.dcm").write_bytes(b"m" * 10)
    (tmp_path / "staged").rename(inbox / "study")
    deep = inbox / "x" / "y" / "z"
    deep.mkdir(parents=True)
    (deep / "N.dcm").write_bytes(b"n")
    want = {f"M{i}.dcm" for i in range(5)} | {"N.dcm"}
    assert c.wait_for(want) == want


def test_resettle_and_rescan(inbox: Path, run_watcher: Callable[..., InboxWatcher]) -> None:
    c = Collector()
    w = run_watcher(inbox, c, settle=0.3)
    f = inbox / "r.dcm"
    f.write_bytes(b"r")
    assert c.wait_for({"r.dcm"}) == {"r.dcm"}
    w.resettle(f)
    end = time.monotonic() + 10
    while time.monotonic() < end and len(c.paths) < 2:
        time.sleep(0.05)
    assert [p.name for p in c.paths] == ["r.dcm", "r.dcm"]
    _old(f)
    w.rescan()
    end = time.monotonic() + 10
    while time.monotonic() < end and len(c.paths) < 3:
        time.sleep(0.05)
    assert len(c.paths) == 3
    assert w.pending_count() == 0
    assert w.alive()


def test_folders_left_empty_are_removed_after_a_while(
    tmp_path: Path, inbox: Path, run_watcher: Callable[..., InboxWatcher]
) -> None:
    """Study folders emptied by intake would pile up for ever (each costs an inotify watch and a
    step of every scan): an inbox folder empty and unchanged for 10 minutes is removed at a scan.
    A fresh empty folder (a writer may be about to fill it), a folder with a file, the inbox
    itself and anything behind a symlink stay."""
    old_empty = inbox / "study-done" / "series-1"
    old_empty.mkdir(parents=True)
    fresh_empty = inbox / "study-new"
    fresh_empty.mkdir()
    kept = inbox / "study-busy"
    kept.mkdir()
    (kept / "IMG.dcm.partial").write_bytes(b"half")  # ignored name: stays, and so does its folder
    outside = tmp_path / "outside-empty"
    outside.mkdir()
    (inbox / "link").symlink_to(outside, target_is_directory=True)
    for p in (old_empty, kept, outside):
        _old(p)
    c = Collector()
    w = run_watcher(inbox, c, settle=0.2)
    w.rescan()
    end = time.monotonic() + 10
    while time.monotonic() < end and old_empty.exists():
        time.sleep(0.05)
    assert not old_empty.exists()
    assert fresh_empty.is_dir() and kept.is_dir() and inbox.is_dir()
    assert outside.is_dir() and (inbox / "link").is_symlink()
    # The parent, emptied just now, is young again: it goes at a later scan, not at once.
    assert (inbox / "study-done").is_dir()
    assert c.paths == []
