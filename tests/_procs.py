"""Process helpers for tests and benchmarks: servers started, waited for and stopped by PID;
process trees; the CPU time of processes and of the whole machine."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

__all__ = [
    "alive",
    "cpu_seconds",
    "deleted_fds",
    "descendants",
    "free_port",
    "log_tail",
    "machine_busy",
    "port_open",
    "started",
    "stop_process",
    "wait_ready",
]


CLK = os.sysconf("SC_CLK_TCK")


class _Server(Protocol):
    def start(self) -> Any: ...
    def close(self) -> None: ...


S = TypeVar("S", bound=_Server)


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it; races are retried by start())."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    """True if something accepts connections on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_ready(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, step: float = 0.05
) -> bool:
    """Ask ``ready()`` until it says yes (True), ``proc`` exits or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(step)
    return False


def stop_process(
    proc: subprocess.Popen[bytes] | None,
    *,
    sig: int = signal.SIGKILL,
    group: bool = False,
    timeout: float = 10.0,
    ports: tuple[int, ...] = (),
    port_wait: float = 5.0,
) -> None:
    """Send ``sig`` to the recorded ``proc`` (to its whole session with ``group``: nothing else),
    reap it (SIGKILL if it outlives ``timeout``), then wait up to ``port_wait`` seconds until
    ``ports`` are closed, so that a restart on the same ports works at once."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    end = time.monotonic() + port_wait
    while time.monotonic() < end and any(port_open(p) for p in ports if p):
        time.sleep(0.02)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a server's log, for the error that says it did not start."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def started(server: S) -> S:
    """``server.start()``; if that fails, ``server.close()`` (its temp folder) and re-raise."""
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


def descendants(pid: int) -> set[int]:
    """All processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat_path.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat_path.parent.name))
    out: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (``kill -0`` succeeds on zombies)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def deleted_fds(pid: int, under: Path) -> list[str]:
    """Targets of ``pid``'s descriptors that point at a deleted file below ``under``."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith(" (deleted)"):
            out.append(target)
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the processes so far (those gone already count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process and kernel thread),
    from ``/proc/stat``."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK  # minus idle and iowait
