"""The seed's notebook walkthrough runs unchanged on the public API (``src.<module>`` ->
``gateway_agent``), prints what it prints, and the library prints nothing of its own.

``tests/seed/walkthrough.txt`` is the seed document as it was given (a notebook exported as
text). Its cells are the text after each ``In [None]:`` line up to the next Markdown heading
or cell. The one line that is not Python, the IPython magic ``%matplotlib inline``, selects the
notebook's inline backend; outside IPython it is left out and the cells run with matplotlib's
``Agg`` backend (``MPLBACKEND=Agg``), where ``plt.show()`` has nothing to show (matplotlib's
warning that Agg cannot show a figure is ignored). Any other magic fails the test instead of
being skipped silently.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SEED = Path(__file__).resolve().parent / "seed" / "walkthrough.txt"
SHARED_SEED = Path(__file__).resolve().parents[2] / "shared" / "seed"


def seed_cells() -> list[str]:
    """The code cells of the seed notebook, in order."""
    text = SEED.read_text(encoding="utf-8")
    cells = []
    for chunk in re.split(r"^In \[None\]:\n", text, flags=re.MULTILINE)[1:]:
        end = re.search(r"\n\n(?=## |\Z)", chunk)
        cells.append(chunk[: end.start()] if end else chunk)
    return cells


def as_python(cell: str) -> str:
    """The cell as plain Python: ``src.<module>`` imports from ``gateway_agent``, no magic."""
    lines = []
    for line in cell.splitlines():
        if line.startswith("%"):
            assert line.strip() == "%matplotlib inline", f"unexpected IPython magic: {line}"
            continue
        lines.append(line)
    return re.sub(r"\bsrc\.[a-z_]+\b", "gateway_agent", "\n".join(lines)) + "\n"


def test_the_copy_is_the_seed_document() -> None:
    """Where the shared folder is beside the repository, the copy here is the same text."""
    original = SHARED_SEED / "000_63ea0ac32e9dae52.txt"
    if original.is_file():
        assert original.read_text(encoding="utf-8") == SEED.read_text(encoding="utf-8")


def test_seed_walkthrough_runs_unchanged(tmp_path: Path) -> None:
    cells = seed_cells()
    assert len(cells) == 7
    assert sum("from src." in c for c in cells) == 4
    program = "".join(
        f"print('=== cell {i}', flush=True)\n{as_python(cell)}" for i, cell in enumerate(cells)
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["MPLBACKEND"] = "Agg"
    env["MPLCONFIGDIR"] = str(tmp_path / "mpl")
    done = subprocess.run(
        [sys.executable, "-W", "ignore::UserWarning:matplotlib", "-c", program],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no warning, no log line: a library is silent unless configured
    out = done.stdout.split("=== cell ")
    printed = {int(part.split("\n", 1)[0]): part.split("\n", 1)[1] for part in out[1:]}
    assert printed[0] == "Imports OK\n"
    assert "Patient Name   : Doe^John" in printed[1]
    before, after = printed[2].split("=== AFTER ANONYMIZATION ===")
    assert "PatientName: Doe^John" in before
    for phi in ("Doe^John", "12345", "19800101", "City General Hospital"):
        assert phi not in after
    assert "PatientIdentityRemoved : YES" in after
    assert "StationName            : DEMO_UNIT_01" in after
    assert re.search(r"Total PHI tags targeted for removal: \d+", after)
    assert "appears very differently across windows" in printed[3]
    assert re.search(r"Silhouette score: 0\.\d{3} ", printed[4])
    lines = printed[5].splitlines()
    assert lines[0] == "Files processed: 8"
    groups = {}
    for line in lines:
        m = re.match(r"  (scan_\d\d\.dcm)  →  Group (\d)  \(density=(\d+), contrast=(\d+)\)", line)
        if m:
            groups[m.group(1)] = m.group(2)
    assert len(groups) == 8
    normal = {groups[f"scan_{i:02d}.dcm"] for i in range(6)}
    anomalous = {groups[f"scan_{i:02d}.dcm"] for i in range(6, 8)}
    assert len(normal) == 1 and len(anomalous) == 1 and normal != anomalous
    assert printed[6] == "Scans in a different cluster may warrant investigation.\n"
