"""/readyz with an inbox the agent cannot delete from, and an outbox folder it cannot write to.

The agent commits each de-identified file to its outbox, then removes the original. When either
step keeps failing (a root-owned inbox mounted into the container, where the agent runs as uid
10001: EACCES on every file), the agent is not ready, with the reason, and nothing is lost.

As root the agent runs without capabilities (``setpriv``, like ``docker run --cap-drop ALL``),
so a folder owned by someone else with mode 0755 refuses it just as it refuses uid 10001.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway_agent.synthetic import make_ct_series, write_series
from tests._orthanc import free_port
from tests.conftest import require
from tests.reliability._harness import wait_until

NOBODY = 65534
IS_ROOT = os.geteuid() == 0


def lock(folder: Path) -> None:
    """Make ``folder`` refuse new files and deletions to the agent (it can still read)."""
    if IS_ROOT:
        shutil.chown(folder, NOBODY, NOBODY)
        folder.chmod(0o755)
    else:
        folder.chmod(0o555)


def unlock(folder: Path) -> None:
    if IS_ROOT:
        shutil.chown(folder, 0, 0)
    folder.chmod(0o755)


class Agent:
    """``gateway-agent run`` in a subprocess (as root: without capabilities), its /readyz."""

    def __init__(self, root: Path) -> None:
        self.inbox, self.state, self.dest = root / "inbox", root / "state", root / "dest"
        for d in (self.inbox, self.state, self.dest):
            d.mkdir(exist_ok=True)
        self.port = free_port()
        prefix: list[str] = []
        if IS_ROOT:
            setpriv = shutil.which("setpriv")
            require(setpriv is not None, "setpriv (Debian package util-linux)")
            assert setpriv is not None
            prefix = [setpriv, "--inh-caps=-all", "--bounding-set=-all", "--"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        self.log = (root / "agent.log").open("w")
        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "gateway_agent",
                "run",
                "--inbox",
                str(self.inbox),
                "--state-dir",
                str(self.state),
                "--destination-folder",
                str(self.dest),
                "--settle-seconds",
                "0.3",
                "--metrics-port",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_until(lambda: self.readyz()[0] == 200, 60, what="the agent to be ready")

    def readyz(self) -> tuple[int, dict[str, object]]:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5)
        except httpx.HTTPError:
            return 0, {}
        return r.status_code, r.json()

    def intake_check(self) -> dict[str, object]:
        checks = self.readyz()[1].get("checks", {})
        assert isinstance(checks, dict)
        check = checks.get("intake", {})
        assert isinstance(check, dict)
        return check

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        self.log.close()
        return rc


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        for d in (a.inbox, a.state, a.dest):
            if d.exists():
                unlock(d)


def test_an_inbox_the_agent_cannot_delete_from_makes_it_not_ready(agent: Agent) -> None:
    staged = write_series(make_ct_series(2), agent.inbox.parent / "staged")
    lock(agent.inbox)
    for src in staged:  # the scanner's account can write there; the agent cannot delete
        shutil.copy(src, agent.inbox / src.name)
        (agent.inbox / src.name).chmod(0o644)
    wait_until(lambda: agent.readyz()[0] == 503, 60, what="/readyz 503")
    body = agent.readyz()[1]
    check = agent.intake_check()
    assert check["ok"] is False
    detail = str(check["detail"])
    assert "EACCES" in detail and "inbox" in detail, detail
    assert body["status"] == "not ready"
    assert sorted(p.name for p in agent.inbox.iterdir()) == [p.name for p in staged]  # kept

    # Fixed: the next file goes through and the agent is ready again. Nothing was lost: the
    # two files were committed and delivered; their originals wait for the next scan.
    unlock(agent.inbox)
    more = write_series(make_ct_series(1, study_seed="after"), agent.inbox.parent / "more")
    shutil.copy(more[0], agent.inbox / "after.dcm")
    wait_until(lambda: agent.readyz()[0] == 200, 60, what="/readyz 200 again")
    assert agent.intake_check()["ok"] is True
    wait_until(lambda: len(list(agent.dest.rglob("*.dcm"))) == 3, 60, what="3 files delivered")
    assert not (agent.inbox / "after.dcm").exists()
    assert agent.stop() == 0


def test_an_outbox_folder_the_agent_cannot_write_makes_it_not_ready(agent: Agent) -> None:
    outputs = [d for d in agent.state.iterdir() if d.is_dir()]
    assert outputs, list(agent.state.iterdir())
    for d in outputs:
        lock(d)
    write_series(make_ct_series(1), agent.inbox)
    wait_until(lambda: agent.readyz()[0] == 503, 60, what="/readyz 503")
    check = agent.intake_check()
    assert check["ok"] is False and "EACCES" in str(check["detail"]), check
    assert len(list(agent.inbox.iterdir())) == 1  # the original waits
    for d in outputs:
        unlock(d)
    assert agent.stop() == 0
