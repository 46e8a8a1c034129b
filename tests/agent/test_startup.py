"""Start-up problems of the machine: one line naming the problem and the fix, exit status 2,
never a traceback (systemd's Restart=on-failure must not loop on them); and what the agent
records and logs about the settings it runs with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_agent.agent.service.daemon import Daemon
from gateway_agent.agent.service.effective import EFFECTIVE_SETTINGS_FILE
from gateway_agent.cli import main
from gateway_agent.cli.agent_cmds import collect_status

from ._agent_util import agent_settings

SECRET = "s3cr3t-t0ken-value"


def _run(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "gateway_agent", "run", *flags],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stderr


def _assert_one_line(status: int, err: str, *needles: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


def test_metrics_port_in_use(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = _run(tmp_path, "--metrics-port", str(port))
    _assert_one_line(status, err, f"metrics.port {port}", "in use", "--metrics-port")


def test_state_folder_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "afile").write_text("x")
    status, err = _run(tmp_path, "--state-dir", "afile/state", "--no-metrics")
    _assert_one_line(status, err, "state_dir", "a part of the path is a file", "--state-dir")


def test_state_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "state").write_text("x")
    status, err = _run(tmp_path, "--state-dir", "state", "--no-metrics")
    _assert_one_line(status, err, "state_dir", "file, not a folder")


def test_state_folder_read_only(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() != 0:
        state.chmod(0o500)
    else:  # root writes through permissions: a read-only mount does not let it
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(state)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip("mounting a read-only tmpfs is not permitted here")
    try:
        status, err = _run(tmp_path, "--state-dir", "state", "--no-metrics")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(state)], capture_output=True, check=False)
        else:
            state.chmod(0o700)
    _assert_one_line(status, err, "state_dir")
    assert "read-only" in err or "permission denied" in err


def test_a_configured_inbox_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    status, err = _run(tmp_path, "--inbox", "scans/inbx", "--no-metrics")
    _assert_one_line(status, err, str(tmp_path / "scans" / "inbx"), "does not exist", "mkdir -p")
    assert not (tmp_path / "scans").exists()  # not created


def test_a_bad_json_section_from_the_environment(tmp_path: Path) -> None:
    status, err = _run(tmp_path, env={"GATEWAY_DESTINATION": "{bad json"})
    _assert_one_line(status, err, "GATEWAY_DESTINATION: not valid JSON")


def test_started_agent_logs_and_records_what_it_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = agent_settings(
        tmp_path,
        **{
            "destination.kind": "dicomweb",
            "destination.url": "https://127.0.0.1:1/dicom-web",
            "destination.auth": "bearer",
            "destination.token": SECRET,
        },
    )
    from structlog.testing import capture_logs

    daemon = Daemon(settings, components=[], service=False)
    with capture_logs() as logs:
        daemon.start()
        try:
            record_path = Path(settings.state_dir).resolve() / EFFECTIVE_SETTINGS_FILE
            record_text = record_path.read_text()
        finally:
            daemon.stop()
    started = next(e for e in logs if e["event"] == "agent_started")
    assert started["inbox"] == str((tmp_path / "inbox").resolve())
    assert started["state_dir"] == str((tmp_path / "state").resolve())
    assert started["destinations"] == ["default: dicomweb https://127.0.0.1:1/dicom-web"]
    assert SECRET not in record_text
    record = json.loads(record_text)
    assert record["destinations"] == [
        {"name": "default", "target": "dicomweb https://127.0.0.1:1/dicom-web"}
    ]
    assert record["settings"]["destination"]["auth"] == "bearer"
    assert record["pid"] == os.getpid()


def test_status_shows_the_destination_the_agent_uses(tmp_path: Path) -> None:
    """The agent ran with a flag the configuration does not have: status names the flag's."""
    used = agent_settings(tmp_path, **{"destination.folder": tmp_path / "from-flag"})
    daemon = Daemon(used, components=[], service=False)
    daemon.start()
    try:
        configured = agent_settings(tmp_path)  # what the config says: ./destination
        st = collect_status(configured)
    finally:
        daemon.stop()
    (dest,) = st["destinations"]
    assert dest["name"] == "default"
    assert dest["target"] == f"folder {(tmp_path / 'from-flag').resolve()}"
    assert dest["configured"] == f"folder {(tmp_path / 'destination').resolve()}"
    assert st["agent"]["pid"] == os.getpid() and st["agent"]["running"]


def test_status_command_prints_the_running_agents_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    used = agent_settings(tmp_path, **{"destination.folder": tmp_path / "from-flag"})
    daemon = Daemon(used, components=[], service=False)
    daemon.start()
    daemon.stop()
    assert main(["status", "--state-dir", str(tmp_path / "state")]) == 0
    out = capsys.readouterr().out
    assert f"destination default: folder {(tmp_path / 'from-flag').resolve()}" in out
    assert "restart the agent to use it" in out
