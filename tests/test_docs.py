"""The documents stay true: the configuration reference is the one generated from Settings, every
link and anchor resolves, the changelog names the package's version, and no document narrates
how the code was built (changes by version belong in CHANGELOG.md)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _generator() -> ModuleType:
    """``scripts/gen-config-docs`` as a module (a script's name has no ``.py``)."""
    loader = SourceFileLoader("gen_config_docs", str(ROOT / "scripts" / "gen-config-docs"))
    spec = spec_from_loader(loader.name, loader)
    assert spec is not None
    module = module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_settings() -> None:
    gen = _generator()
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == gen.render(), (
        "docs/configuration.md differs from the Settings model: run uv run scripts/gen-config-docs"
    )


def test_every_setting_has_a_description() -> None:
    assert _generator().missing_descriptions() == [], (
        "give these settings a Field(description=...) in gateway_agent/config.py"
    )


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            base = _slug(line.lstrip("#"))
            anchor, n = base, 0
            while anchor in anchors:
                n += 1
                anchor = f"{base}-{n}"
            anchors.add(anchor)
    return anchors


def _links(path: Path) -> list[str]:
    out: list[str] = []
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            out += LINK.findall(line)
    return out


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(doc: Path) -> None:
    broken = []
    for target in _links(doc):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no such heading")
    assert broken == []


#: Words that narrate how the code was built rather than what it does.
HISTORY = re.compile(
    r"\bsessions?\b|\bRun [A-D]\b|\brun [A-D]'s\b|\bcommit [0-9a-f]{7,40}\b"
    r"|(?-i:(?<![\w./^-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w-]))"
    r"|before the fix|\bfixed in\b|\bwas fixed\b|\bxfail\b|\bthe review\b|\bround of work\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history(doc: Path) -> None:
    found = [
        f"{doc.name}:{n}: {line.strip()[:100]}"
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert found == [], "describe current behaviour; changes by version go in CHANGELOG.md"


def test_changelog_has_unreleased_and_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert "\n## [Unreleased]\n" in text
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M), (
        f"CHANGELOG.md has no entry for version {version}"
    )


def test_reference_names_every_flag_of_run() -> None:
    """The flags the reference lists are exactly those of ``gateway-agent run`` (and the global
    ``--log-format``), so a flag added or removed shows up here."""
    helps = [
        subprocess.run(
            [sys.executable, "-m", "gateway_agent", *args, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for args in ([], ["run"])
    ]
    flags = {f for text in helps for f in re.findall(r"--[a-z][a-z0-9-]+", text)}
    flags -= {"--help", "--config", "--version"}
    intro = _generator().INTRO
    listed = set(re.findall(r"`(--[a-z][a-z0-9-]+)`", intro[intro.index("**Flags**") :]))
    assert listed == flags
