"""The package root re-exports exactly its declared public names, lazily."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import gateway_agent


def test_all_matches_exports() -> None:
    public = {n for n in gateway_agent.__all__ if n != "__version__"}
    assert public == set(gateway_agent._EXPORTS)
    for name in gateway_agent.__all__:
        assert getattr(gateway_agent, name) is not None


def test_unknown_name_raises() -> None:
    try:
        _ = gateway_agent.no_such_name  # type: ignore[attr-defined]
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light() -> None:
    """Importing the package or the CLI must not pull in heavy libraries (start-up time)."""
    code = (
        "import sys, gateway_agent, gateway_agent.cli;"
        "gateway_agent.cli.build_parser();"
        "heavy = [m for m in ('numpy', 'pydantic', 'sklearn', 'matplotlib', 'httpx', 'scipy')"
        " if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _sections(doc: str) -> set[str]:
    """The NumPy docstring section titles in ``doc`` (a title underlined with dashes)."""
    lines = doc.splitlines()
    return {
        lines[i].strip()
        for i in range(len(lines) - 1)
        if lines[i].strip() and set(lines[i + 1].strip()) == {"-"}
    }


@pytest.mark.parametrize("name", [n for n in gateway_agent.__all__ if n != "__version__"])
def test_public_api_is_documented_in_numpy_style(name: str) -> None:
    obj = getattr(gateway_agent, name)
    if not callable(obj):  # data: REASONS, TAGS_TO_REMOVE, WINDOW_PRESETS
        return
    doc = inspect.getdoc(obj) or ""
    assert doc.splitlines() and doc.splitlines()[0].endswith("."), name
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return  # exceptions: their one-line summary and the tree in gateway_agent._exceptions
    sections = _sections(doc)
    if isinstance(obj, type):
        assert sections & {"Parameters", "Attributes"}, name
        return
    assert {"Parameters", "Returns", "Raises"} <= sections, (name, sections)


def test_version_is_the_distributions() -> None:
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert gateway_agent.__version__ == tomllib.loads(pyproject.read_text())["project"]["version"]
