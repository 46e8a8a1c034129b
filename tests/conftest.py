"""Shared fixtures: strict pydicom writing, CI-aware server requirements, synthetic studies."""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config as pydicom_config

from gateway_agent.synthetic import make_ct_series, write_series
from tests._dcmtk import storescp  # noqa: F401
from tests._orthanc import orthanc, pacs  # noqa: F401

IN_CI = bool(os.environ.get("CI"))


def require(condition: bool, what: str) -> None:
    """Skip locally when a tool or server is missing; under CI that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI but missing", pytrace=False)
    pytest.skip(f"{what} not available")


#: What ``logging`` could not write ("--- Logging error ---" on stderr), in any thread: a thread
#: that logs after its test ended (its log stream closed), or a record that cannot be formatted.
_LOGGING_ERRORS: list[str] = []
_handle_error = logging.Handler.handleError
#: Threads a test must not leave running: the upload workers of an agent or uploader it started.
_WORKER_PREFIXES = ("uploader-",)
#: How long a leftover worker may take to end after its test's teardown (one in a request when
#: its agent stopped ends when the request does).
_WORKER_GRACE_SECONDS = float(os.environ.get("GATEWAY_TEST_WORKER_GRACE_SECONDS", "10"))


def _record_logging_error(self: logging.Handler, record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    logged = ""
    if record.exc_info and record.exc_info[1] is not None:
        logged = f" (logging {type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
    _LOGGING_ERRORS.append(
        f"thread {threading.current_thread().name!r}: {message[:300]!r}{logged}\n"
        + traceback.format_exc(limit=3)
    )
    _handle_error(self, record)


@pytest.fixture(autouse=True, scope="session")
def _logging_errors_recorded() -> Iterator[None]:
    logging.Handler.handleError = _record_logging_error  # type: ignore[method-assign]
    yield
    logging.Handler.handleError = _handle_error  # type: ignore[method-assign]


def _pytest_handler(handler: logging.Handler) -> bool:
    return type(handler).__module__ == "_pytest.logging"


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test: a test that runs
    ``logs.configure()`` (the CLI in process) binds a handler to its captured stderr, closed
    after it, and every later record of the process (any thread) would fail to be written."""
    root = logging.getLogger()
    handlers = [h for h in root.handlers if not _pytest_handler(h)]
    level = root.level
    yield
    root.handlers[:] = handlers + [h for h in root.handlers if _pytest_handler(h)]
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_leftover_workers(_logging_errors_recorded: None) -> Iterator[None]:
    """Fail the test (at teardown) that leaves an upload worker running, or during which a
    thread's log record could not be written (most often a thread of an earlier test that
    outlived it: both were silent before)."""
    before = set(threading.enumerate())
    errors = len(_LOGGING_ERRORS)
    yield
    deadline = time.monotonic() + _WORKER_GRACE_SECONDS
    left: list[str] = []
    for t in set(threading.enumerate()) - before:
        if t.name.startswith(_WORKER_PREFIXES):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                left.append(t.name)
    problems: list[str] = []
    if left:
        problems.append(
            f"threads still running {_WORKER_GRACE_SECONDS:.0f} s after the test ended: "
            f"{sorted(left)} (stop the agent or uploader the test started)"
        )
    problems.extend(_LOGGING_ERRORS[errors:])
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _strict_pydicom_writing() -> Iterator[None]:
    old = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    yield
    pydicom_config.settings.writing_validation_mode = old


@pytest.fixture
def ct_series_dir(tmp_path: Path) -> Path:
    """A 10-slice synthetic CT series with planted PHI, written as part-10 files."""
    d = tmp_path / "series"
    write_series(make_ct_series(10, rows=64, cols=64), d)
    return d


@pytest.fixture(autouse=True)
def _private_user_data(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anonymize``'s per-user secret ($XDG_DATA_HOME) in a temp folder, never the real home."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
