"""SIGTERM while `gateway-agent run` is still starting (importing, reading its configuration):
a clean exit 0, not death by signal. In a container the agent is PID 1, where a signal without a
handler is ignored: there `docker stop` would wait its whole timeout and then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

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
