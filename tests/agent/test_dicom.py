"""The agent speaking DICOM with real peers on 127.0.0.1: C-STORE to Orthanc and dcmtk storescp,
and scanners (storescu, pynetdicom) pushing to its listener."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from structlog.testing import capture_logs

from gateway_agent.cli.agent_cmds import _print_status, collect_status
from gateway_agent.synthetic import PHI_MARKERS
from tests._dcmtk import Storescp, send_ct, storescu, write_profile
from tests._orthanc import OrthancServer, free_port

from ._agent_util import (
    agent_settings,
    assert_no_phi_bytes,
    copy_pydicom_test_files,
    expected_outputs,
    running_daemon,
    wait_until,
    write_synthetic,
)

MR = "1.2.840.10008.5.1.4.1.1.4"


def _circuit(daemon: Any) -> dict[str, Any]:
    """The circuit of the daemon's one destination."""
    return dict(daemon.outbox.queue("default").destination_status())


def dicom_overrides(host: str, port: int, called_ae: str, **extra: Any) -> dict[str, Any]:
    return {
        "unit_name": "EDGE01",
        "destination.kind": "dicom",
        "destination.host": host,
        "destination.port": port,
        "destination.called_ae": called_ae,
        "destination.backoff_base_seconds": 0.2,
        "destination.backoff_cap_seconds": 1.0,
        "destination.timeout_seconds": 10.0,
        **extra,
    }


def listener_overrides(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "listener.enabled": True,
        "listener.host": "127.0.0.1",
        "listener.port": port,
        **{f"listener.{k}": v for k, v in extra.items()},
    }


def _drop(src: Path, inbox: Path) -> None:
    staged = inbox.parent / "staged"
    shutil.copytree(src, staged)
    staged.rename(inbox / "drop")


def _done(daemon: Any, inbox: Path) -> bool:
    """Every inbox file taken, and nothing waiting in intake or the outbox."""
    return not [p for p in inbox.rglob("*") if p.is_file()] and bool(daemon.drained())


def _status_text(settings: Any, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    _print_status(collect_status(settings))
    return capsys.readouterr().out


# -- sending ---------------------------------------------------------------------------------------
@pytest.mark.orthanc
@pytest.mark.slow
def test_inbox_to_orthanc_over_c_store(tmp_path: Path, pacs: OrthancServer) -> None:
    corpus = tmp_path / "corpus"
    inputs = write_synthetic(corpus / "series", 50)
    inputs += copy_pydicom_test_files(corpus / "pydicom", one_per_instance=True)
    settings = agent_settings(
        tmp_path, **dicom_overrides("127.0.0.1", pacs.dicom_port, pacs.dicom_aet)
    )
    with capture_logs() as logs, running_daemon(settings) as daemon:
        _drop(corpus, settings.inbox)
        assert wait_until(lambda: _done(daemon, settings.inbox), 180), daemon.outbox.counts()
        dead = {r.sop_instance_uid: r.last_error for r in daemon.outbox.rows("dead")}
        sent = daemon.outbox.rows("sent", limit=10_000)
    uids, _refused = expected_outputs(settings.secret_file, settings, inputs, tmp_path / "direct")
    stored = pacs.sop_uids()
    assert len(stored) == len(set(stored)), "an instance arrived twice"
    assert set(stored) | set(dead) == uids and not set(stored) & set(dead)
    assert len(stored) >= 50
    # What Orthanc refuses is dead with the status and its meaning, never silently dropped.
    assert all(reason and ("0x" in reason or "presentation context" in reason)
               for reason in dead.values()), dead  # fmt: skip
    assert {r.source for r in sent} == {"inbox"} and {r.calling_ae for r in sent} == {None}
    text = repr(logs)
    assert not [m for m in PHI_MARKERS if m in text]


def test_inbox_to_storescp_arrives_deidentified(tmp_path: Path, storescp: type[Storescp]) -> None:
    inputs = write_synthetic(tmp_path / "corpus", 12)
    with storescp(tmp_path / "scp") as scp:
        settings = agent_settings(tmp_path, **dicom_overrides("127.0.0.1", scp.port, scp.aet))
        with running_daemon(settings) as daemon:
            _drop(tmp_path / "corpus", settings.inbox)
            assert wait_until(lambda: _done(daemon, settings.inbox), 120), daemon.outbox.counts()
        got = scp.files()
    uids, _ = expected_outputs(settings.secret_file, settings, inputs, tmp_path / "direct")
    assert sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in got) == sorted(uids)
    assert_no_phi_bytes(got)


