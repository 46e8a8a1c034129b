"""The Dockerfile keeps botocore's models of every service botocore's own credential chain makes
a client for, and scripts/container-test checks that same list inside the image."""

from __future__ import annotations

import re
from pathlib import Path

import botocore

ROOT = Path(__file__).resolve().parents[2]


def kept_by_dockerfile() -> set[str]:
    """The service models the Dockerfile's trim of botocore/data leaves in place."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if '"$site/botocore/data"' in ln)
    clause = line.split('"$site/botocore/data"', 1)[1].split("-exec", 1)[0]
    return set(re.findall(r"! -name ([\w-]+)", clause))


def called_by_credential_chain() -> set[str]:
    """Services botocore creates clients for on its own: credential providers, SSO tokens."""
    src = Path(botocore.__file__).parent
    names: set[str] = set()
    for module in ("credentials.py", "tokens.py", "session.py", "utils.py"):
        text = (src / module).read_text()
        names |= set(re.findall(r"(?:client_creator|create_client)\(\s*['\"]([\w-]+)['\"]", text))
        names |= set(re.findall(r"create_nested_client\([^,]+,\s*['\"]([\w-]+)['\"]", text))
    return names


def test_dockerfile_keeps_the_models_the_credential_chain_needs() -> None:
    kept = kept_by_dockerfile()
    assert "s3" in kept
    called = called_by_credential_chain()
    assert {"sts", "sso", "sso-oidc"} <= called  # the scan still finds them
    assert called <= kept, f"botocore calls {sorted(called - kept)}: keep their models"


def test_container_test_checks_the_same_models() -> None:
    script = (ROOT / "scripts" / "container-test").read_text()
    match = re.search(r"^kept = \{(.+)\}$", script, re.MULTILINE)
    assert match is not None
    assert set(re.findall(r'"([\w-]+)"', match.group(1))) == kept_by_dockerfile()
