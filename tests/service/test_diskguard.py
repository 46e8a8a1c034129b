"""Disk guard: intake pauses below the threshold and resumes by itself (injected free space)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway_agent.agent.metrics import REGISTRY
from gateway_agent.agent.service.diskguard import MB, DiskGuard, free_bytes


def paused_gauge() -> float | None:
    return REGISTRY.get_sample_value("gateway_intake_paused")


class FakeDisk:
    """Free space we control; counts how often it is measured."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0

    def __call__(self, path: Path) -> int:
        assert path.is_dir()
        self.calls += 1
        return self.free


def test_pause_and_resume_with_hysteresis(tmp_path: Path) -> None:
    disk = FakeDisk(1000 * MB)
    changes: list[bool] = []
    guard = DiskGuard(tmp_path, 500 * MB, free=disk, on_change=changes.append)
    assert guard.resume_free_bytes == 550 * MB
    assert guard.check() and not guard.paused
    assert paused_gauge() == 0

    disk.free = 499 * MB
    assert not guard.check()
    assert guard.paused and paused_gauge() == 1
    assert guard.last_free_bytes == 499 * MB

    disk.free = 520 * MB  # above the threshold, below the resume level: stays paused
    assert not guard.check()

    disk.free = 600 * MB
    assert guard.check()
    assert not guard.paused and paused_gauge() == 0
    assert changes == [True, False]


def test_allow_intake_is_rate_limited(tmp_path: Path) -> None:
    now = {"t": 0.0}
    disk = FakeDisk(10 * MB)
    guard = DiskGuard(tmp_path, 100 * MB, free=disk, min_recheck=1.0, clock=lambda: now["t"])
    assert guard.allow_intake() is False
    disk.free = 1000 * MB
    for _ in range(100):
        assert guard.allow_intake() is False  # cached within the second
    assert disk.calls == 1
    now["t"] = 1.5
    assert guard.allow_intake() is True
    assert disk.calls == 2


def test_timer_resumes_without_new_files(tmp_path: Path) -> None:
    disk = FakeDisk(0)
    resumed = threading.Event()
    guard = DiskGuard(
        tmp_path,
        100 * MB,
        free=disk,
        interval=0.02,
        on_change=lambda paused: None if paused else resumed.set(),
    )
    guard.start()
    try:
        assert guard.paused
        disk.free = 1000 * MB
        assert resumed.wait(5)
        assert not guard.paused
    finally:
        guard.stop()


def test_unreadable_folder_pauses(tmp_path: Path) -> None:
    guard = DiskGuard(tmp_path / "missing", 1)
    assert guard.check() is False
    assert guard.paused and guard.last_free_bytes is None


def test_zero_threshold_never_pauses(tmp_path: Path) -> None:
    guard = DiskGuard(tmp_path, 0, free=FakeDisk(0))
    assert guard.check() and not guard.paused


def test_real_free_bytes(tmp_path: Path) -> None:
    assert free_bytes(tmp_path) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_free_bytes": -1}, "min_free_bytes"),
        ({"min_free_bytes": 10, "resume_free_bytes": 5}, "resume_free_bytes"),
        ({"min_free_bytes": 10, "interval": 0}, "interval"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiskGuard(tmp_path, **kwargs)  # type: ignore[arg-type]
