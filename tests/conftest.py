"""Shared fixtures: strict pydicom writing, CI-aware server requirements, synthetic studies."""

from __future__ import annotations

import os
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
