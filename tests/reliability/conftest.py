"""Fixtures of the reliability suite: agent runs that are always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._harness import AgentRun


@pytest.fixture
def agent_run(tmp_path: Path) -> Iterator[Callable[..., AgentRun]]:
    """``agent_run(**kwargs)`` makes an :class:`AgentRun` under ``tmp_path``; every agent
    process group it started is killed at teardown (SIGKILL by recorded PID)."""
    runs: list[AgentRun] = []

    def make(root: Path | None = None, **kwargs: Any) -> AgentRun:
        run = AgentRun(root or tmp_path, **kwargs)
        runs.append(run)
        return run

    yield make
    for run in runs:
        if run.agent.alive():
            run.agent.kill9()
