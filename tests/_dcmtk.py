"""dcmtk on loopback for tests: a ``storescp`` receiver with its fault switches, ``storescu``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests._orthanc import free_port

__all__ = [
    "Storescp",
    "dcmtk_available",
    "dcmtk_tool",
    "echoscu",
    "storescp",
    "storescu",
    "write_profile",
]

#: DCMTK reads TCP_NODELAY from the environment; without it each PDU waits for a delayed ACK.
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def dcmtk_tool(name: str) -> str:
    """The dcmtk program ``name``: ``$DCMTK_BIN/name``, else the first on PATH outside this
    Python environment (pynetdicom installs console scripts of the same names, with other
    options, into the environment's ``bin``)."""
    if os.environ.get("DCMTK_BIN"):
        return str(Path(os.environ["DCMTK_BIN"]) / name)
    own = Path(sys.prefix, "bin").resolve()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and Path(d).resolve() != own:
            found = shutil.which(name, path=d)
            if found:
                return found
    return name


def dcmtk_available() -> bool:
    return all(os.access(dcmtk_tool(t), os.X_OK) for t in ("storescp", "storescu", "echoscu"))


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def write_profile(path: Path, sop_classes: Sequence[str], syntaxes: Sequence[str]) -> Path:
    """An association configuration file (``storescp -xf FILE Only``) accepting only these SOP
    classes, each with these transfer syntaxes."""
    lines = ["[[TransferSyntaxes]]", "[Syntaxes]"]
    lines += [f"TransferSyntax{i + 1} = {ts}" for i, ts in enumerate(syntaxes)]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{i + 1} = {c}\\Syntaxes" for i, c in enumerate(sop_classes)]
    lines += ["[[Profiles]]", "[Only]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


class Storescp:
    """One ``storescp`` process on a free loopback port, writing into ``out``.

    ``args`` are extra storescp options: ``--refuse``, ``--abort-after``, ``--sleep-after 2``,
    ``--ignore``, ``-xf FILE PROFILE``, ``+tls KEY CERT`` ... Stop kills it by its recorded PID.
    """

    def __init__(self, out: Path, *, aet: str = "STORESCP", args: Sequence[str] = ()) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.args = list(args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.out.parent / f"storescp-{id(self)}.log"

    def start(self, timeout: float = 10.0) -> Storescp:
        for _ in range(5):
            self.port = free_port()
            accept = [] if any(a in ("-xf", "--config-file") for a in self.args) else ["+xa"]
            cmd = [
                dcmtk_tool("storescp"),
                "-aet",
                self.aet,
                "-od",
                str(self.out),
                *accept,
                "-dhl",
                "-pdu",
                "131072",
                *self.args,
                str(self.port),
            ]
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=DCMTK_ENV
                )
            end = time.monotonic() + timeout
            while time.monotonic() < end and self.proc.poll() is None:
                if _port_open(self.port):
                    return self
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"storescp did not start: {self.log.read_text(errors='replace')[-800:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file())

    def __enter__(self) -> Storescp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu(
    port: int,
    files: Sequence[Path] | Path,
    *,
    aet: str = "SCANNER",
    aec: str = "EDGE01",
    extra: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``storescu`` against 127.0.0.1:``port`` (a folder is sent recursively)."""
    targets = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    scan = ["+sd", "+r"] if isinstance(files, Path) and files.is_dir() else []
    cmd = [dcmtk_tool("storescu"), "-aet", aet, "-aec", aec, "-pdu", "131072", *scan, *extra]
    cmd += ["127.0.0.1", str(port), *targets]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV, check=False
    )


def echoscu(port: int, *, aet: str = "SCANNER", aec: str = "EDGE01") -> int:
    cmd = [dcmtk_tool("echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, env=DCMTK_ENV, check=False).returncode


@pytest.fixture
def storescp() -> Iterator[type[Storescp]]:
    """A factory: ``with storescp(out, args=[...]) as scp:`` (skips without dcmtk, fails in CI)."""
    from tests.conftest import require

    require(dcmtk_available(), "dcmtk (storescp, storescu, echoscu)")
    yield Storescp
