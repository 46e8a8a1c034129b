"""Operator commands beside a running agent: `status` and `retry` never cost it its WAL.

A real agent process ingests while `status` and `retry` run many times in other processes. The
agent must keep every descriptor on a live file (a deleted `outbox.db-wal` means its commits go
to a file nobody else sees), and after kill -9 every row it committed must still be there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway_agent.agent.outbox.store import Outbox
from tests._procs import deleted_fds

from ._agent_util import agent_settings, files_under, wait_until, write_synthetic
from .test_crash import Agent, _cli_args, _env

WAVES = 6
PER_WAVE = 25
COMMANDS = 12


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_agent", *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.reliability
def test_status_and_retry_beside_a_running_agent_keep_its_wal(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    dest = settings.destination.folder
    state = settings.state_dir
    settings.inbox.mkdir(parents=True, exist_ok=True)
    agent = Agent(tmp_path, _cli_args(settings, ["--destination-folder", str(dest)]), _env())
    src = tmp_path / "src"
    waves = [src / f"w{i}" for i in range(WAVES)]
    for i, wave in enumerate(waves):
        write_synthetic(wave, PER_WAVE, seed=f"ops-{i}", size=32)

    def feed() -> None:
        for i, wave in enumerate(waves):
            staged = tmp_path / f"staged{i}"
            shutil.copytree(wave, staged)
            staged.rename(settings.inbox / f"w{i}")
            time.sleep(0.3)

    agent.start()
    try:
        agent.wait_started()
        assert agent.proc is not None
        feeder = threading.Thread(target=feed)
        feeder.start()
        state_args = ["--state-dir", str(state), "--inbox", str(settings.inbox)]
        for i in range(COMMANDS):
            done = _cli(tmp_path, "status", *state_args)
            assert done.returncode == 0, done.stderr
            done = _cli(tmp_path, "retry", *state_args)
            assert done.returncode == 0, done.stderr
            assert deleted_fds(agent.proc.pid, state) == [], f"after command round {i}"
        feeder.join()
        total = WAVES * PER_WAVE
        assert wait_until(lambda: not files_under(settings.inbox), timeout=120)
        # Every original is gone, so every row was committed; one more status, then kill -9.
        assert _cli(tmp_path, "status", *state_args).returncode == 0
        assert deleted_fds(agent.proc.pid, state) == []
        agent.kill9()
    finally:
        agent.kill_if_running()

    outbox = Outbox(state / "outbox.db")
    try:
        counts = outbox.counts()
    finally:
        outbox.close()
    assert sum(counts.values()) == total, f"rows after kill -9: {counts}, expected {total}"

    agent.start()
    try:
        assert wait_until(lambda: len(files_under(dest)) == total, timeout=120)
    finally:
        agent.kill_if_running()
