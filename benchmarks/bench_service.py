"""Service figures: start-up to READY=1 and idle CPU of `gateway-agent run`, printed as a table.

    uv run python benchmarks/bench_service.py            # 5 starts, 30 s idle
    uv run python benchmarks/bench_service.py --runs 3 --idle-seconds 10

Start-up is measured from spawning the process to the READY=1 datagram on NOTIFY_SOCKET (the
moment systemd would consider the unit started). Idle CPU is the CPU time (user + system) of
the agent and all its child processes over the idle window, as a percentage of one core.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._procs import cpu_seconds, descendants

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
    return total * PAGE / 1e6


def start_agent(work: Path) -> tuple[subprocess.Popen[bytes], socket.socket, float]:
    """Spawn the agent; return it, its notify socket, and seconds until READY=1."""
    name = f"gateway-agent-bench-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    (work / "config.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="30000000", GATEWAY_DISK__MIN_FREE_MB="1")
    cmd = [sys.executable, "-m", "gateway_agent", "--config", str(work / "config.toml")]
    (work / "inbox").mkdir(parents=True, exist_ok=True)  # a configured inbox must exist
    cmd += ["--log-format", "json", "run", "--inbox", str(work / "inbox")]
    cmd += ["--state-dir", str(work / "state"), "--destination-folder", str(work / "dest")]
    cmd += ["--metrics-port", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=(work / "log").open("wb"), env=env, cwd=work
    )
    sock.settimeout(60)
    while True:
        data = sock.recv(4096).decode()
        if "READY=1" in data.split("\n"):
            return proc, sock, time.perf_counter() - t0


def stop_agent(proc: subprocess.Popen[bytes], sock: socket.socket) -> float:
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    sock.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="start/stop cycles")
    ap.add_argument("--idle-seconds", type=float, default=30.0, help="idle CPU window")
    args = ap.parse_args()

    ready, stops = [], []
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        for i in range(args.runs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            proc, sock, t = start_agent(work)
            ready.append(t)
            if i < args.runs - 1:
                stops.append(stop_agent(proc, sock))
        # The last one stays up: let start-up work settle, then measure an idle window.
        time.sleep(3)
        pids = [proc.pid, *descendants(proc.pid)]
        c0, w0 = cpu_seconds(pids), time.perf_counter()
        time.sleep(args.idle_seconds)
        pids = [proc.pid, *descendants(proc.pid)]
        c1, w1 = cpu_seconds(pids), time.perf_counter()
        idle = 100.0 * (c1 - c0) / (w1 - w0)
        rss = rss_mb(pids)
        stops.append(stop_agent(proc, sock))

    print(
        f"gateway-agent service figures ({platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})"
    )
    rows = [
        ("start-up to READY=1, median", f"{statistics.median(ready):.2f} s", "< 1 s"),
        ("start-up to READY=1, max", f"{max(ready):.2f} s", ""),
        (f"idle CPU over {args.idle_seconds:.0f} s (agent + children)", f"{idle:.2f} %", "< 0.5 %"),
        ("CPU time used in that window", f"{1000 * (c1 - c0):.0f} ms", ""),
        ("processes in the tree", str(len(pids)), ""),
        ("RSS of the tree, idle", f"{rss:.0f} MB", ""),
        ("SIGTERM to exit, median", f"{statistics.median(stops):.2f} s", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{w}} | {'value':>9} | {'target':>7} |")
    print(f"|{'-' * (w + 2)}|{'-' * 11}|{'-' * 9}|")
    for name, value, target in rows:
        print(f"| {name:<{w}} | {value:>9} | {target:>7} |")
    print(f"runs: {args.runs}; READY times: {', '.join(f'{t:.2f}' for t in ready)} s")


if __name__ == "__main__":
    main()
