"""The README's commands work exactly as written: they are run here, in order, with the real CLI.

The README's ``sh`` code blocks are its commands. An HTML comment just before a block tells this
test what to do with it (invisible when the README is rendered):

* ``<!-- readme-test: background -->``: start the block's one command and leave it running (the
  agent); at the end it gets SIGTERM and must exit 0.
* ``<!-- readme-test: skip (why) -->``: not run. Only ``scripts/test`` is marked so: it is the
  whole suite, this test included, and installs Debian packages.
* ``<!-- readme-test: file NAME -->``: the block (any language) is written to ``NAME``.

Every other ``sh`` block runs command by command through ``bash -c`` in one temporary folder,
which plays the part of the user's checkout: ``UV_PROJECT`` points ``uv run`` at this repository,
so relative paths (``inbox/``, ``state/``, ``destination/``) land in the temporary folder. A
person types the tour's commands seconds apart while the agent works; here a command that fails
is tried again for up to a minute before the test fails.

Not executed, on purpose: the ``python3 -m pip install uv && `` in front of the agent command
(the test runs where uv is already installed, and must not install packages), and
``scripts/test`` (above). The environment differs from a user's in three ways only: no
``GATEWAY_*`` variables leak in from the test runner, ``GATEWAY_METRICS__PORT=0`` (tests run in
parallel on one machine, and the default port 9464 may be taken), and ``UV_FROZEN``/``UV_NO_SYNC``
keep ``uv run`` from touching the lock file or the environment the suite runs in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PIP_PREFIX = "python3 -m pip install uv && "
MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->")
RETRY_SECONDS = 60.0

pytestmark = pytest.mark.slow


@dataclass
class Block:
    """A fenced code block of the README, with the marker that precedes it (if any)."""

    lang: str
    text: str
    line: int
    marker: str = ""
    argument: str = ""


def readme_blocks(text: str) -> list[Block]:
    """Every fenced code block, in order, with its ``readme-test`` marker."""
    blocks: list[Block] = []
    lines = text.splitlines()
    marker, argument = "", ""
    i = 0
    while i < len(lines):
        line = lines[i]
        found = MARKER.search(line)
        if found:
            marker, argument = found.group(1), found.group(2)
        elif line.startswith("```"):
            lang = line[3:].strip()
            start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            blocks.append(Block(lang, "\n".join(lines[start:i]) + "\n", start, marker, argument))
            marker, argument = "", ""
        elif line.strip():
            marker, argument = "", ""  # a marker applies to the block right after it only
        i += 1
    return blocks


def commands(block: Block) -> list[str]:
    """The shell commands of a block: one per line (backslash continuations joined)."""
    out: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    return out


def test_readme_markers_and_commands_are_the_expected_ones() -> None:
    """The README keeps its two commands, and every shell block is run or skipped on purpose."""
    blocks = readme_blocks(README.read_text())
    shell = [b for b in blocks if b.lang == "sh"]
    assert [b.marker for b in shell if b.marker] == ["background", "skip"]
    assert commands(next(b for b in shell if b.marker == "background")) == [
        PIP_PREFIX + "uv run gateway-agent run"
    ]
    assert commands(next(b for b in shell if b.marker == "skip")) == ["scripts/test"]
    assert [b.argument for b in blocks if b.marker == "file"] == ["gateway-agent.toml"]
    run = " ".join(c for b in shell if not b.marker for c in commands(b))
    for needed in ("gateway-agent status", "gateway-agent retry", "config check"):
        assert needed in run
    assert len(README.read_text().splitlines()) <= 250


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env.update(UV_PROJECT=str(ROOT), UV_FROZEN="1", UV_NO_SYNC="1", GATEWAY_METRICS__PORT="0")
    return env


def _run_until_ok(command: str, cwd: Path, env: dict[str, str]) -> str:
    """Run ``command`` as a person would, trying again while the agent has not caught up."""
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        proc = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode == 0:
            return proc.stdout
        if time.monotonic() > deadline:
            pytest.fail(
                f"README command failed: {command}\nexit {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        time.sleep(0.5)


def _wait(condition: Callable[[], bool], what: str, timeout: float = RETRY_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_readme_commands_work_as_written(tmp_path: Path) -> None:
    require(shutil.which("uv") is not None, "uv")
    env = _env()
    outputs: dict[str, str] = {}
    agent: subprocess.Popen[bytes] | None = None
    log = (tmp_path / "agent.log").open("wb")
    try:
        for block in readme_blocks(README.read_text()):
            if block.marker == "file":
                (tmp_path / block.argument).write_text(block.text)
                continue
            if block.lang != "sh" or block.marker == "skip":
                continue
            if block.marker == "background":
                (command,) = commands(block)
                command = command.removeprefix(PIP_PREFIX)
                agent = subprocess.Popen(
                    ["bash", "-c", f"exec {command}"],
                    cwd=tmp_path,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                continue
            for command in commands(block):
                assert agent is None or agent.poll() is None, "the agent stopped during the tour"
                outputs[command] = _run_until_ok(command, tmp_path, env)

        assert agent is not None, "the README starts no agent"
        # What the tour promises the reader.
        arrived = list((tmp_path / "destination").glob("*/*/*.dcm"))
        assert len(arrived) == 1
        ds = pydicom.dcmread(arrived[0])
        original = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        assert str(ds.PatientName).startswith("ANON^")
        assert ds.PatientID != original.PatientID
        assert ds.StudyInstanceUID != original.StudyInstanceUID
        assert not list((tmp_path / "inbox").glob("*.dcm")), "the original is still in the inbox"
        status = next(out for cmd, out in outputs.items() if cmd.endswith("gateway-agent status"))
        assert "sent 1" in status and "quarantine: 1 file(s) (not_dicom 1)" in status
        released = next(out for cmd, out in outputs.items() if "retry --quarantine" in cmd)
        assert "released 1 quarantined file(s)" in released
        check = next(out for cmd, out in outputs.items() if "config check" in cmd)
        assert "configuration OK" in check
        # The released text file is taken again and lands in the quarantine again.
        quarantine = tmp_path / "state" / "quarantine"
        _wait(
            lambda: (
                not list((tmp_path / "inbox").rglob("notes.txt"))
                and len(list(quarantine.glob("*/reason.json"))) == 1
            ),
            "the released file to be quarantined again",
        )
        (reason,) = quarantine.glob("*/reason.json")
        assert json.loads(reason.read_text())["reason"] == "not_dicom"
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)  # "Stop the agent with Ctrl-C (or SIGTERM)"
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log.close()
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]
