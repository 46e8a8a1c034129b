"""The sd_notify protocol on a real AF_UNIX datagram socket named in NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.agent.service.notify import Notifier, watchdog_interval


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def recv_all(self, n: int) -> list[dict[str, str]]:
        return [self.recv() for _ in range(n)]

    def pending(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):
            return False
        return True


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        yield Listener(s, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"gateway-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        yield Listener(s, "@" + name)


def test_unset_socket_is_a_noop() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.start_watchdog(lambda: True) is False
    n.close()


@pytest.mark.parametrize("which", ["path_listener", "abstract_listener"])
def test_ready_status_stopping(which: str, request: pytest.FixtureRequest) -> None:
    listener: Listener = request.getfixturevalue(which)
    n = Notifier({"NOTIFY_SOCKET": listener.env_value})
    assert n.enabled
    assert n.ready("outbox queued=0; intake running")
    msg = listener.recv()
    assert msg["READY"] == "1"
    assert msg["MAINPID"] == str(os.getpid())
    assert msg["STATUS"] == "outbox queued=0; intake running"

    assert n.status("outbox queued=3\nsecond line")
    assert listener.recv() == {"STATUS": "outbox queued=3 second line"}  # one line, never two

    assert n.stopping()
    assert listener.recv() == {"STOPPING": "1"}
    n.close()


def test_watchdog_pings_only_while_alive(path_listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "100000"}  # ping every 50 ms
    alive = {"value": True}
    ticks: list[bool] = []
    n = Notifier(env)
    assert n.watchdog_seconds == pytest.approx(0.05)
    assert n.start_watchdog(lambda: alive["value"], on_tick=lambda: ticks.append(alive["value"]))
    for msg in path_listener.recv_all(3):
        assert msg == {"WATCHDOG": "1"}
    alive["value"] = False
    seen = len(ticks)
    while len(ticks) < seen + 2:  # a full tick has run with alive() false
        n._stop.wait(0.01)
    while path_listener.pending():  # drop pings sent before that
        path_listener.recv()
    n._stop.wait(0.3)  # six more intervals: none may ping
    assert not path_listener.pending()
    alive["value"] = True
    assert path_listener.recv() == {"WATCHDOG": "1"}
    n.close()


def test_watchdog_probe_that_raises_counts_as_dead(path_listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "100000"}
    ticks: list[int] = []

    def broken() -> bool:
        raise RuntimeError("probe bug")

    n = Notifier(env)
    n.start_watchdog(broken, on_tick=lambda: ticks.append(1))
    n._stop.wait(0.3)
    n.close()
    assert ticks  # the thread kept running
    assert not path_listener.pending()


def test_watchdog_interval_rules() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 15.0


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.ready() is False
    n.close()


def test_unsupported_scheme_is_disabled() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
