"""Helpers of the accident cases: small CT inputs with known outputs, the CLI, a counting server,
a wall clock a test can move, read-only folders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway_agent.synthetic import Patient, make_ct_slice

from ._harness import AgentRun, wait_until

__all__ = [
    "CountingStow",
    "Inputs",
    "MovableClock",
    "cli",
    "ct_bytes",
    "multiframe_file",
    "readonly_folder",
    "status_json",
]


def ct_bytes(
    i: int, *, study: str = "acc", rows: int = 24, patient: Patient | None = None
) -> bytes:
    """A small synthetic CT instance (planted PHI) as part-10 bytes."""
    ds = make_ct_slice(
        patient=patient or Patient(),
        study_seed=study,
        instance_number=i + 1,
        rows=rows,
        cols=rows,
        seed=i,
    )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class Inputs:
    """Inputs of one run and the output SOP Instance UID each must get (the agent's engine)."""

    run: AgentRun
    expected: dict[str, str] = field(default_factory=dict)  # inbox name -> output SOP UID
    data: dict[str, bytes] = field(default_factory=dict)
    _engine: Any = None

    @property
    def engine(self) -> Any:
        if self._engine is None:
            self._engine = self.run.engine()
        return self._engine

    def add(self, name: str, data: bytes) -> str:
        """Remember ``name`` with ``data``; return its output SOP UID (nothing is written to the
        inbox)."""
        scratch = self.run.root / "expected"
        scratch.mkdir(exist_ok=True)
        src = scratch / "in.dcm"
        src.write_bytes(data)
        uid = str(self.engine.deidentify_file(src, scratch).sop_instance_uid)
        for p in scratch.iterdir():
            p.unlink()
        self.expected[name] = uid
        self.data[name] = data
        return uid

    def output_of(self, data: bytes) -> bytes:
        """The de-identified bytes the agent makes of ``data``."""
        scratch = self.run.root / "expected-bytes"
        scratch.mkdir(exist_ok=True)
        src = scratch / "in.dcm"
        src.write_bytes(data)
        result = self.engine.deidentify_file(src, scratch)
        out = bytes(result.path.read_bytes())
        for p in scratch.iterdir():
            p.unlink()
        return out


def cli(run: AgentRun, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``gateway-agent --config <run's config> ARGS`` in a child process (the operator's shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(run.agent.env)
    return subprocess.run(
        [sys.executable, "-m", "gateway_agent", "--config", str(run.config), *args],
        cwd=run.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_agent(run: AgentRun, timeout: float = 60.0) -> None:
    """Start the agent and wait until this incarnation logged ``agent_started``."""
    before = sum('"agent_started"' in ln for ln in run.agent.log_lines())
    run.start()
    wait_until(
        lambda: sum('"agent_started"' in ln for ln in run.agent.log_lines()) > before,
        timeout,
        what="agent_started",
    )


def status_json(run: AgentRun) -> dict[str, Any]:
    done = cli(run, "status", "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --------------------------------------------------------------------------- a counting STOW server


class CountingStow:
    """A STOW-RS stand-in on 127.0.0.1 that counts, per expected SOP Instance UID, how many
    requests carried it. ``down`` answers 503; ``delay`` holds replies that long (only those of
    requests carrying a UID of ``hold``, when it is set), or until ``release`` is set."""

    def __init__(self, uids: set[str]) -> None:
        self.uids = {u.encode() for u in uids}
        self.counts: Counter[str] = Counter()
        self.requests = 0
        self.down = False
        self.delay = 0.0
        self.hold: set[str] = set()
        self.held = 0
        self.lock = threading.Lock()
        #: Set to let held requests (``delay``) go at once.
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with owner.lock:
                    owner.requests += 1
                    down, delay, hold = owner.down, owner.delay, set(owner.hold)
                if delay and (not hold or any(u.encode() in body for u in hold)):
                    with owner.lock:
                        owner.held += 1
                    owner.release.wait(delay)
                if down:
                    self._reply(503, b"{}")
                    return
                found = [uid.decode() for uid in owner.uids if uid in body]
                with owner.lock:
                    owner.counts.update(found)
                items = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in found]
                self._reply(200, json.dumps({"00081199": {"vr": "SQ", "Value": items}}).encode())

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> CountingStow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# --------------------------------------------------------------------------- a movable wall clock

_SITECUSTOMIZE = '''\
"""Test clock: time.time() and time.time_ns() plus the offset (seconds) in the file named by
$TEST_WALL_CLOCK_OFFSET_FILE; the monotonic clock is untouched, as when the system clock is set."""
import os
import threading
import time

_path = os.environ.get("TEST_WALL_CLOCK_OFFSET_FILE")
if _path:
    _real_time, _real_time_ns = time.time, time.time_ns
    _offset = [0.0]

    def _read():
        try:
            with open(_path) as fh:
                _offset[0] = float(fh.read().strip() or 0)
        except (OSError, ValueError):
            pass

    def _poll():
        while True:
            _read()
            time.sleep(0.02)

    _read()
    time.time = lambda: _real_time() + _offset[0]
    time.time_ns = lambda: _real_time_ns() + int(_offset[0] * 1e9)
    threading.Thread(target=_poll, name="test-clock", daemon=True).start()
'''


class MovableClock:
    """A wall-clock offset for agent processes: ``env()`` goes into the agent's environment (a
    ``sitecustomize`` on ``PYTHONPATH`` shifts ``time.time``); ``jump(seconds)`` moves it."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
        self.directory = directory
        self.file = directory / "offset"
        self.offset = 0.0
        self.file.write_text("0")

    def env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self.directory), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "TEST_WALL_CLOCK_OFFSET_FILE": str(self.file)}

    def jump(self, seconds: float) -> None:
        self.offset += seconds
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(repr(self.offset))
        tmp.replace(self.file)


# --------------------------------------------------------------------------- read-only folders


@contextlib.contextmanager
def readonly_folder(path: Path) -> Iterator[str]:
    """Make ``path`` read-only for everyone, root included; yields the method used.

    A read-only bind mount of the folder on itself (as a read-only NFS or USB mount behaves),
    else ``chattr +i`` (the folder's entries cannot be removed). Raises OSError when neither
    works (no root, or a file system without either).
    """
    done = subprocess.run(
        ["mount", "--bind", str(path), str(path)], capture_output=True, check=False, timeout=30
    )
    if done.returncode == 0:
        ro = subprocess.run(
            ["mount", "-o", "remount,ro,bind", str(path)],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if ro.returncode == 0:
            try:
                yield "read-only bind mount"
            finally:
                subprocess.run(["umount", str(path)], capture_output=True, check=False, timeout=30)
            return
        subprocess.run(["umount", str(path)], capture_output=True, check=False, timeout=30)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False, timeout=30)
    if done.returncode != 0:
        raise OSError("neither a read-only bind mount nor chattr +i is possible here")
    try:
        yield "chattr +i"
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False, timeout=30)


# --------------------------------------------------------------------------- a large object

MB = 1024 * 1024


def multiframe_file(path: Path, megabytes: int) -> str:
    """An uncompressed 16-bit multi-frame CT (Enhanced CT Image Storage header essentials) of
    about ``megabytes`` MB, written by streaming its frames: never whole in memory here either.
    Returns its SOP Instance UID."""
    rows = cols = 512
    frame = rows * cols * 2
    frames = max(2, megabytes * MB // frame)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "PHIDOE^PHIJANE", "PHIMRN4711"
    ds.Modality, ds.Manufacturer, ds.StudyDate = "CT", "ACME Medical", "20240611"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
    ds.PixelSpacing, ds.SliceThickness = ["0.5", "0.5"], "1"
    with path.open("wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (frames * frame).to_bytes(4, "little"))
        import numpy as np

        rng = np.random.default_rng(0)
        for _ in range(frames):
            fh.write((1024 + rng.normal(0, 20, (rows, cols))).clip(0, 4095).astype("<u2").tobytes())
    return uid
