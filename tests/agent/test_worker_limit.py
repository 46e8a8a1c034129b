"""A file that makes a library loop forever costs the worker process, not the intake."""

from __future__ import annotations

import multiprocessing
import signal
from pathlib import Path

from gateway_agent.agent.intake import worker


class _SpinningEngine:
    """An engine caught in an endless loop (as pydicom was on a JP2 box of length 0)."""

    def deidentify_file(self, src: str | Path, out_dir: str | Path, **kw: object) -> None:
        n = 0
        while True:
            n += 1


def _job(src: str, out_dir: str) -> None:
    worker._ENGINE = _SpinningEngine()
    worker.FILE_CPU_SECONDS = 0.5
    worker.deid_job(src, out_dir)


def test_a_worker_spinning_on_a_file_is_ended_by_its_cpu_allowance(tmp_path: Path) -> None:
    src = tmp_path / "in.dcm"
    src.write_bytes(b"\0" * 1000)
    child = multiprocessing.get_context("spawn").Process(
        target=_job, args=(str(src), str(tmp_path / "out"))
    )
    child.start()
    child.join(120)
    alive = child.is_alive()
    if alive:
        child.kill()
        child.join()
    assert not alive, "the worker still ran its endless loop"
    assert child.exitcode == -signal.SIGPROF


def test_the_allowance_is_lifted_after_each_file(tmp_path: Path) -> None:
    src = tmp_path / "in.dcm"
    src.write_bytes(b"not dicom")
    worker._ENGINE = None  # the job fails at once (an internal error), the timer must be off
    try:
        result = worker.deid_job(str(src), str(tmp_path / "out"))
    finally:
        worker._ENGINE = None
    assert result[0] == "error"
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
