"""Imports go down the layers only, and inside the agent down the flow (parsed with ``ast``).

Package level: ``_exceptions``, ``_lazy``, ``_runs``, ``dicom``, ``config`` and ``logs`` at the
bottom; ``deid`` and ``imaging`` on them; ``qc`` on ``imaging``; ``agent`` on all of those; ``cli``
on top. Inside ``agent``: intake and upload never import each other, the outbox imports neither, and
nothing imports ``service`` (the wiring) but the command line. Every import counts: module level,
inside functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gateway_agent"

BOTTOM = frozenset({"_exceptions", "_lazy", "_runs", "_version", "dicom", "config", "logs"})
#: Package-level part -> the parts it may import (besides itself).
PACKAGE_LAYERS: Mapping[str, frozenset[str]] = {
    **{part: BOTTOM for part in BOTTOM},
    "deid": BOTTOM,
    "imaging": BOTTOM,
    "qc": BOTTOM | {"imaging"},
    "synthetic": BOTTOM,
    # the pixel corpus measures with the verifier's own folding of identity (deid.pixels.verify)
    "synthetic_pixels": BOTTOM | {"deid"},
    "agent": BOTTOM | {"deid", "imaging", "qc"},
    "cli": BOTTOM | {"deid", "imaging", "qc", "agent", "synthetic"},
    "__main__": frozenset({"cli"}),
    # The package root is the public API: it re-exports (lazily) from every layer but the CLI.
    "<root>": BOTTOM | {"deid", "imaging", "qc", "agent", "synthetic"},
}
#: Inside ``gateway_agent.agent``: stage -> the stages it may import (besides itself).
AGENT_LAYERS: Mapping[str, frozenset[str]] = {
    "metrics": frozenset(),
    "outbox": frozenset({"metrics"}),
    "intake": frozenset({"outbox", "metrics"}),
    "upload": frozenset({"outbox", "metrics"}),
    "service": frozenset({"intake", "outbox", "upload", "metrics"}),
    "<agent>": frozenset(),
}


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def imports(root: Path) -> Iterator[tuple[str, str, int]]:
    """``(importing module, imported module, line)`` for every import of ``root``'s own package
    by its modules, relative imports resolved, ``from pkg import submodule`` seen as the
    submodule."""
    package = root.name
    modules = {_module_name(p, root)[0] for p in root.rglob("*.py")}
    for path in sorted(root.rglob("*.py")):
        name, is_package = _module_name(path, root)
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            else:
                continue
            for target in targets:
                if target == package or target.startswith(package + "."):
                    yield name, target, node.lineno


def _part(module: str, depth: int, top: str) -> str:
    parts = module.split(".")
    return parts[depth] if len(parts) > depth else top


def violations(root: Path) -> list[str]:
    """Every import that goes up a layer, or across the flow inside ``agent``."""
    found = []
    for src, dst, line in imports(root):
        a, b = _part(src, 1, "<root>"), _part(dst, 1, "<root>")
        if a != b and b not in PACKAGE_LAYERS.get(a, frozenset()):
            found.append(f"{src}:{line} imports {dst} ({a} may not import {b})")
        if a == b == "agent":
            x, y = _part(src, 2, "<agent>"), _part(dst, 2, "<agent>")
            if x != y and y not in AGENT_LAYERS.get(x, frozenset()):
                found.append(f"{src}:{line} imports {dst} (agent.{x} may not import agent.{y})")
    return found


def test_imports_go_down_the_layers() -> None:
    assert violations(ROOT) == []


def test_every_part_has_a_rule() -> None:
    """A new package or agent stage must be placed in the layers before it can be imported."""
    parts = {_part(_module_name(p, ROOT)[0], 1, "<root>") for p in ROOT.rglob("*.py")}
    assert parts <= set(PACKAGE_LAYERS)
    stages = {_part(_module_name(p, ROOT)[0], 2, "<agent>") for p in (ROOT / "agent").rglob("*.py")}
    assert stages <= set(AGENT_LAYERS)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("deid/engine.py", "from ..agent.service import daemon\n", "deid may not import agent"),
        (
            "agent/upload/uploader.py",
            "def f():\n    from ..intake.pipeline import Intake\n",
            "agent.upload may not import agent.intake",
        ),
        (
            "agent/outbox/store.py",
            "if TYPE_CHECKING:\n    from gateway_agent.agent.upload import uploader\n",
            "agent.outbox may not import agent.upload",
        ),
        ("agent/intake/watcher.py", "from .. import service\n", "may not import agent.service"),
        ("qc/run.py", "import gateway_agent.cli\n", "qc may not import cli"),
    ],
)
def test_the_check_finds_an_upward_import(
    tmp_path: Path, module: str, source: str, expected: str
) -> None:
    """The checker itself, on a small tree with one bad import (function-level ones included)."""
    root = tmp_path / "gateway_agent"
    for rel in (
        "__init__.py",
        "agent/__init__.py",
        "agent/service/__init__.py",
        "agent/intake/__init__.py",
        "agent/outbox/__init__.py",
        "agent/upload/__init__.py",
        "deid/__init__.py",
        "qc/__init__.py",
        "cli/__init__.py",
        module,
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    (root / module).write_text(source, encoding="utf-8")
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found
