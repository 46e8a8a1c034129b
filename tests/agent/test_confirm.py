"""Storage proven before a local copy goes: QIDO-RS against a real Orthanc (with a Lua filter that
acknowledges and stores nothing), batched look-ups, servers without UID lists or without QIDO,
the folder's read-back, retention of proven copies only, and the upgrade of an older outbox."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.schema import OutboxSchemaError
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations import (
    NOT_STORED_MAX_ATTEMPTS,
    destination_from_settings,
)
from gateway_agent.agent.upload.destinations.dicomweb import QIDO_PAGE, DicomWebDestination
from gateway_agent.agent.upload.destinations.folder import FolderDestination
from gateway_agent.agent.upload.stall import (
    destination_problems,
    hint,
    misconfigured,
    proof_refused,
)
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.config import DestinationSettings
from tests._orthanc import OrthancServer, start_orthanc

from ._uploadkit import (
    CountingTransport,
    FakeClock,
    add_files,
    hourly_passes,
    make_files,
    queued_outbox,
)

DROP_ALL = "function ReceivedInstanceFilter(dicom, origin, info)\n  return false\nend\n"


def _stow_json(uids: list[str]) -> dict[str, Any]:
    return {
        "00081198": {"vr": "SQ"},
        "00081199": {
            "vr": "SQ",
            "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids],
        },
    }


def _posted_uids(request: httpx.Request) -> list[str]:
    from io import BytesIO

    from pydicom import dcmread

    boundary = request.headers["content-type"].rsplit("boundary=", 1)[1].encode()
    uids = []
    for part in request.read().split(b"--" + boundary)[1:-1]:
        payload = part.split(b"\r\n\r\n", 1)[1][:-2]
        uids.append(str(dcmread(BytesIO(payload), stop_before_pixels=True).SOPInstanceUID))
    return uids


def _qido_json(uids: list[str]) -> list[dict[str, Any]]:
    return [{"00080018": {"vr": "UI", "Value": [u]}} for u in uids]


def _asked(request: httpx.Request) -> list[str]:
    return parse_qs(urlsplit(str(request.url)).query)["SOPInstanceUID"][0].split(",")


class Archive:
    """A scripted DICOMweb server for httpx.MockTransport: STOW acknowledges every part; QIDO
    answers from ``stored`` (``lists``: whether a UID list is matched, else nothing matches)."""

    def __init__(self, *, store: bool = True, lists: bool = True, qido_status: int = 200) -> None:
        self.store = store
        self.lists = lists
        self.qido_status = qido_status
        self.stored: set[str] = set()
        self.gets: list[list[str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            uids = _posted_uids(request)
            if self.store:
                self.stored.update(uids)
            return httpx.Response(200, json=_stow_json(uids))
        if request.url.path.endswith("/studies"):
            return httpx.Response(404 if self.qido_status == 404 else 200, json=[])
        asked = _asked(request)
        self.gets.append(asked)
        if self.qido_status != 200:
            return httpx.Response(self.qido_status)
        if len(asked) > 1 and not self.lists:
            return httpx.Response(200, json=[])
        return httpx.Response(200, json=_qido_json([u for u in asked if u in self.stored]))


def _mock_dest(archive: Archive, **kw: Any) -> DicomWebDestination:
    client = httpx.Client(transport=httpx.MockTransport(archive))
    return DicomWebDestination("http://pacs.test/dicom-web", client=client, **kw)


def _settings(url: str = "http://pacs.test/dicom-web", **kw: Any) -> DestinationSettings:
    base: dict[str, Any] = {
        "kind": "dicomweb",
        "url": url,
        "batch_max_instances": 25,
        "parallel_requests": 1,
        "backoff_base_seconds": 1.0,
        "backoff_cap_seconds": 60.0,
    }
    base.update(kw)
    return DestinationSettings(**base)


# -- a real lying archive ----------------------------------------------------------------------
@pytest.mark.orthanc
def test_an_archive_that_acknowledges_and_stores_nothing_loses_nothing_by_default(
    tmp_path: Path,
) -> None:
    """Orthanc with a filter dropping every instance answers STOW-RS 200 for all of them. With
    the default settings no row is `sent`, no outbox file is removed by retention, and after a
    few attempts the rows are `dead` with `not_stored_after_ack`, which `status` explains."""
    lua = tmp_path / "drop.lua"
    lua.write_text(DROP_ALL)
    server = start_orthanc(extra_config={"LuaScripts": [str(lua)]})
    clock = FakeClock()
    ob = Outbox(tmp_path / "outbox.db", clock=clock)
    try:
        files = make_files(tmp_path / "files", 20)
        add_files(ob, files)
        settings = _settings(
            server.dicomweb_url,
            auth="basic",
            username=server.auth[0],
            password=SecretStr(server.auth[1]),
        )
        dest = destination_from_settings(settings)  # default settings: confirm_storage on
        up = Uploader(ob, dest, settings, clock=clock, rng=random.Random(1))
        hourly_passes(up, clock, 2 * NOT_STORED_MAX_ATTEMPTS + 2)  # send, prove, send again, ...
        dest.close()
        counts = ob.counts()
        assert counts["sent"] == 0 and counts["dead"] == 20, counts
        assert {r.last_error for r in ob.rows("dead")} == {"not_stored_after_ack"}
        assert {r.attempts for r in ob.rows("dead")} == {NOT_STORED_MAX_ATTEMPTS}
        assert ob.purge_sent_files(0) == 0 and all(p.exists() for p in files)
        assert server.count_instances() == 0
        status = ob.queue("default").destination_status()
        assert status["last_error"].startswith("not_stored_after_ack")
        assert status["last_success_at"] is None  # nothing was delivered
        assert "does not hold" in (hint(status["last_error"]) or "")
    finally:
        ob.close()
        server.close()


@pytest.mark.orthanc
def test_look_ups_are_batched_per_study(tmp_path: Path, orthanc: OrthancServer) -> None:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "a", 25, seed="study-a"))
    add_files(ob, make_files(tmp_path / "b", 5, seed="study-b"))
    transport = CountingTransport()
    client = httpx.Client(transport=transport, timeout=30)
    dest = DicomWebDestination(
        orthanc.dicomweb_url, client=client, auth=httpx.BasicAuth(*orthanc.auth)
    )
    up = Uploader(ob, dest, _settings(orthanc.dicomweb_url, batch_max_instances=30))
    assert up.loop_once() == 30  # sent: acknowledged, proof pending
    assert ob.proof_summary()["pending"][0] == 30
    assert not [m for _t, m, _p in transport.requests if m == "GET"]  # not on the upload path
    assert up.loop_once() == 30  # nothing left to send: prove
    gets = [path for _t, method, path in transport.requests if method == "GET"]
    assert len(gets) == 2 and all(p.endswith("/instances") for p in gets)  # one per study
    assert transport.posts() == 1
    assert ob.proof_summary() == {"pending": (0, 0), "unproven": (0, 0)}
    assert ob.purge_sent_files(0) == 30
    client.close()


def test_an_instance_found_on_a_later_attempt_is_sent(tmp_path: Path) -> None:
    """An archive that indexes late: not found after the first acknowledgement, sent again
    after the retry delay, found, `sent` and proven."""
    ob, clock, (uid,) = queued_outbox(tmp_path / "f", 1)
    archive = Archive(store=False)
    up = Uploader(ob, _mock_dest(archive), _settings(), clock=clock, rng=random.Random(2))
    assert up.loop_once() == 1  # sent
    assert up.loop_once() == 1  # proof: not found
    (row,) = ob.rows("queued")
    assert row.last_error == "not_stored_after_ack" and row.next_attempt_at - clock.now >= 30
    archive.stored.add(uid)  # the archive has caught up
    assert up.loop_once() == 0  # not due yet
    clock.advance(61)
    assert up.loop_once() == 1 and up.loop_once() == 1  # sent again, then proven
    assert ob.counts()["sent"] == 1 and ob.proof_summary()["pending"] == (0, 0)
    assert ob.queue("default").destination_status()["last_success_at"] == clock.now


def test_a_server_without_uid_list_matching_is_asked_one_by_one(tmp_path: Path) -> None:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", 5))
    rows = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    archive = Archive(lists=False)
    dest = _mock_dest(archive)
    assert len(dest.send(rows).sent) == 5
    assert dest.confirm(rows) == {r.sop_instance_uid for r in rows}
    assert [len(g) for g in archive.gets] == [5, 1, 1, 1, 1, 1]
    assert dest.uid_lists is False
    archive.gets.clear()
    assert dest.confirm(rows) == {r.sop_instance_uid for r in rows}
    assert [len(g) for g in archive.gets] == [1] * 5  # learned: no list query any more


def test_pages_of_uids(tmp_path: Path) -> None:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", QIDO_PAGE + 3))
    rows = ob.queue("default").claim(max_items=100, max_bytes=10**9, lease_seconds=60)
    archive = Archive()
    dest = _mock_dest(archive)
    dest.send(rows)
    assert len(dest.confirm(rows) or ()) == QIDO_PAGE + 3
    assert [len(g) for g in archive.gets] == [QIDO_PAGE, 3]


def test_no_qido_at_the_url_keeps_the_copies_and_says_why(tmp_path: Path) -> None:
    """A STOW-only endpoint: storage cannot be proven as the server is set up. Uploads go on,
    the local copies stay, the check backs off, and `status` and /readyz say what to do."""
    ob, clock, _ = queued_outbox(tmp_path / "f", 3)
    archive = Archive(qido_status=404)
    up = Uploader(ob, _mock_dest(archive), _settings(), clock=clock, rng=random.Random(3))
    hourly_passes(up, clock, 6)
    assert ob.counts()["sent"] == 3 and ob.counts()["dead"] == 0
    assert ob.proof_summary()["pending"][0] == 3 and ob.purge_sent_files(0) == 0
    assert len(archive.gets) == 1  # the next check waits for its backoff
    status = ob.queue("default").destination_status()
    assert status["last_error"].startswith("storage_check http_404 no_qido")
    assert status["consecutive_failures"] == 0  # uploads are not blocked
    assert proof_refused(status) and not misconfigured(status)
    assert "confirm_storage = false" in (hint(status["last_error"]) or "")
    problems = destination_problems(
        status, waiting=0, oldest_waiting=10.0, now=clock.now, window=300.0
    )
    assert problems[0].startswith("storage cannot be proven: storage_check http_404")


def test_a_404_for_an_unknown_study_means_not_stored(tmp_path: Path) -> None:
    """Some servers answer 404 for a study they do not hold; QIDO-RS itself answers, so the
    instance is simply not there."""
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", 2))
    rows = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=60)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json=_stow_json(_posted_uids(request)))
        if request.url.path.endswith("/studies"):
            return httpx.Response(200, json=[])
        return httpx.Response(404)

    dest = DicomWebDestination(
        "http://pacs.test/dicom-web", client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    assert len(dest.send(rows).sent) == 2
    assert dest.confirm(rows) == set()


# -- the folder --------------------------------------------------------------------------------
def test_folder_reads_back_what_it_wrote_before_acknowledging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proof is made at write time, so a consumer taking files from the folder later never
    makes the agent send them again; a share that keeps less than was written is caught."""
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", 3))
    rows = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    dest = FolderDestination(tmp_path / "dest")
    assert len(dest.send(rows).sent) == 3
    dest.target(rows[0]).unlink()  # a consumer of the folder took it
    assert dest.confirm(rows) == {r.sop_instance_uid for r in rows}

    real_replace = Path.replace
    short = rows[1].sop_instance_uid

    def lossy_replace(self: Path, target: Any) -> Any:  # a share that keeps half of one file
        if short in str(target):
            with self.open("r+b") as fh:
                fh.truncate(100)
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", lossy_replace)
    result = FolderDestination(tmp_path / "dest2").send(rows)
    assert result.failed == {short: (False, "folder_readback_mismatch")}
    assert sorted(result.sent) == sorted(
        r.sop_instance_uid for r in rows if r.sop_instance_uid != short
    )


