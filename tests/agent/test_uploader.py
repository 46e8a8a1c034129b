"""The uploader against a real Orthanc (directly, down/up, wrong credentials, behind a fault proxy)
and, with a fake clock, the retry bookkeeping (attempts, age, auth back-off, shutdown)."""

from __future__ import annotations

import itertools
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from gateway_agent._exceptions import RetryableUploadError
from gateway_agent.agent import metrics
from gateway_agent.agent.outbox.db import OutboxRow
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations import SendResult
from gateway_agent.agent.upload.destinations.dicomweb import DicomWebDestination
from gateway_agent.agent.upload.destinations.folder import FolderDestination
from gateway_agent.agent.upload.outcomes import full_jitter
from gateway_agent.agent.upload.uploader import IDLE_MAX_SECONDS, Uploader
from gateway_agent.config import DestinationSettings
from tests._faultproxy import FaultProxy, seeded_plan
from tests._orthanc import OrthancServer

from ._uploadkit import CountingTransport, add_files, make_files, queued_outbox, wait_for


def _settings(url: str = "http://127.0.0.1:1/dicom-web", **kw: Any) -> DestinationSettings:
    base: dict[str, Any] = {
        "kind": "dicomweb",
        "url": url,
        "batch_max_instances": 10,
        "parallel_requests": 2,
        "timeout_seconds": 5.0,
        "backoff_base_seconds": 0.05,
        "backoff_cap_seconds": 0.5,
    }
    base.update(kw)
    return DestinationSettings(**base)


def _dicomweb(
    url: str, auth: tuple[str, str] | None, transport: httpx.BaseTransport | None = None, **kw: Any
) -> tuple[DicomWebDestination, httpx.Client]:
    client = httpx.Client(
        transport=transport or httpx.HTTPTransport(), timeout=kw.pop("timeout", 5.0)
    )
    dest = DicomWebDestination(
        url, client=client, auth=httpx.BasicAuth(*auth) if auth else None, **kw
    )
    return dest, client


def _drain(up: Uploader, outbox: Outbox, n: int, timeout: float = 45.0) -> dict[str, int]:
    wait_for(lambda: outbox.counts()["sent"] + outbox.counts()["dead"] >= n, timeout)
    return outbox.counts()


def _sample(counter: Any, **labels: str) -> float:
    return float((counter.labels(**labels) if labels else counter)._value.get())


# -- folder destination, one step at a time ------------------------------------------------------
def test_loop_once_drains_to_folder_and_counts_metrics(tmp_path: Path, outbox: Outbox) -> None:
    uids = add_files(outbox, make_files(tmp_path / "files", 12))
    dest = FolderDestination(tmp_path / "dest")
    up = Uploader(outbox, dest, _settings(kind="folder", batch_max_instances=5))
    sent_before = _sample(metrics.UPLOAD_ATTEMPTS, destination="default", result="sent")
    bytes_before = _sample(metrics.BYTES_SENT, destination="default")
    handled = [up.loop_once() for _ in range(5)]
    assert handled == [5, 5, 2, 12, 0]  # three batches, then their proof of storage (one page)
    assert outbox.counts() == {"queued": 0, "sending": 0, "sent": 12, "dead": 0}
    assert outbox.proof_summary()["pending"] == (0, 0)
    assert {p.stem for p in (tmp_path / "dest").rglob("*.dcm")} == set(uids)
    assert (
        _sample(metrics.UPLOAD_ATTEMPTS, destination="default", result="sent") - sent_before == 12
    )
    total = sum(r.size for r in outbox.rows("sent"))
    assert _sample(metrics.BYTES_SENT, destination="default") - bytes_before == total
    assert metrics.LAST_UPLOAD_SUCCESS.labels(destination="default")._value.get() > 0


