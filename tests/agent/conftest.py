"""Fixtures shared by the agent tests: the real de-identification engine, a real SQLite outbox."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret

from ._agent_util import agent_settings
from ._uploadkit import Clocks


@pytest.fixture
def engine(tmp_path: Path) -> Deidentifier:
    """The real engine with the agent's default options and a secret in ``tmp_path``."""
    secret = load_or_create_secret(tmp_path / "secret.key")
    return Deidentifier(secret, DeidOptions.from_settings(agent_settings(tmp_path).deid))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """A real outbox at ``tmp_path/state/outbox.db`` (one destination), closed afterwards (a test
    may close it first)."""
    ob = Outbox(tmp_path / "state" / "outbox.db")
    yield ob
    with contextlib.suppress(Exception):
        ob.close()


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()