# -- retention ---------------------------------------------------------------------------------
def test_retention_removes_proven_copies_only(tmp_path: Path) -> None:
    ob = Outbox(":memory:")
    files = make_files(tmp_path / "f", 4)
    add_files(ob, files)
    rows = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    ob.queue("default").mark_sent([r.id for r in rows])  # acknowledged: proof pending
    ob.queue("default").mark_proven([rows[0].id, rows[1].id])
    ob.queue("default").mark_proven(
        [rows[3].id], proven=False
    )  # a destination that cannot prove it
    assert ob.proof_summary() == {
        "pending": (1, rows[2].size),
        "unproven": (1, rows[3].size),
    }
    assert ob.purge_sent_files(0) == 2
    assert [p.exists() for p in (r.path for r in rows)] == [False, False, True, True]
    assert ob.purge_sent_files(0, unconfirmed=True) == 1  # disk.keep_unconfirmed = false
    assert rows[2].path.exists()  # a pending proof is never purged
    ob.queue("default").mark_proven([rows[2].id])
    assert ob.purge_sent_files(0) == 1
    assert ob.proof_summary() == {"pending": (0, 0), "unproven": (0, 0)}


def test_an_older_outbox_gets_the_column_and_its_sent_rows_await_proof(
    tmp_path: Path,
) -> None:
    """A schema-2 outbox written before deliveries had their proof of storage (``confirmed``):
    the column is added at the next open, its sent deliveries await proof, their files kept."""
    db = tmp_path / "outbox.db"
    ob = Outbox(db)
    (path,) = make_files(tmp_path / "f", 1)
    add_files(ob, [path])
    (row,) = ob.queue("default").claim(max_items=1, max_bytes=10**9, lease_seconds=60)
    ob.queue("default").mark_sent([row.id])
    ob.queue("default").mark_proven([row.id])
    ob.close()
    con = sqlite3.connect(db)  # what such a database looks like: no "confirmed" column
    con.execute("drop index deliveries_proof")
    con.execute("drop index deliveries_kept")
    con.execute("alter table deliveries drop column confirmed")
    con.commit()
    con.close()
    with pytest.raises(OutboxSchemaError, match="restart it"):  # status, before the restart
        Outbox(db, read_only=True)
    ob = Outbox(db)
    try:
        assert ob.proof_summary()["pending"] == (1, row.size)  # the uploader will ask
        assert ob.queue("default").awaiting_proof(10)[0].id == row.id
        assert ob.purge_sent_files(0) == 0 and path.exists()
    finally:
        ob.close()


