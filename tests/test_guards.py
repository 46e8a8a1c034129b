"""The suite's guards (``conftest.py``) fail a test that leaves an upload worker running, or
during which a log record could not be written ("--- Logging error ---")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_leftover_worker_and_a_logging_error_fail_their_tests() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
         "-rE", "tests/_guard_probe.py"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "GATEWAY_TEST_WORKER_GRACE_SECONDS": "0.2"},
        check=False,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "3 passed, 2 errors" in out, out  # the errors are at teardown
    assert "ERROR tests/_guard_probe.py::test_leaves_an_upload_worker_running" in out, out
    assert "uploader-probe-0" in out, out
    assert "ERROR tests/_guard_probe.py::test_logs_to_a_closed_stream" in out, out
    assert "after its stream closed" in out, out