@pytest.mark.orthanc
def test_called_ae_mismatch_is_a_misconfiguration_in_status(
    tmp_path: Path, pacs: OrthancServer, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic(tmp_path / "corpus", 3)
    settings = agent_settings(tmp_path, **dicom_overrides("127.0.0.1", pacs.dicom_port, "NOPE"))
    with running_daemon(settings) as daemon:
        _drop(tmp_path / "corpus", settings.inbox)
        assert wait_until(lambda: _circuit(daemon).get("auth_failing"), 60)
        counts = daemon.outbox.counts()
        rows = daemon.outbox.rows(limit=10)
    assert counts["sent"] == 0 and counts["dead"] == 0  # they wait; attempts are not burned
    assert all(r.attempts <= 1 for r in rows)
    out = _status_text(settings, capsys)
    assert "ASSOCIATION REJECTED" in out
    assert "called AE title not recognised: check destination.called_ae" in out
    assert "dicom NOPE@127.0.0.1" in out and "(storage proven: C-FIND)" in out
    assert pacs.count_instances() == 0


def test_refused_sop_class_is_dead_with_the_reason(
    tmp_path: Path, storescp: type[Storescp]
) -> None:
    write_synthetic(tmp_path / "corpus", 3)
    profile = write_profile(tmp_path / "mr.cfg", [MR], [ExplicitVRLittleEndian])
    with storescp(tmp_path / "scp", args=["-xf", str(profile), "Only"]) as scp:
        settings = agent_settings(tmp_path, **dicom_overrides("127.0.0.1", scp.port, scp.aet))
        with running_daemon(settings) as daemon:
            _drop(tmp_path / "corpus", settings.inbox)
            assert wait_until(lambda: daemon.outbox.counts()["dead"] == 3, 60)
            dead = daemon.outbox.rows("dead")
            healthy = not _circuit(daemon).get("consecutive_failures")
    assert all("presentation context refused" in (r.last_error or "") for r in dead)
    assert healthy  # the peer answered: it is not down


def test_peer_aborting_is_an_outage_and_nothing_counts_as_sent(
    tmp_path: Path, storescp: type[Storescp]
) -> None:
    write_synthetic(tmp_path / "corpus", 3)
    with storescp(tmp_path / "scp", args=["--abort-after"]) as scp:
        settings = agent_settings(tmp_path, **dicom_overrides("127.0.0.1", scp.port, scp.aet))
        with running_daemon(settings) as daemon:
            _drop(tmp_path / "corpus", settings.inbox)
            assert wait_until(
                lambda: (_circuit(daemon).get("consecutive_failures") or 0) >= 2,
                60,
            )
            counts = daemon.outbox.counts()
            status = _circuit(daemon)
    assert counts["sent"] == 0 and counts["dead"] == 0
    assert "C-STORE" in str(status.get("last_error"))


@pytest.mark.orthanc
def test_orthanc_stopped_then_started_again_delivers_everything(
    tmp_path: Path, pacs: OrthancServer
) -> None:
    inputs = write_synthetic(tmp_path / "corpus", 10)
    settings = agent_settings(
        tmp_path, **dicom_overrides("127.0.0.1", pacs.dicom_port, pacs.dicom_aet)
    )
    pacs.stop()
    with running_daemon(settings) as daemon:
        _drop(tmp_path / "corpus", settings.inbox)
        assert wait_until(
            lambda: (_circuit(daemon).get("consecutive_failures") or 0) >= 1,
            60,
        )
        assert "connection refused" in str(_circuit(daemon).get("last_error"))
        pacs.start()
        assert wait_until(lambda: _done(daemon, settings.inbox), 120), daemon.outbox.counts()
    uids, _ = expected_outputs(settings.secret_file, settings, inputs, tmp_path / "direct")
    assert sorted(pacs.sop_uids()) == sorted(uids)


# -- receiving -------------------------------------------------------------------------------------
@pytest.mark.orthanc
@pytest.mark.slow
def test_scanner_to_listener_to_orthanc(
    tmp_path: Path, pacs: OrthancServer, storescp: type[Storescp]
) -> None:
    """Both at once: storescu -> the agent's listener -> de-identified -> Orthanc over C-STORE."""
    inputs = write_synthetic(tmp_path / "scanner", 50)
    port = free_port()
    settings = agent_settings(
        tmp_path,
        **dicom_overrides("127.0.0.1", pacs.dicom_port, pacs.dicom_aet),
        **listener_overrides(port, allowed_calling_aes=["CT_ROOM1"]),
    )
    with capture_logs() as logs, running_daemon(settings) as daemon:
        stranger = storescu(port, tmp_path / "scanner", aet="INTRUDER")
        assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr
        done = storescu(port, tmp_path / "scanner", aet="CT_ROOM1")
        assert done.returncode == 0, done.stderr
        assert wait_until(daemon.drained, timeout=180), daemon.outbox.counts()
        sent = daemon.outbox.rows("sent", limit=1000)
        assert daemon.threads_alive()["listener"]
    uids, _ = expected_outputs(settings.secret_file, settings, inputs, tmp_path / "direct")
    assert sorted(pacs.sop_uids()) == sorted(uids)
    assert {(r.source, r.calling_ae) for r in sent} == {("listener", "CT_ROOM1")}
    received = settings.state_dir / "received"
    assert not [p for p in received.rglob("*") if p.is_file()], "spool not emptied"
    stats = json.loads((settings.state_dir / "listener.json").read_text())
    assert stats["counters"]["stored"] == 50 and stats["counters"]["rejected"] == 1
    assert stats["by_calling_ae"]["CT_ROOM1"]["stored"] == 50
    assert stats["by_calling_ae"]["INTRUDER"]["rejected"] == 1
    text = repr(logs)
    assert not [m for m in PHI_MARKERS if m in text]
    # The received originals never leave the box: Orthanc holds only de-identified copies.
    original_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in inputs}
    assert not original_uids & set(pacs.sop_uids())


