"""Servers that misbehave as proxies, load balancers and overloaded archives do, scripted on
127.0.0.1 (``tests/_faultproxy.py``, in front of a real Orthanc where an answer is needed): each is
a failure of the destination, never of the rows; a reply that never completes is cut at its
deadline; a stall shows in ``/readyz`` and ``gateway-agent status``."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_agent._exceptions import RetryableUploadError
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations.deadline import WAITING, Deadlines
from gateway_agent.agent.upload.destinations.dicomweb import (
    DicomWebDestination,
    parse_stow_response,
)
from gateway_agent.agent.upload.stall import hint, misconfigured
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.cli import main
from gateway_agent.cli.agent_cmds import collect_status
from gateway_agent.config import DestinationSettings
from tests._faultproxy import FaultProxy
from tests._orthanc import OrthancServer

from ._agent_util import agent_settings, running_daemon, wait_until, write_synthetic
from ._uploadkit import add_files, hourly_passes, make_files, queued_outbox

NOWHERE = "http://127.0.0.1:9"  # the proxy's upstream when no action forwards anything


def _settings(url: str, **kw: Any) -> DestinationSettings:
    base: dict[str, Any] = {
        "kind": "dicomweb",
        "url": url,
        "batch_max_instances": 10,
        "parallel_requests": 1,
        "timeout_seconds": 5.0,
        "max_attempts": 3,
        "backoff_base_seconds": 1.0,
        "backoff_cap_seconds": 60.0,
    }
    base.update(kw)
    return DestinationSettings(**base)


def _claimed(tmp_path: Path, n: int) -> list[Any]:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", n))
    rows = ob.queue("default").claim(max_items=100, max_bytes=10**9, lease_seconds=60)
    ob.close()
    return rows


# -- deadlines -----------------------------------------------------------------------------------
def test_a_deadline_shuts_the_socket_of_a_blocked_read() -> None:
    deadlines = Deadlines()
    a, b = socket.socketpair()
    try:
        with deadlines.limit(0.2) as slot:
            deadlines.using(a, WAITING)
            assert a.recv(10) == b""  # returns once the watchdog shut the socket down
        assert slot.expired and slot.phase == WAITING and deadlines.fired == 1
        with deadlines.limit(5.0) as slot:  # a request that ends in time is left alone
            deadlines.using(a, WAITING)
        assert not slot.expired
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        # The deadline passes before the request touches a socket (while it connects, say):
        # the socket is cut as soon as it is used.
        with deadlines.limit(0.05) as slot:
            assert wait_until(lambda: slot.expired, 5.0, step=0.01)
            deadlines.using(a, WAITING)
            assert a.recv(10) == b""
    finally:
        deadlines.close()
        a.close()
        b.close()


@pytest.mark.orthanc
@pytest.mark.timeout(180)
def test_a_reply_dripping_one_byte_a_second_is_cut_at_its_deadline(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """httpx's read timeout restarts with every byte: without a deadline for the whole reply a
    worker would wait for the ~700 bytes of Orthanc's answer for over ten minutes."""
    rows = _claimed(tmp_path, 3)
    with FaultProxy(orthanc.base_url, plan=["drip:1"], default="ok") as proxy:
        dest = DicomWebDestination(
            proxy.url + "/dicom-web",
            auth=httpx.BasicAuth(*orthanc.auth),
            timeout=httpx.Timeout(2.0),
        )
        with pytest.raises(RetryableUploadError, match=r"no complete reply within 2 s"):
            dest.send(rows)
        # The storage check has the same deadline: a dripping QIDO-RS answer is cut too.
        assert len(dest.send(rows).sent) == 3
        proxy.set_plan(["drip:1"], default="ok")
        with pytest.raises(RetryableUploadError, match=r"deadline"):
            dest.confirm(rows)
        dest.close()