def test_batch_respects_max_mb(tmp_path: Path, outbox: Outbox) -> None:
    paths = make_files(tmp_path / "files", 6)
    add_files(outbox, paths)
    size = paths[0].stat().st_size
    mb = (size * 2.5) / (1024 * 1024)
    up = Uploader(
        outbox, FolderDestination(tmp_path / "d"), _settings(kind="folder", batch_max_mb=mb)
    )
    assert [up.loop_once() for _ in range(5)] == [2, 2, 2, 6, 0]


def test_wake_picks_up_new_rows_without_polling(tmp_path: Path, outbox: Outbox) -> None:
    up = Uploader(outbox, FolderDestination(tmp_path / "d"), _settings(kind="folder"))
    up.start()
    try:
        time.sleep(0.2)  # workers are idle now, sleeping up to IDLE_MAX_SECONDS
        add_files(outbox, make_files(tmp_path / "files", 3))
        up.wake()
        # far less than the idle sleep: only the wake can have done it
        assert wait_for(lambda: outbox.counts()["sent"] == 3, IDLE_MAX_SECONDS / 3)
        assert up.alive()
    finally:
        up.stop(time.monotonic() + 5)
    assert not up.alive()


class _HeldFolder(FolderDestination):
    """A folder destination whose ``send`` waits until the test lets it go."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.go = threading.Event()

    def send(self, items: Any) -> SendResult:
        self.entered.set()
        self.go.wait(30)
        return super().send(items)


def test_a_worker_whose_request_outlives_the_stop_ends_quietly_when_the_outbox_closed(
    tmp_path: Path,
) -> None:
    """The agent's stop waits for a request until its deadline, releases the rows and closes
    the outbox; when that request returns, its worker ends without a word (no error, no
    traceback): the rows are sent again after the next start."""
    outbox = Outbox(tmp_path / "outbox.db")
    add_files(outbox, make_files(tmp_path / "files", 2))
    dest = _HeldFolder(tmp_path / "d")
    up = Uploader(outbox, dest, _settings(kind="folder", parallel_requests=1))
    with capture_logs() as logs:
        up.start()
        try:
            assert dest.entered.wait(30)
            up.stop(time.monotonic() + 0.1)
            (worker,) = up._threads  # still in its request
            outbox.close()
        finally:
            dest.go.set()
        worker.join(30)
    assert not worker.is_alive()
    loud = [e for e in logs if e["log_level"] in ("error", "critical", "exception")]
    assert loud == [], loud
    assert not [e for e in logs if "exc_info" in e], "a traceback was logged"
    reopened = Outbox(tmp_path / "outbox.db")
    try:
        assert reopened.counts()["queued"] == 2  # released at the stop, sent after a restart
    finally:
        reopened.close()


def test_a_worker_busy_when_the_stop_came_does_not_sleep_through_it(tmp_path: Path) -> None:
    """The stop wakes every worker: one that was between two waits (computing its next wait)
    when another took the wake still ends at once, not after its idle sleep (the stop would
    then wait its whole deadline, and the worker outlive it)."""
    outbox = Outbox(tmp_path / "outbox.db")
    add_files(outbox, make_files(tmp_path / "files", 1))
    q = outbox.queue("default")
    q.mark_retry([r.id for r in q.claim(max_items=1, max_bytes=10**9, lease_seconds=60)],
                 error="busy", delay=10_000)  # fmt: skip
    trap, release, trapped = threading.Event(), threading.Event(), threading.Event()
    caught: list[str] = []

    def clock() -> float:  # the worker that reads it first after ``trap`` waits for ``release``
        if trap.is_set() and not trapped.is_set():
            trapped.set()
            caught.append(threading.current_thread().name)
            release.wait(60)
        return time.time()

    up = Uploader(outbox, FolderDestination(tmp_path / "d"), _settings(kind="folder"), clock=clock)
    up.start()
    stopper: threading.Thread | None = None
    try:
        time.sleep(0.3)  # both workers idle, their next wait up to IDLE_MAX_SECONDS
        trap.set()
        up.wake()
        assert trapped.wait(30)
        others = [t for t in up._threads if t.name not in caught]
        time.sleep(0.3)  # the other worker is back in its idle wait
        stopper = threading.Thread(target=up.stop, args=(time.monotonic() + IDLE_MAX_SECONDS / 2,))
        stopper.start()
        for t in others:
            t.join(30)
            assert not t.is_alive()
    finally:
        release.set()
    assert stopper is not None
    stopper.join(IDLE_MAX_SECONDS)
    assert not up.alive() and up._threads == [], "a worker slept through the stop"
    outbox.close()


# -- real Orthanc --------------------------------------------------------------------------------
@pytest.mark.orthanc
def test_series_arrives_in_orthanc_and_duplicates_are_fine(
    orthanc: OrthancServer, tmp_path: Path, outbox: Outbox
) -> None:
    paths = make_files(tmp_path / "files", 30)
    uids = add_files(outbox, paths)
    dest, client = _dicomweb(orthanc.dicomweb_url, orthanc.auth)
    up = Uploader(outbox, dest, _settings(orthanc.dicomweb_url), rng=random.Random(1))
    up.start()
    try:
        assert _drain(up, outbox, 30)["sent"] == 30
    finally:
        up.stop(time.monotonic() + 5)
    assert all(orthanc.lookup(u) for u in uids)
    # The same instances again (a re-processed backlog): acknowledged, not duplicated.
    again = Outbox(tmp_path / "again.db")
    add_files(again, paths)
    up2 = Uploader(again, dest, _settings(orthanc.dicomweb_url))
    while up2.loop_once():
        pass
    assert again.counts()["sent"] == 30
    assert sorted(orthanc.sop_uids()) == sorted(uids)
    again.close()
    client.close()


@pytest.mark.orthanc
def test_wrong_credentials_wait_then_fixed_credentials_deliver(
    orthanc: OrthancServer, tmp_path: Path, outbox: Outbox
) -> None:
    uids = add_files(outbox, make_files(tmp_path / "files", 20))
    transport = CountingTransport()
    bad, bad_client = _dicomweb(orthanc.dicomweb_url, ("edge", "wrong-password"), transport)
    settings = _settings(orthanc.dicomweb_url, max_attempts=2)
    up = Uploader(outbox, bad, settings, rng=random.Random(2))
    with capture_logs() as logs:
        up.start()
        try:
            assert wait_for(
                lambda: outbox.queue("default").destination_status()["auth_failing"], 10
            )
            time.sleep(1.5)
        finally:
            up.stop(time.monotonic() + 5)
    status = outbox.queue("default").destination_status()
    assert status["auth_failing"] and status["last_error"].startswith("http_401")
    counts = outbox.counts()
    assert counts["dead"] == 0 and counts["queued"] == 20  # waiting, not dead
    # No tight loop: one probe at a time with backoff, attempts not burnt per probe.
    assert transport.posts() <= 30
    assert max(r.attempts for r in outbox.rows("queued")) <= 1 < settings.max_attempts + 1
    assert orthanc.count_instances() == 0
    text = repr(logs)
    assert "wrong-password" not in text and "edge-secret" not in text
    bad_client.close()
    # Fix the credentials; `gateway-agent retry` makes the waiting rows due at once.
    assert outbox.retry_now() == 20 or outbox.counts()["queued"] == 20
    good, good_client = _dicomweb(orthanc.dicomweb_url, orthanc.auth)
    up2 = Uploader(outbox, good, settings, rng=random.Random(3))
    up2.start()
    try:
        assert _drain(up2, outbox, 20)["sent"] == 20
    finally:
        up2.stop(time.monotonic() + 5)
    assert not outbox.queue("default").destination_status()["auth_failing"]
    assert sorted(orthanc.sop_uids()) == sorted(uids)
    good_client.close()


@pytest.mark.orthanc
@pytest.mark.slow
def test_orthanc_down_at_start_then_up_everything_arrives_at_bounded_rate(
    orthanc: OrthancServer, tmp_path: Path, outbox: Outbox
) -> None:
    uids = add_files(outbox, make_files(tmp_path / "files", 40))
    orthanc.stop()
    transport = CountingTransport()
    dest, client = _dicomweb(orthanc.dicomweb_url, orthanc.auth, transport)
    settings = _settings(orthanc.dicomweb_url, parallel_requests=4)
    up = Uploader(outbox, dest, settings, rng=random.Random(4))
    up.start()
    try:
        assert wait_for(
            lambda: outbox.queue("default").destination_status()["consecutive_failures"] >= 3, 10
        )
        time.sleep(1.5)
        outage = list(transport.spans)
        orthanc.start()
        assert _drain(up, outbox, 40)["sent"] == 40
    finally:
        up.stop(time.monotonic() + 5)
    assert sorted(orthanc.sop_uids()) == sorted(uids)
    # While down: requests were serialised (one probe at a time after the first failure; only
    # requests the other workers had claimed before it was recorded may overlap) ...
    first_fail_end = min(end for _, end in outage)
    probes = sorted(s for s in outage if s[0] >= first_fail_end)
    overlaps = sum(1 for a, b in itertools.pairwise(probes) if a[1] > b[0])
    assert overlaps <= settings.parallel_requests - 1
    assert len(probes) >= 3
    # ... and few: 4 workers without a circuit would have made thousands of attempts.
    assert len(outage) <= 40
    # rows did not each burn attempts during the outage
    assert max(r.attempts for r in outbox.rows("sent")) <= 2
    client.close()


# -- behind the fault proxy --------------------------------------------------------------------
@pytest.fixture
def proxy(orthanc: OrthancServer) -> Iterator[FaultProxy]:
    with FaultProxy(orthanc.base_url) as p:
        yield p


def _via_proxy(
    proxy: FaultProxy, orthanc: OrthancServer, **kw: Any
) -> tuple[DicomWebDestination, httpx.Client]:
    return _dicomweb(proxy.url + "/dicom-web", orthanc.auth, **kw)


def _step_until_done(up: Uploader, outbox: Outbox, n: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while outbox.counts()["sent"] < n and time.monotonic() < end:
        if not up.loop_once():
            time.sleep(0.02)


@pytest.mark.orthanc
def test_503_with_retry_after_is_honoured(
    orthanc: OrthancServer, proxy: FaultProxy, tmp_path: Path, outbox: Outbox
) -> None:
    uids = add_files(outbox, make_files(tmp_path / "files", 5))
    proxy.set_plan(["503:1"])
    dest, client = _via_proxy(proxy, orthanc)
    up = Uploader(outbox, dest, _settings(proxy.url))
    assert up.loop_once() == 5
    status = outbox.queue("default").destination_status()
    assert status["last_error"] == "http_503 service_unavailable"
    assert status["blocked_until"] - status["last_error_at"] == pytest.approx(1.0)
    row = outbox.rows("queued")[0]
    assert row.next_attempt_at == pytest.approx(status["blocked_until"])
    assert up.loop_once() == 0  # blocked: no request
    assert proxy.count() == 1
    _step_until_done(up, outbox, 5)
    assert sum(1 for r in proxy.requests if r.method == "POST") == 2  # and the storage check
    assert sorted(orthanc.sop_uids()) == sorted(uids)
    client.close()


@pytest.mark.orthanc
@pytest.mark.parametrize("fault", ["reset", "drop", "lost-reply", "delay:2"])
def test_faults_deliver_exactly_once(
    orthanc: OrthancServer, proxy: FaultProxy, tmp_path: Path, outbox: Outbox, fault: str
) -> None:
    uids = add_files(outbox, make_files(tmp_path / "files", 8))
    proxy.set_plan([fault, fault])
    dest, client = _via_proxy(proxy, orthanc, timeout=1.0)
    up = Uploader(outbox, dest, _settings(proxy.url, timeout_seconds=1.0), rng=random.Random(5))
    _step_until_done(up, outbox, 8)
    assert outbox.counts()["sent"] == 8
    assert outbox.queue("default").destination_status()["consecutive_failures"] == 0
    if fault.startswith("delay"):
        wait_for(lambda: orthanc.count_instances() == 8, 5)  # the stalled copy lands later
    stored = orthanc.sop_uids()
    assert sorted(stored) == sorted(uids)  # every instance, each exactly once
    assert proxy.count(fault) >= 1
    client.close()


@pytest.mark.orthanc
@pytest.mark.slow
def test_seeded_random_faults_with_workers(
    orthanc: OrthancServer, proxy: FaultProxy, tmp_path: Path, outbox: Outbox
) -> None:
    uids = add_files(outbox, make_files(tmp_path / "files", 60))
    weights = {
        "ok": 5,
        "503:0": 1,
        "reset": 1,
        "drop": 1,
        "lost-reply": 1,
        "401": 1,
        "status:500": 1,
    }
    proxy.set_plan(seeded_plan(1234, 40, weights))
    dest, client = _via_proxy(proxy, orthanc, timeout=2.0)
    up = Uploader(outbox, dest, _settings(proxy.url, batch_max_instances=5), rng=random.Random(6))
    up.start()
    try:
        counts = _drain(up, outbox, 60)
    finally:
        up.stop(time.monotonic() + 5)
    assert counts == {"queued": 0, "sending": 0, "sent": 60, "dead": 0}
    assert sorted(orthanc.sop_uids()) == sorted(uids)
    client.close()


# -- bookkeeping with a fake clock and MockTransport -------------------------------------------
def _mock_dest(handler: Any) -> DicomWebDestination:
    return DicomWebDestination(
        "http://pacs.test/dicom-web", client=httpx.Client(transport=httpx.MockTransport(handler))
    )


def test_outage_kills_rows_only_by_age(tmp_path: Path) -> None:
    ob, clock, _ = queued_outbox(tmp_path / "f", 3)
    calls: list[int] = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503)

    s = _settings(max_attempts=2, max_age_hours=1.0, backoff_cap_seconds=60)
    up = Uploader(ob, _mock_dest(down), s, clock=clock, rng=random.Random(7))
    for _ in range(20):  # far more probes than max_attempts
        up.loop_once()
        clock.advance(61)
    assert ob.counts()["queued"] == 3 and ob.counts()["dead"] == 0
    assert max(r.attempts for r in ob.rows("queued")) == 1
    assert len(calls) == 20
    clock.advance(3600)
    up.loop_once()
    dead = ob.rows("dead")
    assert len(dead) == 3 and dead[0].last_error == "gave_up: http_503 service_unavailable"


def test_auth_failure_backs_off_and_never_kills_quickly(tmp_path: Path) -> None:
    ob, clock, _ = queued_outbox(tmp_path / "f", 2)
    up = Uploader(
        ob,
        _mock_dest(lambda r: httpx.Response(401)),
        _settings(max_attempts=1, backoff_base_seconds=1, backoff_cap_seconds=100),
        clock=clock,
        rng=random.Random(8),
    )
    waits = []
    for _ in range(12):
        up.loop_once()
        st = ob.queue("default").destination_status()
        waits.append(st["blocked_until"] - clock.now)
        clock.advance(waits[-1])
    assert ob.counts()["dead"] == 0
    st = ob.queue("default").destination_status()
    assert st["auth_failing"] and st["consecutive_failures"] == 12
    assert all(0 <= w <= 100 for w in waits) and sum(waits) > 100  # grows towards the cap


def test_per_instance_transient_failure_exhausts_attempts(tmp_path: Path) -> None:
    ob, clock, (uid,) = queued_outbox(tmp_path / "f", 1)
    body = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": [uid]},
                    "00081197": {"vr": "US", "Value": [0xA700]},
                }
            ],
        }
    }
    up = Uploader(
        ob,
        _mock_dest(lambda r: httpx.Response(200, json=body)),
        _settings(max_attempts=3),
        clock=clock,
    )
    for _ in range(3):
        assert up.loop_once() == 1
        clock.advance(1000)
    (dead,) = ob.rows("dead")
    assert (
        dead.attempts == 3
        and dead.last_error == "gave_up after 3 attempts: http_200 failure_reason_0xa700"
    )
    assert (
        ob.queue("default").destination_status()["consecutive_failures"] == 0
    )  # the server was fine


def test_permanent_request_error_goes_dead_with_reason(tmp_path: Path) -> None:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", 3))
    up = Uploader(ob, _mock_dest(lambda r: httpx.Response(415)), _settings())
    dead_before = _sample(metrics.UPLOAD_ATTEMPTS, destination="default", result="dead")
    assert up.loop_once() == 3
    assert [r.last_error for r in ob.rows("dead")] == ["http_415 unsupported_media_type"] * 3
    assert _sample(metrics.UPLOAD_ATTEMPTS, destination="default", result="dead") - dead_before == 3
    assert ob.retry_dead() == 3  # `gateway-agent retry`


class _Blocking:
    """A destination whose send blocks until released (to test shutdown with requests in flight)."""

    label = "blocking"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, items: Any) -> SendResult:
        self.entered.set()
        self.release.wait(10)
        raise RetryableUploadError("network_error: gone")

    def close(self) -> None:
        pass


def test_stop_releases_rows_still_in_flight(tmp_path: Path, outbox: Outbox) -> None:
    add_files(outbox, make_files(tmp_path / "f", 4))
    dest = _Blocking()
    up = Uploader(outbox, dest, _settings(parallel_requests=1))
    up.start()
    assert dest.entered.wait(10)
    up.stop(time.monotonic() + 0.2)
    rows = outbox.rows("queued")
    assert len(rows) == 4 and all(r.attempts == 0 for r in rows)
    dest.release.set()


class _Broken:
    label = "broken"

    def send(self, items: Any) -> SendResult:
        raise RuntimeError("bug")

    def close(self) -> None:
        pass


def test_unexpected_error_retries_rows_and_keeps_worker(tmp_path: Path, outbox: Outbox) -> None:
    add_files(outbox, make_files(tmp_path / "f", 2))
    up = Uploader(outbox, _Broken(), _settings())
    assert up.loop_once() == 2
    rows = outbox.rows("queued")
    assert len(rows) == 2 and rows[0].last_error == "internal_error: RuntimeError"


def test_full_jitter_is_bounded() -> None:
    rng = random.Random(9)
    for attempt in range(0, 80):
        d = full_jitter(rng, attempt, 0.5, 30.0)
        assert 0.0 <= d <= min(30.0, 0.5 * 2**attempt)


def test_claimed_rows_are_sent_even_if_released_meanwhile(outbox: Outbox, tmp_path: Path) -> None:
    add_files(outbox, make_files(tmp_path / "f", 1))
    (row,) = outbox.queue("default").claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    outbox.queue("default").release([row.id])
    outbox.queue("default").mark_sent([row.id])  # the destination's acknowledgement is a fact
    sent: list[OutboxRow] = outbox.rows("sent")
    assert [r.id for r in sent] == [row.id]


def test_a_probe_whose_claim_fails_frees_the_circuit_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage, the one probe that fails to claim (database locked, disk full) must hand
    the probe back, not hold it for its lease while every worker waits."""
    ob, clock, _ = queued_outbox(tmp_path / "f", 2)
    up = Uploader(
        ob,
        _mock_dest(lambda request: httpx.Response(503)),
        _settings(backoff_cap_seconds=60),
        clock=clock,
        rng=random.Random(3),
    )
    up.loop_once()  # the outage is detected: the circuit opens
    clock.advance(61)  # past the backoff: the next worker becomes the probe
    real_claim = up.outbox.claim

    def locked(**kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(up.outbox, "claim", locked)
    with pytest.raises(sqlite3.OperationalError):
        up.loop_once()
    monkeypatch.setattr(up.outbox, "claim", real_claim)
    wait, probing = ob.queue("default").circuit_acquire(probe_lease=300)
    assert (wait, probing) == (0, True)  # the next worker probes now, not in 300 s
    assert ob.counts()["queued"] == 2  # nothing was claimed, nothing lost
