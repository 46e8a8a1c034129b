"""A real Orthanc (DICOMweb plugin, optionally its DICOM port) on free loopback ports, for tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._procs import alive, free_port, log_tail, port_open, started, stop_process, wait_ready

__all__ = [
    "DICOMWEB_PLUGIN",
    "ORTHANC_BIN",
    "OrthancServer",
    "free_port",
    "orthanc",
    "orthanc_available",
    "pacs",
    "start_orthanc",
]

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = os.environ.get(
    "ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
)
USER, PASSWORD = "edge", "edge-secret"


def orthanc_available() -> bool:
    return os.access(ORTHANC_BIN, os.X_OK) and Path(DICOMWEB_PLUGIN).is_file()


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
            if port_open(self.port) or (self.dicom and port_open(self.dicom_port)):
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
            if wait_ready(self._proc, self._answers, timeout):
                return
            self.stop()
            if self._fixed_port:
                break
            self.port = free_port()  # lost a port race with another test worker: try another
            if self.dicom:
                self.dicom_port = free_port()
        tail = log_tail(self.workdir / "orthanc.log")
        raise RuntimeError(f"Orthanc did not start on port {self.port}:\n{tail}")

    def _answers(self) -> bool:
        """*This* instance answers ``/system`` (and its DICOM port is open when it has one)."""
        try:
            r = self._client.get(self.base_url + "/system", timeout=1.0)
        except httpx.HTTPError:
            return False
        ours = r.status_code == 200 and r.json().get("Name") == self.name
        return ours and (not self.dicom or port_open(self.dicom_port))

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and alive(self._proc.pid)

    def stop(self, *, kill: bool = True) -> None:
        """Stop by the recorded PID (SIGKILL by default: storage is throw-away); reap it."""
        proc, self._proc = self._proc, None
        sig = signal.SIGKILL if kill else signal.SIGTERM
        stop_process(proc, sig=sig, ports=(self.port, self.dicom_port if self.dicom else 0))

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
    return started(OrthancServer(**kwargs))


@pytest.fixture
def orthanc() -> Iterator[OrthancServer]:
    """A fresh Orthanc, Basic auth ``edge``/``edge-secret``, on a free port; removed afterwards."""
    with start_orthanc() as server:
        yield server


@pytest.fixture
def pacs() -> Iterator[OrthancServer]:
    """A fresh Orthanc with its DICOM port open, taking C-STORE from ``EDGE01`` on 127.0.0.1."""
    with start_orthanc(dicom=True, dicom_peers={"EDGE01": ("127.0.0.1", 11112)}) as server:
        yield server
