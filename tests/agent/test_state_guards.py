"""Guards of the state folder: one agent per state folder and per inbox, the site secret's
fingerprint, SIGHUP.

In process where a real part allows it (two Daemons, real ``flock`` locks, real files); the lock
held by a killed process uses a real child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway_agent._exceptions import ConfigError
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.service.daemon import Daemon
from gateway_agent.agent.service.locks import FolderLock, StateLock
from gateway_agent.agent.service.secretguard import (
    FINGERPRINT_NAME,
    fingerprint,
    load_guarded_secret,
)

from ._agent_util import agent_settings, files_under, wait_until, write_synthetic

# --------------------------------------------------------------------------- locks


def test_state_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    first, second = StateLock(tmp_path), StateLock(tmp_path)
    first.acquire()
    with pytest.raises(ConfigError) as err:
        second.acquire()
    assert "another agent" in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    assert "\n" not in str(err.value)
    first.release()
    second.acquire()  # free again
    second.release()
    assert (tmp_path / "agent.lock").stat().st_mode & 0o777 == 0o600


def test_inbox_lock_on_a_folder(tmp_path: Path) -> None:
    a, b = FolderLock(tmp_path, "inbox"), FolderLock(tmp_path, "inbox")
    a.acquire()
    with pytest.raises(ConfigError, match="another agent is running with this inbox"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path;"
        "from gateway_agent.agent.service.locks import StateLock;"
        "StateLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {proc.pid}"):
            StateLock(tmp_path).acquire()
        proc.kill()
        proc.wait(10)
        lock = StateLock(tmp_path)
        lock.acquire()
        lock.release()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_second_daemon_refused_before_it_touches_the_outbox(tmp_path: Path) -> None:
    """The first daemon has rows in ``sending``; a second one on the same state folder (another
    inbox) and a third on the same inbox (another state folder) refuse to start, and the first's
    rows stay as they were (no ``requeue_stale`` by the newcomer)."""
    settings = agent_settings(tmp_path)
    first = Daemon(settings, components=[], service=False)
    first.start()
    try:
        assert first.outbox is not None
        first.uploaders["default"].stop(time.monotonic() + 5)  # type: ignore[union-attr]
        assert first.outbox.add(
            sop_instance_uid="2.25.1",
            study_instance_uid="2.25.2",
            series_instance_uid="2.25.3",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            path=tmp_path / "x.dcm",
            size=1,
            audit={},
        )
        claimed = first.outbox.queue("default").claim(
            max_items=1, max_bytes=1 << 20, lease_seconds=600
        )
        assert [r.state for r in claimed] == ["sending"]
        same_state = agent_settings(tmp_path, inbox=tmp_path / "inbox2")
        same_inbox = agent_settings(tmp_path, state_dir=tmp_path / "state2")
        for other in (same_state, same_inbox):
            with pytest.raises(ConfigError, match="another agent is running"):
                Daemon(other, components=[], service=False).start()
        assert first.outbox.counts()["sending"] == 1
        assert not (tmp_path / "state2" / "outbox.db").exists()
    finally:
        first.stop()
    # Released on stop: the same settings start again.
    again = Daemon(settings, components=[], service=False)
    again.start()
    again.stop()


# --------------------------------------------------------------------------- the site secret


def _guard(tmp_path: Path, *, rows: bool = False, new: bool = False) -> bytes:
    return load_guarded_secret(
        tmp_path / "secret.key", tmp_path, holds_instances=lambda: rows, new_secret=new
    )


def test_fingerprint_recorded_on_first_start_and_checked_after(tmp_path: Path) -> None:
    secret = _guard(tmp_path)
    record = tmp_path / FINGERPRINT_NAME
    assert record.read_text().strip() == fingerprint(secret)
    assert secret.decode() not in record.read_text()
    assert record.stat().st_mode & 0o777 == 0o600
    assert _guard(tmp_path) == secret  # the same secret: fine
    (tmp_path / "secret.key").write_text("f" * 64 + "\n")
    with pytest.raises(ConfigError) as err:
        _guard(tmp_path)
    message = str(err.value)
    assert "--new-secret" in message and "backup" in message and "\n" not in message
    assert "f" * 16 not in message  # never the secret itself


def test_missing_secret_with_instances_is_not_recreated(tmp_path: Path) -> None:
    _guard(tmp_path)
    (tmp_path / "secret.key").unlink()
    with pytest.raises(ConfigError, match="missing"):
        _guard(tmp_path)
    assert not (tmp_path / "secret.key").exists()
    # A state folder from a version that recorded no fingerprint, but holding rows: refused too.
    (tmp_path / FINGERPRINT_NAME).unlink()
    with pytest.raises(ConfigError, match="missing"):
        _guard(tmp_path, rows=True)
    assert not (tmp_path / "secret.key").exists()
    # ... and an empty state folder simply gets a new secret.
    assert _guard(tmp_path)


def test_new_secret_accepts_and_records_the_new_one(tmp_path: Path) -> None:
    old = _guard(tmp_path)
    (tmp_path / "secret.key").unlink()
    new = _guard(tmp_path, new=True)
    assert new != old
    assert (tmp_path / FINGERPRINT_NAME).read_text().strip() == fingerprint(new)
    assert _guard(tmp_path) == new  # from now on the new one is the recorded one


def test_daemon_refuses_a_replaced_secret_before_requeueing(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    write_synthetic(settings.inbox, 3, seed="guard")
    d = Daemon(settings, components=[], service=False)
    d.start()
    try:
        assert wait_until(lambda: not files_under(settings.inbox), timeout=60)
    finally:
        d.stop()
    settings.secret_file.write_text("0123456789abcdef" * 4 + "\n")
    with pytest.raises(ConfigError, match="--new-secret"):
        Daemon(settings, components=[], service=False).start()
    d = Daemon(settings, components=[], service=False, new_secret=True)
    d.start()
    d.stop()
    outbox = Outbox(settings.state_dir / "outbox.db")
    try:
        assert outbox.counts()["sent"] == 3
    finally:
        outbox.close()


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_in_process_and_keeps_going(tmp_path: Path) -> None:
    """``run_forever`` in a thread of this process: SIGHUP (delivered to the main thread, which
    the handler only flags) stops gracefully and starts again with the reloaded settings."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    settings = agent_settings(tmp_path)
    moved = agent_settings(tmp_path, **{"destination.folder": tmp_path / "destination-2"})
    d = Daemon(settings, components=[], service=False)
    reloads: list[int] = []

    def reload() -> object:
        reloads.append(1)
        return moved

    result: list[int] = []
    previous = signal.getsignal(signal.SIGHUP)
    runner = threading.Thread(target=lambda: result.append(d.run_forever(reload)))  # type: ignore[arg-type]
    runner.start()
    try:
        assert wait_until(lambda: d.watcher is not None, timeout=60)
        write_synthetic(settings.inbox, 2, seed="before")
        assert wait_until(lambda: len(files_under(tmp_path / "destination")) == 2, timeout=60)
        # run_forever installs its handlers only in the main thread: call the path it takes.
        d._reload_requested = True
        d._stop_event.set()
        assert wait_until(lambda: reloads and d.settings is moved and d.watcher, timeout=60)
        write_synthetic(settings.inbox, 2, seed="after")
        assert wait_until(lambda: len(files_under(tmp_path / "destination-2")) == 2, timeout=60)
    finally:
        d.request_stop()
        runner.join(60)
        signal.signal(signal.SIGHUP, previous)
    assert result == [0]


def test_anonymize_does_not_replace_an_agents_lost_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway_agent.cli import main

    state = tmp_path / "state"
    _guard(state)  # an agent ran here: its secret and the fingerprint
    (state / "secret.key").unlink()
    src = tmp_path / "in"
    write_synthetic(src, 1, seed="anon")
    rc = main(
        [
            "anonymize",
            str(src),
            "-o",
            str(tmp_path / "out"),
            "--secret-file",
            str(state / "secret.key"),
        ]
    )
    assert rc == 2
    assert "missing" in capsys.readouterr().err
    assert not (state / "secret.key").exists()
