"""The agent as a service, end to end: a real subprocess with NOTIFY_SOCKET and an ephemeral
metrics port, synthetic PHI-laden files (named with PHI too) dropped into its inbox.

Checks: READY=1 (with STATUS=), WATCHDOG=1 pings, /healthz and /readyz 200, /metrics counts
that match what happened, STOPPING=1 and exit 0 on SIGTERM, and every log line is JSON that
carries none of the planted PHI markers (nor the inbox file names)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_agent.synthetic import PHI_MARKERS, make_ct_series, write_series
from tests.reliability._harness import wait_until

pytestmark = pytest.mark.slow

N_GOOD = 4


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


class Agent:
    """``gateway-agent run`` in a subprocess, with its notify socket and log files."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.inbox = tmp / "inbox"
        self.inbox.mkdir(exist_ok=True)  # a configured inbox must exist
        self.state = tmp / "state"
        self.dest = tmp / "dest"
        self.log_out = tmp / "stdout.log"
        self.log_err = tmp / "stderr.log"
        self.messages: list[dict[str, str]] = []
        name = f"gateway-agent-e2e-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + name.encode())
        config = tmp / "config.toml"
        config.write_text("")  # never the machine's /etc/gateway-agent/config.toml
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
        env.pop("WATCHDOG_PID", None)
        env.update(
            NOTIFY_SOCKET="@" + name,
            WATCHDOG_USEC="1000000",  # ping every 0.5 s
            GATEWAY_DISK__MIN_FREE_MB="1",
        )
        cmd = [sys.executable, "-m", "gateway_agent", "--config", str(config)]
        cmd += ["--log-format", "json", "run", "--inbox", str(self.inbox)]
        cmd += ["--state-dir", str(self.state), "--destination-folder", str(self.dest)]
        cmd += ["--metrics-port", "0", "--settle-seconds", "0.3", "--workers", "1"]
        self.started = time.monotonic()
        with self.log_out.open("wb") as out, self.log_err.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp)

    def wait_message(self, key: str, timeout: float = 60.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if key in msg:
                return msg
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and key != "STOPPING":
                raise AssertionError(f"agent exited ({self.proc.returncode}): {self.logs()[-5:]}")
            self.sock.settimeout(0.5)
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            msg = dict(line.split("=", 1) for line in data.split("\n"))
            self.messages.append(msg)
            if key in msg:
                return msg
        raise AssertionError(f"no {key}= from the agent within {timeout} s")

    def logs(self) -> list[str]:
        """The service's log lines: JSON on stdout (journald and Docker read it there)."""
        text = self.log_out.read_text(errors="replace")
        return [ln for ln in text.splitlines() if ln.strip()]

    def port(self) -> int:
        for line in self.logs():
            event = json.loads(line)
            if event.get("event") == "health_server_started":
                return int(event["port"])
        raise AssertionError("no health_server_started log line")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.sock.fileno() != -1:
            self.sock.setblocking(False)
            while True:  # what was sent before the exit (STOPPING=1)
                try:
                    data = self.sock.recv(4096).decode()
                except BlockingIOError:
                    break
                self.messages.append(dict(ln.split("=", 1) for ln in data.split("\n")))
            self.sock.close()
        return self.proc.returncode


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        a.stop()


def test_agent_runs_like_a_service(agent: Agent, tmp_path: Path) -> None:
    ready = agent.wait_message("READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(agent.proc.pid)
    assert "intake running" in ready["STATUS"]
    url = f"http://127.0.0.1:{agent.port()}"

    health = httpx.get(url + "/healthz", timeout=10)
    assert health.status_code == 200, health.text
    assert set(health.json()["threads"]) >= {"watcher", "intake", "uploader:default"}
    assert all(health.json()["threads"].values())
    before = scrape(url)
    assert before.get(("gateway_files_received_total", ()), 0) == 0

    # Drop a PHI-laden study whose file names carry PHI too, plus one file that is not DICOM.
    staging = tmp_path / "staging"
    files = write_series(make_ct_series(N_GOOD, rows=32, cols=32), staging, prefix="PHIDOE_")
    (staging / "PHIMRN4711_notes.dcm").write_bytes(b"this is not DICOM " * 20)
    agent.inbox.mkdir(exist_ok=True)
    for f in [*files, staging / "PHIMRN4711_notes.dcm"]:
        f.rename(agent.inbox / f.name)

    def done() -> bool:
        m = scrape(url)
        sent = m.get(("gateway_outbox_depth", (("destination", "default"), ("state", "sent"))), 0)
        quarantined = sum(v for (n, _), v in m.items() if n == "gateway_quarantined_total")
        return sent == N_GOOD and quarantined == 1

    wait_until(done, 60, what="4 instances sent and 1 file quarantined")
    m = scrape(url)
    assert m[("gateway_files_received_total", ())] == N_GOOD + 1
    assert m[("gateway_deidentified_total", ())] == N_GOOD
    assert m[("gateway_quarantined_total", (("reason", "not_dicom"),))] == 1
    dest = (("destination", "default"),)
    assert m[("gateway_upload_attempts_total", (*dest, ("result", "sent")))] == N_GOOD
    assert m[("gateway_bytes_sent_total", dest)] > 0
    assert m[("gateway_outbox_depth", (*dest, ("state", "queued")))] == 0
    assert m[("gateway_outbox_oldest_waiting_age_seconds", dest)] == 0
    assert m[("gateway_destination_up", dest)] == 1
    assert m[("gateway_state_disk_free_bytes", ())] > 0
    assert m[("gateway_intake_paused", ())] == 0
    assert m[("gateway_last_upload_success_timestamp_seconds", dest)] > 0
    assert len(list(agent.dest.rglob("*.dcm"))) == N_GOOD
    assert not list(agent.inbox.iterdir())  # originals removed after commit

    readyz = httpx.get(url + "/readyz", timeout=10)
    assert readyz.status_code == 200, readyz.text
    assert agent.wait_message("WATCHDOG")["WATCHDOG"] == "1"

    assert agent.stop() == 0
    assert any(msg.get("STOPPING") == "1" for msg in agent.messages)

    lines = agent.logs()
    assert lines, "the agent logged nothing"
    names = [f.name for f in files] + ["PHIMRN4711_notes.dcm"]
    for line in lines:
        event = json.loads(line)  # every line is one JSON object
        assert isinstance(event, dict) and "event" in event
        for marker in (*PHI_MARKERS, *names):
            assert marker not in line, f"{marker!r} leaked into the log: {event.get('event')}"
    stderr = agent.log_err.read_text(errors="replace")  # tracebacks, library chatter: none either
    for marker in (*PHI_MARKERS, *names):
        assert marker not in stderr, f"{marker!r} leaked into stderr"