@pytest.mark.parametrize("action", ["blackhole", "noread"])
def test_a_server_that_never_answers_or_never_reads_is_an_outage(
    tmp_path: Path, action: str
) -> None:
    ob, clock, _ = queued_outbox(tmp_path / "f", 4)
    with FaultProxy(NOWHERE, default=action, rcvbuf=4096) as proxy:
        s = _settings(proxy.url + "/dicom-web", timeout_seconds=1.0)
        dest = DicomWebDestination(s.url or "", timeout=httpx.Timeout(1.0))
        up = Uploader(ob, dest, s, clock=clock, rng=random.Random(4))
        hourly_passes(up, clock, 4)
        dest.close()
    counts = ob.counts()
    assert counts["queued"] == 4 and counts["dead"] == 0 and counts["sending"] == 0, counts
    status = ob.queue("default").destination_status()
    assert status["consecutive_failures"] == 4 and status["last_error"].startswith("timeout")
    assert "does not answer in time" in (hint(status["last_error"]) or "")


# -- replies that are not a STOW-RS response -----------------------------------------------------
@pytest.mark.orthanc
@pytest.mark.parametrize(
    ("action", "reason"),
    [
        ("empty200", "http_200 not_a_stow_response: empty body"),
        ("html200", "http_200 not_a_stow_response: text/html"),
    ],
)
def test_a_reply_that_is_not_a_stow_response_is_a_destination_failure(
    tmp_path: Path, orthanc: OrthancServer, action: str, reason: str
) -> None:
    """An empty 200 or a captive portal's page: the circuit opens, one probe at a time, the
    rows keep their attempts, and nothing is killed; once the real server answers again,
    everything is delivered."""
    ob, clock, uids = queued_outbox(tmp_path / "f", 6)
    with FaultProxy(orthanc.base_url, default=action) as proxy:
        s = _settings(proxy.url + "/dicom-web")
        dest = DicomWebDestination(s.url or "", auth=httpx.BasicAuth(*orthanc.auth))
        up = Uploader(ob, dest, s, clock=clock, rng=random.Random(5))
        hourly_passes(up, clock, 10)
        counts = ob.counts()
        assert counts["queued"] == 6 and counts["dead"] == 0, counts
        assert max(r.attempts for r in ob.rows("queued")) <= 1
        status = ob.queue("default").destination_status()
        assert status["last_error"] == reason and status["consecutive_failures"] == 10
        assert "not a DICOMweb server" in (hint(reason) or "")
        assert proxy.count() == 10  # one probe per due time, never a request per row
        proxy.set_plan([], default="ok")
        assert up.loop_once() == 6 and up.loop_once() == 6  # delivered, then proven
        dest.close()
    assert ob.counts()["sent"] == 6 and ob.proof_summary()["pending"] == (0, 0)
    assert all(orthanc.lookup(u) for u in uids)


def test_404_to_every_request_is_a_misconfiguration_and_keeps_the_rows(tmp_path: Path) -> None:
    """A wrong URL (the DICOMweb root missing, a typo): back off like an outage, never use up
    the rows' attempts, say what to check."""
    ob, clock, _ = queued_outbox(tmp_path / "f", 5)
    with FaultProxy(NOWHERE, default="status:404") as proxy:
        s = _settings(proxy.url + "/not-dicom-web", max_attempts=1)
        dest = DicomWebDestination(s.url or "")
        up = Uploader(ob, dest, s, clock=clock, rng=random.Random(6))
        hourly_passes(up, clock, 8)
        dest.close()
        requests = proxy.count()
    counts = ob.counts()
    assert counts["queued"] == 5 and counts["dead"] == 0, counts
    assert max(r.attempts for r in ob.rows("queued")) == 0
    status = ob.queue("default").destination_status()
    assert status["last_error"] == "http_404 injected" and misconfigured(status)
    assert "check destination.url" in (hint(status["last_error"]) or "")
    assert requests == 8


