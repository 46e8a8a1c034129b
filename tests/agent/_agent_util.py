"""Helpers for the agent tests: settings in tmp_path, an in-process daemon, expected outputs,
the outbox schema of 0.1.0."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom

from gateway_agent.config import Settings, load_settings
from gateway_agent.synthetic import PHI_MARKERS, Patient, make_ct_series, write_series

PYDICOM_TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: Inbox names carry a planted marker: no log line, output name or status line may show it.
NAME_MARKER = PHI_MARKERS[0]


#: An outbox written by gateway-agent 0.1.0 (schema 1), before it kept the scanner.
V1_OUTBOX_DB = Path(__file__).parent / "data" / "outbox-v1" / "outbox.db"


def _v1_schema() -> dict[str, str]:
    """The ``create`` statements of :data:`V1_OUTBOX_DB` by name, in the order 0.1.0 ran them
    (opened immutable: the committed file and its folder stay untouched)."""
    uri = f"{V1_OUTBOX_DB.as_uri()}?immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        rows = conn.execute(
            "select name, sql from sqlite_master where sql is not null order by rowid"
        )
        return dict(rows.fetchall())


_V1_SCHEMA = _v1_schema()
#: The outbox table of 0.1.0.
V1_OUTBOX_TABLE = _V1_SCHEMA["outbox"]
#: The whole schema of 0.1.0, for outboxes made in a test (an upgraded box opens such a file).
V1_DDL = (*_V1_SCHEMA.values(), "insert into destination_state (id) values (1)")


def agent_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with everything under ``tmp_path``, fast settle, no metrics port."""
    base: dict[str, Any] = {
        "inbox": tmp_path / "inbox",
        "state_dir": tmp_path / "state",
        "destination.kind": "folder",
        "destination.folder": tmp_path / "destination",
        "settle_seconds": 0.3,
        "intake_workers": 2,
        "metrics.enabled": False,
        "disk.min_free_mb": 1.0,
    }
    base.update(overrides)
    # The inbox is configured, so it must exist (as an administrator creates it).
    Path(base["inbox"]).mkdir(parents=True, exist_ok=True)
    return load_settings(None, base)


def dicomweb_overrides(server: Any) -> dict[str, Any]:
    """Settings overrides for a ``tests._orthanc.OrthancServer``."""
    user, password = server.auth
    return {
        "destination.kind": "dicomweb",
        "destination.url": server.dicomweb_url,
        "destination.auth": "basic",
        "destination.username": user,
        "destination.password": password,
        "destination.backoff_base_seconds": 0.2,
        "destination.backoff_cap_seconds": 2.0,
        "destination.timeout_seconds": 10.0,
    }


def agent_command(inbox: Path, state_dir: Path, *flags: str) -> list[str]:
    """``python -m gateway_agent --log-format json run`` on ``inbox`` and ``state_dir``, settling
    after 0.2 s, without a metrics port, then ``flags`` (its destination)."""
    return [
        sys.executable,
        "-m",
        "gateway_agent",
        "--log-format",
        "json",
        "run",
        "--inbox",
        str(inbox),
        "--state-dir",
        str(state_dir),
        "--settle-seconds",
        "0.2",
        "--no-metrics",
        *flags,
    ]


def wait_until(pred: Callable[[], bool], timeout: float = 60.0, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


@contextlib.contextmanager
def running_daemon(settings: Settings, **kwargs: Any) -> Iterator[Any]:
    from gateway_agent.agent.service.daemon import Daemon

    d = Daemon(settings, **kwargs)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def write_synthetic(
    directory: Path, n: int, *, seed: str = "study-1", size: int = 64
) -> list[Path]:
    """``n`` synthetic CT slices with planted PHI, named with a PHI marker."""
    return write_series(
        make_ct_series(n, rows=size, cols=size, study_seed=seed, patient=Patient()),
        directory,
        prefix=f"{NAME_MARKER}_{seed}_",
    )


def copy_pydicom_test_files(directory: Path, *, one_per_instance: bool = False) -> list[Path]:
    """pydicom's test files; ``one_per_instance``: only the first file of each SOP Instance UID
    (several are one instance in other encodings: which copy ends up where depends on the order
    they are taken in)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    seen: set[str] = set()
    for src in sorted(PYDICOM_TEST_FILES.glob("*.dcm")):
        if one_per_instance:
            try:
                uid = str(pydicom.dcmread(src, stop_before_pixels=True, force=True).SOPInstanceUID)
            except Exception:
                uid = src.name
            if uid in seen:
                continue
            seen.add(uid)
        dst = directory / src.name
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def expected_outputs(
    secret_file: Path, settings: Settings, inputs: list[Path], scratch: Path
) -> tuple[set[str], list[Path]]:
    """Run the engine directly (same secret and options): output SOP UIDs and the refused inputs."""
    from gateway_agent._exceptions import IngestError
    from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret

    engine = Deidentifier(
        load_or_create_secret(secret_file),
        DeidOptions.from_settings(settings.deid),
        station_name=settings.station_name,
    )
    scratch.mkdir(parents=True, exist_ok=True)
    uids: set[str] = set()
    refused: list[Path] = []
    for p in inputs:
        if p.name.upper() == "DICOMDIR":
            refused.append(p)
            continue
        try:
            uids.add(engine.deidentify_file(p, scratch).sop_instance_uid)
        except IngestError:
            refused.append(p)
    return uids, refused


def assert_no_phi_bytes(paths: list[Path]) -> None:
    markers = [m.encode() for m in PHI_MARKERS]
    for p in paths:
        data = p.read_bytes()
        for m in markers:
            assert m not in data, f"PHI marker {m!r} in output {p.name}"
        assert NAME_MARKER not in str(p), "inbox name leaked into an output path"


def no_temp_files(root: Path) -> list[Path]:
    """Leftover temporaries (hidden, *.tmp, *.partial) under ``root``."""
    if not root.exists():
        return []
    return [
        p
        for p in root.rglob("*")
        if p.is_file() and (p.name.startswith(".") or p.name.endswith((".tmp", ".partial")))
    ]


def set_old_mtime(paths: list[Path]) -> None:
    t = time.time() - 3600
    for p in paths:
        os.utime(p, (t, t))


class EnospcEngine:
    """A real Deidentifier that fails with ENOSPC while ``flag`` exists (picklable, so it runs
    in the intake worker processes)."""

    def __init__(self, inner: Any, flag: Path) -> None:
        self.inner = inner
        self.flag = flag

    def deidentify_file(self, src: Path, out_dir: Path, **kw: Any) -> Any:
        if self.flag.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.inner.deidentify_file(src, out_dir, **kw)


def start_intake(tmp_path: Path, engine: Any, outbox: Any, **kw: Any) -> Any:
    """A started Intake on ``tmp_path/inbox`` with state under ``tmp_path/state`` (1 worker
    unless ``workers`` says otherwise); other keyword arguments go to ``Intake``."""
    from gateway_agent.agent.intake.pipeline import Intake
    from gateway_agent.agent.intake.quarantine import Quarantine

    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    it = Intake(
        inbox=inbox,
        out_dir=tmp_path / "state" / "outbox",
        engine=engine,
        outbox=outbox,
        quarantine=Quarantine(tmp_path / "state" / "quarantine"),
        workers=kw.pop("workers", 1),
        state_dir=tmp_path / "state",
        **kw,
    )
    it.start()
    return it
