"""DICOM peers on loopback for tests: a dcmtk ``storescp`` receiver with its fault switches,
``storescu``, and a pynetdicom scanner sending CT images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests._procs import free_port, log_tail, port_open, stop_process, wait_ready

__all__ = [
    "Storescp",
    "send_ct",
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


def send_ct(port: int, paths: Sequence[Path], *, calling: str, called: str = "EDGE01") -> list[int]:
    """C-STORE each CT file over one association to 127.0.0.1:``port``, as a scanner would; the
    status of each."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(p).Status) for p in paths]
    finally:
        assoc.release()


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
            if wait_ready(self.proc, lambda: port_open(self.port), timeout, step=0.02):
                return self
            self.stop()
        raise RuntimeError(f"storescp did not start: {log_tail(self.log)}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

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