def test_a_file_goes_only_when_every_destination_proved_it_holds_the_instance(
    tmp_path: Path,
) -> None:
    """The proof is per delivery: one destination's proof does not vouch for another's copy; a
    destination that cannot prove storage keeps the file (unless told otherwise)."""
    ob = Outbox(tmp_path / "outbox.db", routes=[Route("pacs"), Route("archive")])
    try:
        (path,) = make_files(tmp_path / "f", 1)
        add_files(ob, [path])
        pacs, archive = ob.queue("pacs"), ob.queue("archive")
        for q in (pacs, archive):
            q.mark_sent([r.id for r in q.claim(max_items=1, max_bytes=10**9, lease_seconds=60)])
        (row,) = pacs.rows("sent")
        assert [r.id for r in archive.awaiting_proof(10)] == [row.id]
        pacs.mark_proven([row.id])
        assert ob.proof_summary("pacs")["pending"] == (0, 0)
        assert ob.proof_summary("archive")["pending"] == (1, row.size)
        assert archive.destination_status()["awaiting_proof"] == 1
        assert pacs.destination_status()["awaiting_proof"] == 0
        assert ob.purge_sent_files(0) == 0 and path.exists()  # the archive has not proven it
        archive.mark_proven([row.id], proven=False)  # it cannot: kept by default
        assert ob.purge_sent_files(0) == 0 and path.exists()
        assert ob.purge_sent_files(0, unconfirmed=True) == 1 and not path.exists()
    finally:
        ob.close()