def test_listener_refuses_with_a700_while_intake_is_paused_and_loses_nothing(
    tmp_path: Path,
) -> None:
    inputs = write_synthetic(tmp_path / "scanner", 4)
    port = free_port()
    full = agent_settings(tmp_path, **listener_overrides(port), **{"disk.min_free_mb": 1e12})
    with running_daemon(full) as daemon:
        assert wait_until(lambda: daemon.listener is not None and daemon.listener.alive(), 30)
        assert send_ct(port, inputs, calling="CT1") == [0xA700] * 4  # the scanner keeps them
        assert not list((full.state_dir / "received").rglob("*.dcm"))
    ok = agent_settings(tmp_path, **listener_overrides(port))
    with running_daemon(ok) as daemon:
        assert send_ct(port, inputs, calling="CT1") == [0] * 4  # sent again later: now taken
        assert wait_until(daemon.drained, timeout=60)
        assert daemon.outbox.counts()["sent"] == 4
    uids, _ = expected_outputs(ok.secret_file, ok, inputs, tmp_path / "direct")
    delivered = {p.stem for p in Path(ok.destination.folder).rglob("*.dcm")}
    assert delivered == uids


def test_received_but_not_committed_is_taken_at_the_next_start(tmp_path: Path) -> None:
    """A crash between the 0x0000 and the commit leaves the instance in the spool: taken later."""
    inputs = write_synthetic(tmp_path / "scanner", 2)
    settings = agent_settings(tmp_path, **listener_overrides(free_port()))
    folder = settings.state_dir / "received" / "ae-CT%201"
    folder.mkdir(parents=True)
    for i, p in enumerate(inputs):
        shutil.copyfile(p, folder / f"{time.time_ns():020d}-{i:08d}.dcm")
    with running_daemon(settings) as daemon:
        assert wait_until(daemon.drained, timeout=60), daemon.outbox.counts()
        rows = daemon.outbox.rows("sent")
    assert {(r.source, r.calling_ae) for r in rows} == {("listener", "CT 1")}
    assert not list(folder.iterdir())
