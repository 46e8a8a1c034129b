"""``status`` on a large inbox: the files counted from the folder listings up to a limit ("more
than N" beyond it), the age read of the first files only (then "at least")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway_agent.agent.intake.watcher import BACKLOG_AGES, inbox_backlog
from gateway_agent.cli import agent_cmds, main
from gateway_agent.cli.agent_cmds import collect_status

from ._agent_util import agent_settings


def _files(folder: Path, n: int, age: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    when = time.time() - age
    for i in range(n):
        path = folder / f"PHIDOE_{i:05d}.dcm"
        path.write_bytes(b"x")
        os.utime(path, (when, when))


def test_the_count_stops_at_its_limit_and_says_so(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    _files(inbox / "a", 6, 60.0)
    _files(inbox / "b", 6, 60.0)
    (inbox / "a" / ".hidden.dcm").write_bytes(b"x")
    (inbox / "b" / "copying.dcm.partial").write_bytes(b"x")
    exact = inbox_backlog(inbox, limit=12)
    assert (exact.count, exact.more, exact.oldest_exact) == (12, False, True)
    capped = inbox_backlog(inbox, limit=5)
    assert (capped.count, capped.more, capped.oldest_exact) == (5, True, False)
    assert capped.oldest is not None and time.time() - capped.oldest >= 59
    few_ages = inbox_backlog(inbox, limit=100, ages=3)
    assert (few_ages.count, few_ages.more, few_ages.oldest_exact) == (12, False, False)
    none = inbox_backlog(tmp_path / "missing")
    assert (none.count, none.more, none.oldest, none.oldest_exact) == (0, False, None, True)


def test_status_prints_more_than_and_at_least(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More files than ``status`` reads the age of, more than it counts: both said as such
    (the oldest file's age is at least the oldest of those read, so the hint still shows)."""
    settings = agent_settings(tmp_path)
    _files(Path(settings.inbox) / "batch", BACKLOG_AGES + 5, 3 * 3600.0)
    st = collect_status(settings)["inbox"]
    assert (st["waiting"], st["waiting_capped"], st["oldest_exact"]) == (
        BACKLOG_AGES + 5,
        False,
        False,
    )
    assert 3 * 3600 - 60 < st["oldest_seconds"] < 3 * 3600 + 60
    argv = ["status", "--state-dir", str(settings.state_dir), "--inbox", str(settings.inbox)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"inbox: {BACKLOG_AGES + 5} file(s) not taken yet, oldest at least 3.0 h" in out
    assert "intake_deferred" in out
    monkeypatch.setattr(agent_cmds, "INBOX_COUNT_LIMIT", 100)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "inbox: more than 100 file(s) not taken yet, oldest at least 3.0 h" in out