def test_rows_sent_without_proof_are_proven_or_sent_again(tmp_path: Path) -> None:
    """Rows an earlier version sent (never proven): the uploader asks the destination; those it
    holds may go, the one it does not hold is sent again."""
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", 3))
    rows = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    archive = Archive()
    archive.stored.update(r.sop_instance_uid for r in rows[:2])  # the third is not there
    ob.queue("default").mark_sent([r.id for r in rows])
    up = Uploader(ob, _mock_dest(archive), _settings())
    assert up.loop_once() == 3
    assert ob.counts()["sent"] == 2 and ob.rows("queued")[0].id == rows[2].id
    assert ob.purge_sent_files(0) == 2 and rows[2].path.exists()


# -- DICOM: C-FIND -----------------------------------------------------------------------------
def _dicom_settings(port: int, called_ae: str, **kw: Any) -> DestinationSettings:
    base: dict[str, Any] = {
        "kind": "dicom",
        "host": "127.0.0.1",
        "port": port,
        "called_ae": called_ae,
        "calling_ae": "EDGE01",
        "batch_max_instances": 25,
        "parallel_requests": 1,
        "timeout_seconds": 10.0,
        "backoff_base_seconds": 1.0,
        "backoff_cap_seconds": 60.0,
    }
    base.update(kw)
    return DestinationSettings(**base)


