"""SIGTERM while `gateway-agent run` is still starting (importing, reading its configuration):
a clean exit 0, not death by signal. In a container the agent is PID 1, where a signal without a
handler is ignored: there `docker stop` would wait its whole timeout and then SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway_agent.synthetic import make_ct_series, write_series
from tests.agent._agent_util import agent_command

# Start-up made slow at a known point: settings_from_args (the first thing `run` does after
# parsing) announces itself, then takes 60 s, as a slow disk or a loaded box might.
SLOW_START = """
import sys, time
from gateway_agent import cli
from gateway_agent.cli import agent_cmds

def slow(*args, **kwargs):
    print("starting", flush=True)
    time.sleep(60)
    raise AssertionError("the signal did not stop the start-up")

agent_cmds.settings_from_args = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_startup_exits_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_START,
            "run",
            "--inbox",
            str(tmp_path / "inbox"),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-metrics",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "starting"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (proc.returncode, err)
    assert waited < 30
    assert "Traceback" not in err and "SIGTERM" in err
    assert str(tmp_path) not in err + out


def test_sigterm_with_uploads_hanging_exits_0_before_a_container_runtime_kills_it(
    tmp_path: Path,
) -> None:
    """`docker stop` and `podman stop` send SIGKILL 10 s after SIGTERM by default. With uploads
    stuck in a destination that never answers, the agent hands them back to the queue and exits
    with status 0 well inside that, so nothing depends on the runtime's kill."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # accepted by the kernel, never answered
    port = server.getsockname()[1]
    inbox = tmp_path / "inbox"
    write_series(make_ct_series(20, rows=32, cols=32), inbox)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DESTINATION__TIMEOUT_SECONDS"] = "120"
    proc = subprocess.Popen(
        agent_command(
            inbox, tmp_path / "state", "--destination-url", f"http://127.0.0.1:{port}/dicom-web"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        # Wait until uploads are under way (connections reach the silent server).
        server.settimeout(60)
        conn, _ = server.accept()
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - sent
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    assert proc.returncode == 0, out[-2000:]
    assert '"agent_stopped"' in out
    assert took < 9.5, f"{took:.1f} s: a container runtime would have killed the agent at 10 s"
