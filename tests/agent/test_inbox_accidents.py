"""Intake under accidents at the inbox, in process with real parts: real worker processes, a real
SQLite outbox, real inotify, a real read-only mount.

Files replaced or rewritten while they are processed, writers that append in rounds, names that
are not UTF-8, an inbox that refuses removals, the inbox folder replaced, 255-byte names, paths
deeper than PATH_MAX, and a bounded hand-over however many files wait.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.agent.intake.originals import Originals, fit_name, undeletable_count
from gateway_agent.agent.intake.quarantine import Quarantine
from gateway_agent.agent.intake.watcher import InboxWatcher, inbox_backlog
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.cli import main
from gateway_agent.deid import Deidentifier
from gateway_agent.synthetic import make_ct_slice
from tests.conftest import require
from tests.reliability._accidents import readonly_folder

from ._agent_util import start_intake, wait_until, write_synthetic


def _ct(i: int, rows: int = 32) -> bytes:
    import io

    buf = io.BytesIO()
    make_ct_slice(study_seed="acc-unit", instance_number=i + 1, rows=rows, cols=rows).save_as(
        buf, enforce_file_format=True
    )
    return buf.getvalue()


class SwappingEngine:
    """The real engine; while it reads ``swap_name``, another file takes that name (rsync-style:
    a temporary renamed over it, with the first's size and mtime, or rewritten in place)."""

    def __init__(self, inner: Deidentifier, inbox: Path, swap_name: str, data: bytes) -> None:
        self.inner, self.inbox, self.swap_name, self.data = inner, inbox, swap_name, data
        self.in_place = False

    def deidentify_file(self, src: str, out_dir: str, **kw: Any) -> Any:
        result = self.inner.deidentify_file(src, out_dir, **kw)
        target = self.inbox / self.swap_name
        flag = self.inbox.parent / "swapped"
        if os.readlink(src) == str(target) and not flag.exists():
            flag.touch()
            st = target.stat()
            if self.in_place:
                with target.open("r+b") as fh:
                    fh.write(self.data)
            else:
                tmp = self.inbox / ".swap.tmp"
                tmp.write_bytes(self.data)
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
                tmp.replace(target)
        return result


def _pad(data: bytes, size: int) -> bytes:
    n = size - len(data) - 12
    return data + b"\xfc\xff\xfc\xffOB\x00\x00" + n.to_bytes(4, "little") + b"\0" * n


@pytest.mark.parametrize("in_place", [False, True])
def test_a_file_replaced_while_processed_is_not_deleted(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox, in_place: bool
) -> None:
    first, second = _ct(1), _ct(2)
    size = max(len(first), len(second)) + 64
    first, second = _pad(first, size), _pad(second, size)
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    swapping = SwappingEngine(engine, inbox, "PHIDOE.dcm", second)
    swapping.in_place = in_place
    it = start_intake(tmp_path, swapping, outbox)
    try:
        (inbox / "PHIDOE.dcm").write_bytes(first)
        it.submit(inbox / "PHIDOE.dcm")
        # The name now holds the second file: it is taken again (here at once: no watcher), not
        # deleted as if it were the first.
        assert wait_until(lambda: not (inbox / "PHIDOE.dcm").exists() and it.idle(), timeout=60)
    finally:
        it.stop()
    assert (tmp_path / "swapped").exists()
    uids = {r.sop_instance_uid for r in outbox.rows()}
    expected = tmp_path / "expected"
    expected.mkdir()
    want = set()
    for i, data in enumerate((first, second)):
        (expected / f"{i}.dcm").write_bytes(data)
        want.add(engine.deidentify_file(expected / f"{i}.dcm", expected).sop_instance_uid)
    second_uid = engine.deidentify_file(expected / "1.dcm", expected).sop_instance_uid
    assert second_uid in uids
    # Replaced by a rename, the first was read whole and is committed too; rewritten in place,
    # the bytes read may mix both versions: that output is dropped.
    assert uids == (want if not in_place else {second_uid})


def test_a_bad_file_still_being_written_is_not_quarantined(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    """Written in rounds (open, append, close): a round that parses as truncated is offered again,
    not quarantined; once complete the file is committed; nothing lands in the quarantine."""
    offered: list[Path] = []
    it = start_intake(tmp_path, engine, outbox, resettle=offered.append, settle_seconds=5.0)
    inbox = tmp_path / "inbox"
    data = _ct(3, rows=64)
    target = inbox / "PHIDOE_growing.dcm"
    try:
        with target.open("wb") as fh:
            fh.write(data[: len(data) // 2])
        it.submit(target)
        assert wait_until(lambda: len(offered) == 1 and it.idle(), timeout=60)
        assert target.exists() and not list((tmp_path / "state" / "quarantine").glob("*"))
        with target.open("ab") as fh:
            fh.write(data[len(data) // 2 :])
        it.submit(target)
        assert wait_until(lambda: not target.exists(), timeout=60)
    finally:
        it.stop()
    assert len(outbox.rows()) == 1


def test_a_bad_file_that_stays_bad_is_quarantined_once(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    offered: list[Path] = []
    mono = [0.0]
    it = start_intake(
        tmp_path,
        engine,
        outbox,
        resettle=offered.append,
        settle_seconds=5.0,
        monotonic=lambda: mono[0],
    )
    target = tmp_path / "inbox" / "PHIDOE_bad.dcm"
    try:
        target.write_bytes(b"not dicom" * 50)
        it.submit(target)
        assert wait_until(lambda: len(offered) == 1 and it.idle(), timeout=60)
        assert target.exists()  # fresh: offered again first
        it.submit(target)  # back unchanged at once (a second event): not yet
        assert wait_until(lambda: len(offered) == 2 and it.idle(), timeout=60)
        assert target.exists()
        mono[0] += 5.0
        it.submit(target)  # back unchanged after the settle time: still bad
        assert wait_until(lambda: not target.exists(), timeout=60)
        # An old bad file (unchanged for longer than the settle time) goes at once.
        old = tmp_path / "inbox" / "PHIDOE_old.dcm"
        old.write_bytes(b"not dicom either" * 50)
        os.utime(old, (time.time() - 60, time.time() - 60))
        it.submit(old)
        assert wait_until(lambda: not old.exists(), timeout=60)
    finally:
        it.stop()
    reasons = [
        json.loads((e / "reason.json").read_text())["reason"]
        for e in (tmp_path / "state" / "quarantine").iterdir()
    ]
    assert reasons == ["not_dicom", "not_dicom"] and len(offered) == 2


def test_a_bad_file_written_on_since_it_was_read_is_not_quarantined(tmp_path: Path) -> None:
    """A writer in rounds whose file was read bad (truncated), then appended to before that
    result is judged, with a read-time mtime older than the settle time (a slow machine, a
    writer that kept the times): settled again, never quarantined from the stale reading."""
    from concurrent.futures import Future

    from gateway_agent.agent.intake.commit import GroupCommit, Job
    from gateway_agent.agent.intake.worker import identity_of

    offered: list[Path] = []
    quarantine = Quarantine(tmp_path / "quarantine")
    commit = GroupCommit(
        outbox=Outbox(":memory:"),
        quarantine=quarantine,
        originals=Originals("delete", archive_dir=None, state_dir=tmp_path),
        requeue=lambda _p: None,
        defer=lambda _p: None,
        resettle=offered.append,
        settle_seconds=2.0,
    )
    target = tmp_path / "PHIDOE_rounds.dcm"
    data = _ct(5, rows=64)
    target.write_bytes(data[: len(data) // 3])
    os.utime(target, (time.time() - 60, time.time() - 60))
    st = os.lstat(target)
    identity = identity_of(st)
    future: Future[Any] = Future()  # the worker's task of one file
    future.set_result([("error", "truncated", "ends inside an element", 0.01, identity)])
    job = Job(str(target), st.st_size, st.st_mtime_ns, target.name, future=future)
    with target.open("ab") as fh:  # the writer went on after the worker's read
        fh.write(data[len(data) // 3 :])
    assert commit.finish([job]) == []
    assert offered == [target] and target.exists()
    assert quarantine.entries() == []


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("originals", ["delete", "keep"])
def test_names_that_are_not_utf8_are_processed(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox, originals: Any
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    raw = os.path.join(os.fsencode(inbox), b"M\xfcller\xff\xfe.dcm")
    with open(raw, "wb") as fh:
        fh.write(_ct(4))
    path = Path(os.fsdecode(raw))
    it = start_intake(tmp_path, engine, outbox, originals=originals)
    try:
        it.submit(path)
        assert wait_until(lambda: len(outbox.rows()) == 1 and it.idle(), timeout=60)
        assert os.path.exists(raw) is (originals == "keep")
    finally:
        it.stop()
    if originals == "keep":  # remembered: not taken again by the next agent
        it = start_intake(tmp_path, engine, outbox, originals=originals)
        try:
            it.submit(path)
            assert wait_until(it.idle, timeout=30)
            assert it.committed == 0
        finally:
            it.stop()


# --------------------------------------------------------------------------- a read-only inbox


def test_originals_the_inbox_will_not_give_up_are_remembered(
    tmp_path: Path, engine: Deidentifier, outbox: Outbox
) -> None:
    inbox = tmp_path / "inbox"
    paths = write_synthetic(inbox, 3, seed="ro")
    try:
        ctx = readonly_folder(inbox)
        ctx.__enter__()
    except OSError:
        require(False, "a read-only bind mount or chattr +i (root)")
        return
    try:
        it = start_intake(tmp_path, engine, outbox)
        try:
            for p in paths:
                it.submit(p)
            assert wait_until(lambda: it.committed == 3 and it.idle(), timeout=60)
            assert it.undeletable_originals() == 3
        finally:
            it.stop()
        assert undeletable_count(tmp_path / "state") == 3
        made = {p.name: p.stat().st_ino for p in (tmp_path / "state" / "outbox").iterdir()}
        # The next agent does not process them again.
        it = start_intake(tmp_path, engine, outbox)
        try:
            for p in paths:
                it.submit(p)
            assert wait_until(it.idle, timeout=30)
            assert it.committed == 0 and it.undeletable_originals() == 3
        finally:
            it.stop()
        assert {p.name: p.stat().st_ino for p in (tmp_path / "state" / "outbox").iterdir()} == made
    finally:
        ctx.__exit__(None, None, None)
    # Writable again: the next offer removes them, and forgets them.
    it = start_intake(tmp_path, engine, outbox)
    try:
        for p in paths:
            it.submit(p)
        assert wait_until(lambda: not any(p.exists() for p in paths), timeout=30)
        assert it.undeletable_originals() == 0 and it.committed == 0
    finally:
        it.stop()
    assert undeletable_count(tmp_path / "state") == 0


# --------------------------------------------------------------------------- long names


def test_fit_name_keeps_names_within_255_bytes() -> None:
    long = "é" * 127 + "x"  # 255 bytes
    assert len(os.fsencode(long)) == 255
    fitted = fit_name(long, ".1733400000000")
    assert len(os.fsencode(fitted)) <= 255 and fitted.endswith(".1733400000000")
    assert fit_name("short.dcm", ".1") == "short.dcm.1"


def test_archive_collision_of_255_byte_names(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "archive"
    inbox.mkdir(exist_ok=True)
    name = "PHIDOE_" + "z" * 244 + ".dcm"
    originals = Originals("archive", archive_dir=archive, state_dir=tmp_path)
    for content in (b"one", b"two"):
        (inbox / name).write_bytes(content)
        assert originals.dispose(inbox / name, name, None) == "done"
        assert not (inbox / name).exists()
    originals.close()
    assert sorted(p.read_bytes() for p in archive.iterdir()) == [b"one", b"two"]
    assert all(len(os.fsencode(p.name)) <= 255 for p in archive.iterdir())


def test_release_of_a_255_byte_name_from_quarantine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    name = "PHIDOE_" + "q" * 244 + ".dcm"
    (inbox / name).write_bytes(b"junk")
    q = Quarantine(tmp_path / "state" / "quarantine")
    entry = q.put(inbox / name, "not_dicom", original_name=name)
    settings = ["--state-dir", str(tmp_path / "state"), "--inbox", str(inbox)]
    assert main(["retry", "--quarantine", *settings, entry]) == 0
    out = capsys.readouterr()
    assert "PHIDOE" not in out.out + out.err
    assert (inbox / f"retry-{entry}" / name).read_bytes() == b"junk"


def test_retry_that_cannot_release_says_so_without_the_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    (inbox / "PHIDOE.dcm").write_bytes(b"junk")
    q = Quarantine(tmp_path / "state" / "quarantine")
    entry = q.put(inbox / "PHIDOE.dcm", "not_dicom")
    (inbox / f"retry-{entry}").write_text("a file where the folder would go")
    settings = ["--state-dir", str(tmp_path / "state"), "--inbox", str(inbox)]
    assert main(["retry", "--quarantine", *settings]) == 1
    out = capsys.readouterr()
    assert f"quarantine entry {entry} not released" in out.err
    assert "PHIDOE" not in out.out + out.err and "Traceback" not in out.err


# --------------------------------------------------------------------------- deep paths


def _deep_file(inbox: Path, data: bytes) -> None:
    part = "PHIDOE" + "d" * 240
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(18):  # 18 x 247 bytes: past PATH_MAX
            os.mkdir(part, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("PHIDOE_deep.dcm", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def test_a_file_deeper_than_path_max_is_seen_and_quarantined(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    _deep_file(inbox, b"deep data")
    backlog = inbox_backlog(inbox)
    assert backlog.count == 1 and backlog.oldest is not None
    q = Quarantine(tmp_path / "quarantine")
    seen: list[str] = []

    def deep(fd: int, name: str, rel: str) -> None:
        seen.append(name)
        q.put_at(fd, name, "path_too_long", original_name=rel)

    w = InboxWatcher(inbox, lambda _p: None, settle_seconds=0.1, on_deep=deep)
    w.start()
    try:
        assert wait_until(lambda: seen == ["PHIDOE_deep.dcm"], timeout=30)
    finally:
        w.stop()
    (entry,) = q.entries()
    assert (
        entry.reason == "path_too_long" and (entry.path / "original").read_bytes() == b"deep data"
    )
    assert inbox_backlog(inbox).count == 0


# --------------------------------------------------------------------------- the inbox folder


def test_watcher_follows_an_inbox_deleted_and_recreated(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    got: list[str] = []
    back: list[int] = []
    w = InboxWatcher(
        inbox,
        lambda p: got.append(p.name),
        settle_seconds=0.1,
        rescan_seconds=600,
        on_inbox_back=lambda: back.append(1),
        inbox_check_seconds=0.2,
    )
    w.start()
    try:
        (inbox / "a.dcm").write_bytes(b"a")
        assert wait_until(lambda: "a.dcm" in got, timeout=10)
        os.rename(inbox, tmp_path / "inbox-old")
        assert wait_until(lambda: w.missing, timeout=10)
        inbox.mkdir()
        assert wait_until(lambda: not w.missing and back, timeout=10)
        (inbox / "b.dcm").write_bytes(b"b")
        assert wait_until(lambda: "b.dcm" in got, timeout=10)  # not the 600 s re-scan
        # moved away and a new folder made in its place at once (never seen missing)
        os.rename(inbox, tmp_path / "inbox-older")
        inbox.mkdir()
        assert wait_until(lambda: len(back) == 2, timeout=10)
        (inbox / "c.dcm").write_bytes(b"c")
        assert wait_until(lambda: "c.dcm" in got, timeout=10)
    finally:
        w.stop()


# --------------------------------------------------------------------------- bounded hand-over


def test_a_full_intake_parks_the_scan_and_it_resumes_where_it_was(tmp_path: Path) -> None:
    """``on_ready`` refuses past 50 files: the scan stops there; each ``room()`` lets it go on
    from where it was (every file offered once, none walked again), and events that come while
    intake is full are offered when there is room."""
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    for i in range(300):
        (inbox / f"f{i:04d}.dcm").write_bytes(b"x")
        os.utime(inbox / f"f{i:04d}.dcm", (time.time() - 60, time.time() - 60))
    taken: list[str] = []
    capacity = [50]
    lock = threading.Lock()

    def on_ready(p: Path) -> bool:
        with lock:
            if capacity[0] == 0:
                return False
            capacity[0] -= 1
            taken.append(p.name)
            return True

    w = InboxWatcher(inbox, on_ready, settle_seconds=0.1, rescan_seconds=600)
    w.start()
    try:
        assert wait_until(lambda: len(taken) == 50, timeout=10)
        time.sleep(0.3)
        assert len(taken) == 50  # parked, not spinning
        (inbox / "late.dcm").write_bytes(b"x")  # an event while full: remembered
        time.sleep(0.3)
        while len(taken) < 301:
            before = len(taken)
            with lock:
                capacity[0] = 50
            w.room()
            assert wait_until(lambda b=before: len(taken) > b, timeout=10)
    finally:
        w.stop()
    assert len(taken) == len(set(taken)) == 301