@pytest.mark.orthanc
@pytest.mark.parametrize("lies", [False, True])
def test_c_store_is_proven_with_c_find(tmp_path: Path, lies: bool) -> None:
    """A PACS over DICOM: what C-FIND lists is proven (one query per series and page of UIDs);
    a PACS that answers C-STORE with success and stores nothing (a Lua filter) loses nothing:
    its rows end `dead` with `not_stored_after_ack`, every outbox file kept."""
    extra: dict[str, Any] = {}
    if lies:
        lua = tmp_path / "drop.lua"
        lua.write_text(DROP_ALL)
        extra = {"LuaScripts": [str(lua)]}
    # Written before the clock starts: sent after the files were written, however long 48 files
    # take on a loaded machine (retention keeps a file written later than its row was sent).
    files = make_files(tmp_path / "a", 45, seed="study-a") + make_files(tmp_path / "b", 3)
    server = start_orthanc(
        dicom=True, dicom_peers={"EDGE01": ("127.0.0.1", 11112)}, extra_config=extra
    )
    clock = FakeClock(time.time())
    ob = Outbox(tmp_path / "outbox.db", clock=clock)
    try:
        uids = add_files(ob, files)
        settings = _dicom_settings(
            server.dicom_port, server.dicom_aet, batch_max_instances=50, timeout_seconds=30.0
        )
        dest = destination_from_settings(settings, calling_ae="EDGE01")
        up = Uploader(ob, dest, settings, clock=clock, rng=random.Random(7))

        def settled() -> bool:
            c = ob.counts()
            return c["sent"] + c["dead"] == 48 and ob.proof_summary()["pending"] == (0, 0)

        # Send, prove, send again ... (a C-STORE timing out on a loaded machine costs a round,
        # and a failed check waits its backoff in real time).
        for _ in range(60):
            if not up.loop_once():
                time.sleep(0.5)
            clock.advance(3600)
            if settled():
                break
        dest.close()
        counts = ob.counts()
        if lies:
            assert counts["sent"] == 0 and counts["dead"] == 48, counts
            assert {r.last_error for r in ob.rows("dead")} == {"not_stored_after_ack"}
            assert ob.purge_sent_files(0) == 0 and all(p.exists() for p in files)
            assert server.count_instances() == 0
        else:
            assert counts["sent"] == 48 and ob.proof_summary()["pending"] == (0, 0), counts
            assert sorted(server.sop_uids()) == sorted(uids)
            assert ob.purge_sent_files(0) == 48
    finally:
        ob.close()
        server.close()


def test_a_peer_that_refuses_c_find_keeps_the_copies_and_says_why(
    tmp_path: Path, storescp: Any
) -> None:
    """dcmtk's storescp stores but answers no queries: the rows are delivered, their proof
    stays pending, their files are kept, nothing is killed, and `status` says what to do."""
    clock = FakeClock()
    ob = Outbox(tmp_path / "outbox.db", clock=clock)
    files = make_files(tmp_path / "f", 4)
    add_files(ob, files)
    with storescp(tmp_path / "scp") as scp:
        settings = _dicom_settings(scp.port, scp.aet)
        dest = destination_from_settings(settings, calling_ae="EDGE01")
        up = Uploader(ob, dest, settings, clock=clock, rng=random.Random(8))
        hourly_passes(up, clock, 4)
        dest.close()
        assert len(scp.files()) == 4
    counts = ob.counts()
    assert counts["sent"] == 4 and counts["dead"] == 0, counts
    assert ob.proof_summary()["pending"][0] == 4 and ob.purge_sent_files(0) == 0
    status = ob.queue("default").destination_status()
    assert status["last_error"].startswith("storage_check c_find_refused")
    assert status["consecutive_failures"] == 0  # uploads are not blocked
    assert proof_refused(status) and not misconfigured(status)
    assert "allow the agent's AE title to query" in (hint(status["last_error"]) or "")
    ob.close()


def test_c_find_off_trusts_the_acknowledgement(tmp_path: Path, storescp: Any) -> None:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "f", 2))
    with storescp(tmp_path / "scp") as scp:
        settings = _dicom_settings(scp.port, scp.aet, confirm_storage=False)
        dest = destination_from_settings(settings, calling_ae="EDGE01")
        up = Uploader(ob, dest, settings)
        assert up.loop_once() == 2 and up.loop_once() == 2  # sent, then marked unproven
        dest.close()
    summary = ob.proof_summary()
    assert summary["pending"] == (0, 0) and summary["unproven"][0] == 2
