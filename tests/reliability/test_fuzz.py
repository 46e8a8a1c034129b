"""The coverage-guided fuzz target for the header path, run for a bounded time."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ._harness import REPO, record_figures, size
from ._mutants import generate, seed_files

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

FUZZ = REPO / "fuzz" / "fuzz_header.py"


def _corpus(directory: Path) -> Path:
    directory.mkdir()
    for name, data in seed_files():
        if len(data) <= 200_000:
            (directory / f"seed-{name}").write_bytes(data)
    for m in generate(60, seed=7, n_large=0):
        if m.data and len(m.data) <= 200_000:
            (directory / f"mut-{m.index}").write_bytes(m.data)
    return directory


def test_fuzz_header_path_bounded(tmp_path: Path) -> None:
    seconds = size(20, 600)
    corpus = _corpus(tmp_path / "corpus")
    has_atheris = importlib.util.find_spec("atheris") is not None
    if has_atheris:
        cmd = [
            sys.executable, str(FUZZ), f"-max_total_time={seconds}", "-timeout=10",
            "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", "-seed=1",
            "-print_final_stats=1", str(corpus),
        ]  # fmt: skip
    else:
        cmd = [sys.executable, str(FUZZ), "--plain", "--seconds", str(seconds), str(corpus)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 180, env=env, cwd=tmp_path
    )
    text = out.stdout + out.stderr
    crashes = sorted(
        p.name
        for p in tmp_path.iterdir()
        if p.name.startswith(("crash-", "timeout-", "oom-", "plain-"))
    )
    runs = next(
        (
            ln.rsplit(":", 1)[1].strip()
            for ln in text.splitlines()
            if "stat::number_of_executed_units" in ln
        ),
        "?",
    )
    cov = re.findall(r"\bcov: (\d+)", text)
    record_figures(
        "fuzz",
        {
            "engine": "atheris" if has_atheris else "plain",
            "seconds": seconds,
            "runs": runs,
            "coverage_edges": int(cov[-1]) if cov else None,
            "crashes": len(crashes),
        },
    )
    assert out.returncode == 0 and not crashes, f"fuzz found a problem {crashes}:\n{text[-4000:]}"
