"""A real Orthanc (DICOMweb plugin, optionally its DICOM port) on free loopback ports, for tests."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

__all__ = [
    "DICOMWEB_PLUGIN",
    "ORTHANC_BIN",
    "OrthancServer",
    "free_port",
    "orthanc",
    "orthanc_available",
    "start_orthanc",
]

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get(
    "ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)
USER, PASSWORD = "edge", "edge-secret"


def orthanc_available() -> bool:
    return os.access(ORTHANC_BIN, os.X_OK) and Path(DICOMWEB_PLUGIN).is_file()


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it; races are retried by start())."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (``kill -0`` succeeds on zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class OrthancServer:
    """One Orthanc process: ``start()``, ``stop()`` (SIGKILL by recorded PID), ``start()`` again.

    The port stays the same across restarts, so clients see "down" then "up" at one address.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        auth: bool = True,
        port: int | None = None,
        extra_config: dict[str, Any] | None = None,
        dicom: bool = False,
        dicom_aet: str = "ORTHANC",
        dicom_peers: dict[str, tuple[str, int]] | None = None,
        check_called_aet: bool = True,
    ) -> None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gw-orthanc-", dir=base))
        self._own_workdir = workdir is None
        self.auth_enabled = auth
        self.auth: tuple[str, str] = (USER, PASSWORD)
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.extra_config = extra_config or {}
        # The DICOM port: C-STORE accepted only from the registered AE titles on 127.0.0.1
        # (``dicom_peers``: AE title -> (host, port) where Orthanc can reach that peer, e.g. for
        # Storage Commitment reports); a wrong called AE title is rejected when checked.
        self.dicom = dicom
        self.dicom_aet = dicom_aet
        self.dicom_peers = dict(dicom_peers or {"EDGE01": ("127.0.0.1", 11112)})
        self.check_called_aet = check_called_aet
        self.dicom_port = free_port() if dicom else 0
        self.name = f"edge-ci-{os.getpid()}-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(auth=self.auth, timeout=10.0)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return self.base_url + "/dicom-web"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- life cycle --------------------------------------------------------------------------
    def _write_config(self) -> Path:
        cfg_dir = self.workdir / "config"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.auth_enabled,
            "RegisteredUsers": {USER: PASSWORD} if self.auth_enabled else {},
            "HttpDescribeErrors": True,
            "HttpCompressionEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "HttpThreadsCount": 50,
            "DicomServerEnabled": self.dicom,
            "DicomAet": self.dicom_aet,
            "DicomPort": self.dicom_port or 4242,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                f"peer{i}": [ae, host, port]
                for i, (ae, (host, port)) in enumerate(sorted(self.dicom_peers.items()))
            },
            "SaveJobs": False,
            "OverwriteInstances": False,
            "DeidentifyLogs": True,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
            },
        }
        (cfg_dir / "orthanc.json").write_text(json.dumps(cfg, indent=1))
        if self.extra_config:
            (cfg_dir / "extra.json").write_text(json.dumps(self.extra_config, indent=1))
        return cfg_dir

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart) Orthanc and wait until *this* instance answers ``/system``."""
        if self.running():
            return
        for attempt in range(5):
            if _port_in_use(self.port) or (self.dicom and _port_in_use(self.dicom_port)):
                if self._fixed_port or attempt == 4:
                    raise RuntimeError(f"port {self.port} or {self.dicom_port} is in use")
                self.port = free_port()
                if self.dicom:
                    self.dicom_port = free_port()
                continue
            cfg_dir = self._write_config()
            log = self.workdir / "orthanc.log"
            env = dict(os.environ, TCP_NODELAY="1")
            self._proc = subprocess.Popen(
                [ORTHANC_BIN, f"--logfile={log}", str(cfg_dir)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            (self.workdir / "orthanc.pid").write_text(str(self._proc.pid))
            if self._wait_ready(timeout):
                return
            self.stop()
            if self._fixed_port:
                break
            self.port = free_port()  # lost a port race with another test worker: try another
            if self.dicom:
                self.dicom_port = free_port()
        tail = ""
        with_log = self.workdir / "orthanc.log"
        if with_log.exists():
            tail = "\n".join(with_log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"Orthanc did not start on port {self.port}:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            try:
                r = self._client.get(self.base_url + "/system", timeout=1.0)
                ours = r.status_code == 200 and r.json().get("Name") == self.name
                if ours and (not self.dicom or _port_in_use(self.dicom_port)):
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and _pid_alive(self._proc.pid)

    def stop(self, *, kill: bool = True) -> None:
        """Stop by the recorded PID (SIGKILL by default: storage is throw-away); reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Wait until the ports are really free, so a restart on the same ports works at once.
        end = time.monotonic() + 5
        while time.monotonic() < end and (
            _port_in_use(self.port) or (self.dicom and _port_in_use(self.dicom_port))
        ):
            time.sleep(0.02)

    def close(self) -> None:
        """Stop and remove the throw-away storage."""
        self.stop()
        self._client.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what arrived ------------------------------------------------------------------------
    def _ask(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A read of Orthanc's REST API, asked again once if Orthanc closed the kept-alive
        connection just as the request went out (busy machines: "Server disconnected")."""
        try:
            return self._client.request(method, self.base_url + path, **kwargs)
        except httpx.RemoteProtocolError:
            return self._client.request(method, self.base_url + path, **kwargs)

    def lookup(self, sop_uid: str) -> bool:
        """True if an instance with this SOP Instance UID is stored (``POST /tools/lookup``)."""
        r = self._ask("POST", "/tools/lookup", content=sop_uid.encode())
        r.raise_for_status()
        return any(item.get("Type") == "Instance" for item in r.json())

    def count_instances(self) -> int:
        r = self._ask("GET", "/statistics")
        r.raise_for_status()
        return int(r.json()["CountInstances"])

    def sop_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance (a list: duplicates would show twice)."""
        r = self._ask("GET", "/instances", params={"expand": ""})
        r.raise_for_status()
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in r.json()]

    def instance_file(self, sop_uid: str) -> bytes:
        """The part-10 file Orthanc stored for this SOP Instance UID."""
        r = self._ask("POST", "/tools/lookup", content=sop_uid.encode())
        r.raise_for_status()
        [found] = [item for item in r.json() if item.get("Type") == "Instance"]
        r = self._ask("GET", f"/instances/{found['ID']}/file")
        r.raise_for_status()
        return r.content

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_orthanc(**kwargs: Any) -> OrthancServer:
    """Start a server or, when Orthanc is not installed, skip (fail under CI)."""
    from tests.conftest import require  # late: conftest imports this module

    require(orthanc_available(), "Orthanc with the DICOMweb plugin")
    server = OrthancServer(**kwargs)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    """A fresh Orthanc, Basic auth ``edge``/``edge-secret``, on a free port; removed afterwards."""
    server = start_orthanc()
    try:
        yield server
    finally:
        server.close()
