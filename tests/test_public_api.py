"""The package root re-exports exactly its declared public names, lazily."""

from __future__ import annotations

import subprocess
import sys

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
