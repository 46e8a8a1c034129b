"""``gateway-agent run`` in a subprocess for the benchmarks: started on a work folder, waited for,
its CPU time and outbox counts read, stopped."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests._procs import cpu_seconds, descendants

__all__ = ["AgentProcess", "wait"]


def wait(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    """Ask ``pred()`` every ``step`` seconds until it says yes; TimeoutError after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(step)
    raise TimeoutError("condition not reached")


class AgentProcess:
    """``gateway-agent run`` on ``work/inbox`` and ``work/state``, JSON logs at warning level in
    ``work/agent.log``, no metrics port; ``flags`` name its destination (and more), ``env`` its
    ``GATEWAY_*`` settings (none is inherited)."""

    def __init__(self, work: Path, flags: Sequence[str], env: Mapping[str, str]) -> None:
        self.work = work
        self.inbox = work / "inbox"
        self.state = work / "state"
        self.inbox.mkdir(parents=True, exist_ok=True)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        cmd = [sys.executable, "-m", "gateway_agent", "--log-format", "json", "run"]
        cmd += ["--inbox", str(self.inbox), "--state-dir", str(self.state), "--no-metrics"]
        cmd += ["--log-level", "warning", *flags]
        self.log = (work / "agent.log").open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=work, env={**inherited, **env}, stdout=self.log, stderr=self.log
        )

    def wait_ready(self) -> None:
        """Until the outbox exists and the intake workers run, then one second more."""
        wait(lambda: (self.state / "outbox.db").exists() and len(self.family()) >= 2, 60)
        time.sleep(1.0)

    def family(self) -> list[int]:
        """The agent's process and all its descendants (the intake workers)."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def cpu_seconds(self) -> float:
        """CPU seconds of the agent and its workers so far."""
        return cpu_seconds(self.family())

    def counts(self) -> dict[str, int]:
        """Deliveries by state; empty before the outbox exists."""
        db = self.state / "outbox.db"
        if not db.exists():
            return {}
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = c.execute("select state, count(*) from deliveries group by state").fetchall()
            return dict(rows)
        except sqlite3.Error:
            return {}
        finally:
            c.close()

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.log.close()
        return rc