def test_a_dicom_xml_stow_response_is_read(tmp_path: Path) -> None:
    """A server that answers DICOM XML although JSON was asked for: its per-instance results
    count as they would in JSON."""
    rows = _claimed(tmp_path, 3)
    ok, bad = rows[0].sop_instance_uid, rows[1].sop_instance_uid

    def item(uid: str, reason: int | None = None) -> str:
        extra = (
            f'<DicomAttribute tag="00081197" vr="US"><Value number="1">{reason}</Value>'
            "</DicomAttribute>"
            if reason is not None
            else ""
        )
        return (
            '<Item number="1"><DicomAttribute tag="00081155" vr="UI">'
            f'<Value number="1">{uid}</Value></DicomAttribute>{extra}</Item>'
        )

    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
        f'<DicomAttribute tag="00081199" vr="SQ">{item(ok)}</DicomAttribute>'
        f'<DicomAttribute tag="00081198" vr="SQ">{item(bad, 0xC000)}</DicomAttribute>'
        "</NativeDicomModel>"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(
            202, content=xml.encode(), headers={"Content-Type": "application/dicom+xml"}
        )

    dest = DicomWebDestination(
        "http://pacs.test/dicom-web", client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    result = dest.send(rows)
    assert result.sent == [ok]
    assert result.failed[bad] == (True, "http_202 failure_reason_0xc000")
    assert result.failed[rows[2].sop_instance_uid] == (False, "http_202 not_acknowledged")
    doctype = b'<!DOCTYPE x [<!ENTITY a "aaaa">]>' + xml.encode().split(b"?>", 1)[1]
    assert parse_stow_response(httpx.Response(200, content=doctype)) is None


def test_a_name_that_does_not_resolve_is_an_outage(tmp_path: Path) -> None:
    rows = _claimed(tmp_path, 1)
    with (
        DicomWebDestination("http://archive.invalid/dicom-web") as dest,
        pytest.raises(RetryableUploadError, match="network_error: ConnectError"),
    ):
        dest.send(rows)


# -- visible in /readyz and status ---------------------------------------------------------------
@pytest.mark.slow
def test_a_stalled_destination_turns_readyz_not_ready_and_status_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with FaultProxy(NOWHERE, default="blackhole") as proxy:
        settings = agent_settings(
            tmp_path,
            **{
                "destination.kind": "dicomweb",
                "destination.url": proxy.url + "/dicom-web",
                "destination.timeout_seconds": 1.0,
                "destination.backoff_base_seconds": 0.5,
                "destination.backoff_cap_seconds": 2.0,
                "metrics.enabled": True,
                "metrics.port": 0,
                "metrics.ready_upload_window_seconds": 3.0,
            },
        )
        write_synthetic(settings.inbox / "s", 3, seed="stall")
        with running_daemon(settings) as d:
            url = f"http://127.0.0.1:{d.service.port}/readyz"
            assert wait_until(lambda: httpx.get(url).status_code == 503, 60)
            body = httpx.get(url).json()
            counts = d.outbox.counts()
            st = collect_status(settings)
            capsys.readouterr()
            monkeypatch.setenv("GATEWAY_METRICS__READY_UPLOAD_WINDOW_SECONDS", "3")
            assert main(["status", "--state-dir", str(settings.state_dir)]) == 0
            out = capsys.readouterr().out
    assert body["status"] == "not ready"
    stalled = "destination:default: stalled: 3 row(s) waiting"
    assert [r for r in body["reasons"] if r.startswith(stalled)]
    assert "last error: timeout" in body["checks"]["destination:default"]["detail"]
    assert counts["dead"] == 0 and counts["sent"] == 0
    (dest,) = st["destinations"]
    assert dest["problems"][0].startswith("stalled: 3 row(s) waiting")
    assert "STALLED: 3 row(s) waiting" in out and "nothing delivered yet" in out
    assert "what to do: the server accepts connections but does not answer in time" in out


def test_readiness_reasons_are_a_list(tmp_path: Path) -> None:
    """Every failing check is one entry of ``reasons`` (other checks add theirs beside)."""
    from gateway_agent.agent.service.health import CheckResult, HealthServer

    server = HealthServer(
        checks={
            "a": lambda: CheckResult(False, "first"),
            "b": lambda: CheckResult(True, "fine"),
            "c": lambda: CheckResult(False, "second"),
        }
    )
    try:
        code, body = server.readiness()
    finally:
        server.stop()
    assert code == 503 and body["reasons"] == ["a: first", "c: second"]
    assert threading.active_count() >= 1
