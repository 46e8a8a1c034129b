"""Crash safety: the agent as a subprocess, kill -9 at random (seeded) instants, restarted.

At the end the destination holds exactly the expected instances (no duplicate), every input is
delivered or quarantined (none lost, none left in the inbox), no temporary file is left anywhere,
no worker process outlives a killed agent, and nothing in the agent's logs names a patient or
an inbox file.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.deid import load_or_create_secret
from gateway_agent.synthetic import PHI_MARKERS
from tests._orthanc import start_orthanc
from tests._procs import alive, descendants

from ._agent_util import (
    NAME_MARKER,
    agent_settings,
    dicomweb_overrides,
    expected_outputs,
    files_under,
    no_temp_files,
    sop_uid_of,
    wait_until,
    write_synthetic,
)

SEED = 20240611
KILLS = 8
SERIES = 4
PER_SERIES = 50


class Agent:
    """``python -m gateway_agent run`` as a child process, logs appended to one file."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.args = args
        self.env = env
        self.log = tmp_path / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self) -> None:
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway_agent", "--log-format", "json", "run", *self.args],
                cwd=self.tmp_path,
                env=self.env,
                stdout=fh,
                stderr=fh,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        family = descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait(timeout=20)
        assert wait_until(lambda: not any(alive(p) for p in family), timeout=15), (
            "worker processes outlived the killed agent"
        )

    def wait_started(self) -> None:
        """Until this start logged ``agent_started`` (its signal handlers are in place)."""

        def started() -> bool:
            with self.log.open("rb") as fh:
                fh.seek(self._offset)
                return b'"agent_started"' in fh.read()

        assert wait_until(started, timeout=60)

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def terminate(self) -> int:
        assert self.proc is not None
        self.wait_started()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _cli_args(settings: Any, extra: list[str]) -> list[str]:
    return [
        "--inbox",
        str(settings.inbox),
        "--state-dir",
        str(settings.state_dir),
        "--settle-seconds",
        "0.3",
        "--workers",
        "2",
        "--no-metrics",
        *extra,
    ]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DISK__MIN_FREE_MB"] = "1"
    env.update(extra or {})
    return env


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run_crash_cycles(
    tmp_path: Path,
    settings: Any,
    agent: Agent,
    delivered: Callable[[], int],
) -> tuple[set[str], list[Path]]:
    rng = random.Random(SEED)
    src = tmp_path / "src"
    waves: list[Path] = []
    inputs: list[Path] = []
    for i in range(SERIES):
        wave = src / f"wave{i}"
        inputs += write_synthetic(wave / f"series{i}", PER_SERIES, seed=f"crash-{i}", size=32)
        waves.append(wave)
    junk = src / "wave0" / "junk"
    junk.mkdir()
    for j in range(4):
        (junk / f"{NAME_MARKER}_junk{j}.dcm").write_bytes(os.urandom(200 + j))
        inputs.append(junk / f"{NAME_MARKER}_junk{j}.dcm")
    garbage_shas = sorted(_sha(p) for p in inputs if "_junk" in p.name)

    # The secret the agent will use, created first so the expectation can be computed.
    load_or_create_secret(settings.secret_file)
    expected, refused = expected_outputs(
        settings.secret_file, settings, inputs, tmp_path / "direct"
    )
    assert len(expected) == SERIES * PER_SERIES and len(refused) == 4
    settings.inbox.mkdir(parents=True, exist_ok=True)

    for cycle in range(KILLS):
        agent.start()
        if cycle < len(waves):
            staged = tmp_path / f"staged{cycle}"
            shutil.copytree(waves[cycle], staged)
            staged.rename(settings.inbox / f"wave{cycle}")
        time.sleep(rng.uniform(0.4, 3.0))
        agent.kill9()

    agent.start()
    assert wait_until(
        lambda: delivered() == len(expected) and not files_under(settings.inbox), timeout=120
    ), f"delivered {delivered()} of {len(expected)}; inbox {len(files_under(settings.inbox))}"
    time.sleep(0.5)
    assert agent.terminate() == 0

    quarantined = sorted(
        _sha(d / "original") for d in (settings.state_dir / "quarantine").iterdir() if d.is_dir()
    )
    assert quarantined == garbage_shas, "every refused input is in quarantine exactly once"
    for root in (settings.inbox, settings.state_dir, settings.state_dir / "quarantine"):
        assert no_temp_files(root) == [], f"temporary files left under {root.name}"
    outbox = Outbox(settings.state_dir / "outbox.db")
    try:
        counts = outbox.counts()
    finally:
        outbox.close()
    assert counts == {"queued": 0, "sending": 0, "sent": len(expected), "dead": 0}

    logs = agent.log.read_text(errors="replace")
    for marker in PHI_MARKERS:
        assert marker not in logs, f"PHI marker {marker} in the agent's logs"
    assert "Traceback" not in logs
    return expected, refused


@pytest.mark.slow
@pytest.mark.reliability
def test_kill9_folder_destination(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    dest = settings.destination.folder
    agent = Agent(tmp_path, _cli_args(settings, ["--destination-folder", str(dest)]), _env())

    def delivered() -> int:
        return len([p for p in files_under(dest) if not p.name.startswith(".")])

    try:
        expected, _ = _run_crash_cycles(tmp_path, settings, agent, delivered)
    finally:
        agent.kill_if_running()
    out = [p for p in files_under(dest)]
    uids = [sop_uid_of(p) for p in out]
    assert len(uids) == len(set(uids)), "duplicate instance in the destination"
    assert set(uids) == expected
    assert no_temp_files(dest) == []


@pytest.mark.slow
@pytest.mark.reliability
@pytest.mark.orthanc
def test_kill9_orthanc_destination(tmp_path: Path) -> None:
    server = start_orthanc()
    try:
        over = dicomweb_overrides(server)
        settings = agent_settings(tmp_path, **over)
        env = _env({"GATEWAY_DESTINATION__PASSWORD": server.auth[1]})
        args = _cli_args(
            settings,
            [
                "--destination-url",
                server.dicomweb_url,
            ],
        )
        env.update(
            {
                "GATEWAY_DESTINATION__AUTH": "basic",
                "GATEWAY_DESTINATION__USERNAME": server.auth[0],
                "GATEWAY_DESTINATION__BACKOFF_BASE_SECONDS": "0.2",
                "GATEWAY_DESTINATION__BACKOFF_CAP_SECONDS": "2",
            }
        )
        agent = Agent(tmp_path, args, env)
        try:
            expected, _ = _run_crash_cycles(tmp_path, settings, agent, server.count_instances)
        finally:
            agent.kill_if_running()
        stored = server.sop_uids()
        assert len(stored) == len(set(stored)), "duplicate instance in Orthanc"
        assert set(stored) == expected
    finally:
        server.close()
