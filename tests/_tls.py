"""Self-signed certificates for TLS tests on 127.0.0.1, made with ``openssl``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import require


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (IP SAN), valid two days; ``(cert, key)``."""
    require(shutil.which("openssl") is not None, "openssl")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
            "-addext", f"subjectAltName=IP:{host}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key
