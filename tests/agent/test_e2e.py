"""End to end with real parts: inbox -> daemon (in-process) -> folder or Orthanc; quarantine."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway_agent.agent.intake.quarantine import ORIGINAL_NAME, REASON_FILE
from gateway_agent.cli.agent_cmds import collect_status
from gateway_agent.synthetic import PHI_MARKERS, make_ct_slice
from tests._orthanc import OrthancServer

from ._agent_util import (
    NAME_MARKER,
    PYDICOM_TEST_FILES,
    agent_settings,
    assert_no_phi_bytes,
    copy_pydicom_test_files,
    dicomweb_overrides,
    expected_outputs,
    files_under,
    no_temp_files,
    running_daemon,
    sop_uid_of,
    wait_until,
    write_synthetic,
)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _corpus(root: Path) -> list[Path]:
    """50 synthetic slices + the pydicom test files + a DICOMDIR and two broken files."""
    files = write_synthetic(root / "series", 50)
    files += copy_pydicom_test_files(root / "pydicom")
    dicomdir = root / "media" / "DICOMDIR"
    dicomdir.parent.mkdir()
    shutil.copyfile(PYDICOM_TEST_FILES / "dicomdirtests" / "DICOMDIR", dicomdir)
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("not a DICOM file\n")
    (root / "junk" / "empty.dcm").write_bytes(b"")
    return [*files, dicomdir, root / "junk" / "notes.txt", root / "junk" / "empty.dcm"]


def _drop(src: Path, inbox: Path, name: str = "drop") -> None:
    """Copy a corpus next to the inbox, then rename it in (what a careful sender does)."""
    staged = inbox.parent / f"staged-{name}"
    shutil.copytree(src, staged)
    staged.rename(inbox / name)


def _inbox_files(inbox: Path) -> list[Path]:
    return [p for p in files_under(inbox) if not p.is_symlink()]


def _check_quarantine(quarantine_root: Path, refused: list[Path]) -> dict[str, int]:
    entries = [d for d in quarantine_root.iterdir() if d.is_dir()]
    assert stat.S_IMODE(quarantine_root.stat().st_mode) == 0o700
    reasons: dict[str, int] = {}
    for d in entries:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for f in (d / ORIGINAL_NAME, d / REASON_FILE):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        info = json.loads((d / REASON_FILE).read_text())
        assert info["reason"] and isinstance(info["original_size"], int)
        assert info["original_size"] == (d / ORIGINAL_NAME).stat().st_size
        reasons[info["reason"]] = reasons.get(info["reason"], 0) + 1
    got = sorted(_sha(d / ORIGINAL_NAME) for d in entries)
    assert got == sorted(_sha(p) for p in refused), "quarantine holds exactly the refused inputs"
    return reasons


@pytest.mark.slow
def test_folder_destination_end_to_end(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    inputs = _corpus(corpus)
    settings = agent_settings(tmp_path)
    with capture_logs() as logs, running_daemon(settings) as daemon:
        _drop(corpus, settings.inbox)
        assert wait_until(
            lambda: not _inbox_files(settings.inbox) and daemon.drained(), timeout=120
        ), f"not drained: {len(_inbox_files(settings.inbox))} left, {daemon.outbox.counts()}"
        counts = daemon.outbox.counts()

    uids, refused = expected_outputs(settings.secret_file, settings, inputs, tmp_path / "direct")
    out = files_under(settings.destination.folder)
    out_uids = [sop_uid_of(p) for p in out]
    assert len(out_uids) == len(set(out_uids)), "duplicate instance in the destination"
    assert set(out_uids) == uids
    assert counts["sent"] == len(uids) and counts["dead"] == 0
    assert len(uids) >= 50
    assert_no_phi_bytes(out)
    assert no_temp_files(settings.destination.folder) == []
    assert no_temp_files(settings.state_dir / "outbox") == []

    reasons = _check_quarantine(settings.state_dir / "quarantine", refused)
    assert reasons.get("dicomdir") == 1
    assert sum(reasons.values()) == len(refused)

    text = repr(logs)
    for marker in PHI_MARKERS:
        assert marker not in text, f"PHI marker {marker} in logs"
    for name in ("CT_small", "notes.txt", "DICOMDIR"):
        assert name not in text, "inbox file name in logs"

    st = collect_status(settings)
    assert st["outbox"]["counts"]["sent"] == len(uids)
    assert st["quarantine"]["count"] == len(refused)
    assert NAME_MARKER not in json.dumps(st, default=str)


@pytest.mark.orthanc
@pytest.mark.slow
def test_orthanc_end_to_end(tmp_path: Path, orthanc: OrthancServer) -> None:
    corpus = tmp_path / "corpus"
    inputs = _corpus(corpus)
    settings = agent_settings(tmp_path, **dicomweb_overrides(orthanc))
    with running_daemon(settings) as daemon:
        _drop(corpus, settings.inbox)
        assert wait_until(
            lambda: not _inbox_files(settings.inbox) and daemon.drained(), timeout=120
        ), f"not drained: {daemon.outbox.counts()}"
        dead = {r.sop_instance_uid: r.last_error for r in daemon.outbox.rows("dead")}

    uids, refused = expected_outputs(settings.secret_file, settings, inputs, tmp_path / "direct")
    stored = orthanc.sop_uids()
    assert len(stored) == len(set(stored)), "duplicate instance in Orthanc"
    # Everything the engine produced is in Orthanc, or dead with the server's reason.
    assert set(stored) | set(dead) == uids
    assert not set(stored) & set(dead)
    assert all(dead.values())
    synthetic = {u for u in uids if orthanc.lookup(u)}
    assert len(synthetic) >= 50
    _check_quarantine(settings.state_dir / "quarantine", refused)


def test_slow_writer_is_taken_complete(tmp_path: Path) -> None:
    """A DICOM file written over ~3 s in small pieces is delivered whole, not quarantined."""
    settings = agent_settings(tmp_path, settle_seconds=1.0)
    src = tmp_path / "one.dcm"
    make_ct_slice(rows=64, cols=64).save_as(src, enforce_file_format=True)
    data = src.read_bytes()
    with running_daemon(settings) as daemon:
        target = settings.inbox / "slow.dcm"
        with target.open("wb") as fh:
            step = len(data) // 10 + 1
            for i in range(0, len(data), step):
                fh.write(data[i : i + step])
                fh.flush()
                time.sleep(0.3)
        assert wait_until(lambda: not target.exists() and daemon.drained(), timeout=30)
    out = files_under(settings.destination.folder)
    assert len(out) == 1
    assert not (settings.state_dir / "quarantine").exists() or not any(
        (settings.state_dir / "quarantine").iterdir()
    )


def test_temporaries_wait_and_symlinks_are_left_alone(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.dcm"
    make_ct_slice(rows=64, cols=64, study_seed="victim").save_as(victim, enforce_file_format=True)
    before = victim.read_bytes()
    src = tmp_path / "a.dcm"
    make_ct_slice(rows=64, cols=64, study_seed="temp").save_as(src, enforce_file_format=True)
    with running_daemon(settings) as daemon:
        inbox = settings.inbox
        (inbox / "link.dcm").symlink_to(victim)
        (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
        for name in ("scan.dcm.partial", "scan.tmp", ".scan.dcm", "scan.dcm~"):
            shutil.copyfile(src, inbox / name)
        time.sleep(1.5)  # several settle times
        assert wait_until(daemon.drained, timeout=10)
        assert sorted(p.name for p in inbox.iterdir()) == sorted(
            [".scan.dcm", "link.dcm", "linkdir", "scan.dcm.partial", "scan.dcm~", "scan.tmp"]
        )
        assert files_under(settings.destination.folder) == []
        (inbox / "scan.dcm.partial").rename(inbox / "scan.dcm")
        assert wait_until(lambda: not (inbox / "scan.dcm").exists() and daemon.drained(), 30)
        assert len(files_under(settings.destination.folder)) == 1
        assert (inbox / "link.dcm").is_symlink() and (inbox / "linkdir").is_symlink()
    assert victim.read_bytes() == before
    assert not any((settings.state_dir / "quarantine").iterdir())


def test_many_writers_at_once(tmp_path: Path) -> None:
    """Several writers dropping files directly (no rename) while the agent runs."""
    settings = agent_settings(tmp_path)
    src = tmp_path / "src"
    paths = write_synthetic(src, 30, seed="writers")
    with running_daemon(settings) as daemon:

        def writer(chunk: list[Path]) -> None:
            for p in chunk:
                (settings.inbox / p.name).write_bytes(p.read_bytes())

        threads = [threading.Thread(target=writer, args=(paths[i::3],)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wait_until(lambda: not _inbox_files(settings.inbox) and daemon.drained(), 60)
    assert len(files_under(settings.destination.folder)) == 30
