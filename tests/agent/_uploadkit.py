"""Helpers for outbox/uploader/destination tests: files, rows, fake clock, counting transport."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.outbox.upkeep import row_from_file
from gateway_agent.synthetic import make_ct_series, write_series

__all__ = [
    "Clocks",
    "CountingTransport",
    "FakeClock",
    "add_files",
    "hourly_passes",
    "make_files",
    "queued_outbox",
    "wait_for",
]


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Clocks:
    """A wall clock and a monotonic clock that tests move: ``advance`` moves both (time passes),
    ``jump`` moves the wall clock alone (someone set it)."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def jump(self, seconds: float) -> None:
        self.wall += seconds


def make_files(directory: Path, n: int, *, seed: str = "study-1") -> list[Path]:
    """``n`` small (64x64) synthetic CT files of one series."""
    return write_series(make_ct_series(n, study_seed=seed, rows=64, cols=64), directory)


def add_files(outbox: Outbox, paths: list[Path]) -> list[str]:
    """Queue files as intake would (header read without pixels); returns their SOP UIDs."""
    uids = []
    for p in paths:
        row = row_from_file(p, {"test": True})
        outbox.add(**row)
        uids.append(row["sop_instance_uid"])
    return uids


def hourly_passes(up: Any, clock: FakeClock, n: int) -> None:
    """``n`` passes of the uploader ``up``, an hour of ``clock`` apart (every backoff over)."""
    for _ in range(n):
        up.loop_once()
        clock.advance(3600)


def queued_outbox(directory: Path, n: int) -> tuple[Outbox, FakeClock, list[str]]:
    """An in-memory outbox on a :class:`FakeClock` with ``n`` small synthetic files queued in
    ``directory``: the outbox, its clock and the rows' SOP Instance UIDs."""
    clock = FakeClock()
    ob = Outbox(":memory:", clock=clock)
    return ob, clock, add_files(ob, make_files(directory, n))


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> Any:
    """Poll ``pred`` until truthy (returned) or the timeout passes (the last value is returned)."""
    end = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < end:
        time.sleep(step)
        value = pred()
    return value


class CountingTransport(httpx.HTTPTransport):
    """The real HTTP transport, recording (monotonic time, method, path) of every request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests: list[tuple[float, str, str]] = []
        #: (start, end) of every POST, to check that requests during an outage do not overlap
        self.spans: list[tuple[float, float]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        start = time.monotonic()
        with self._lock:
            self.requests.append((start, request.method, request.url.path))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = super().handle_request(request)
            response.read()
            return response
        finally:
            with self._lock:
                self.in_flight -= 1
                if request.method == "POST":
                    self.spans.append((start, time.monotonic()))

    def posts(self) -> int:
        with self._lock:
            return sum(1 for _, m, _ in self.requests if m == "POST")
