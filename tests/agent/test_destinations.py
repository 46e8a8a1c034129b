"""Destinations: folder sink, STOW-RS to a real Orthanc, real TLS and redirects; MockTransport only
for answers Orthanc cannot give (409 FailedSOP shapes, 413, 429, odd Retry-After)."""

from __future__ import annotations

import http.server
import io
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from pydicom import dcmread

from gateway_agent._exceptions import ConfigError, PermanentUploadError, RetryableUploadError
from gateway_agent.agent.outbox.db import OutboxRow
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations import destination_from_settings
from gateway_agent.agent.upload.destinations.dicomweb import (
    BearerAuth,
    DicomWebDestination,
    parse_retry_after,
    translate_httpx_error,
)
from gateway_agent.agent.upload.destinations.folder import FolderDestination
from gateway_agent.config import DestinationSettings, load_settings
from tests._orthanc import OrthancServer, start_orthanc
from tests._tls import self_signed

from ._uploadkit import add_files, make_files

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def rows(tmp_path: Path) -> list[OutboxRow]:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "files", 6))
    out = ob.queue("default").claim(max_items=100, max_bytes=10**9, lease_seconds=60)
    ob.close()
    return out


def _garbage_row(tmp_path: Path, uid: str = "1.2.3.999") -> OutboxRow:
    p = tmp_path / "garbage.dcm"
    p.write_bytes(b"this is not DICOM" * 100)
    return OutboxRow(
        999, uid, "1.2.3", "1.2.3.1", CT, p, p.stat().st_size, "sending", 1, 0.0, None, 0.0, None
    )


def _with_path(row: OutboxRow, path: Path) -> OutboxRow:
    return OutboxRow(
        row.id, row.sop_instance_uid, row.study_instance_uid, row.series_instance_uid,
        row.sop_class_uid, path, row.size, row.state, row.attempts, row.next_attempt_at,
        row.last_error, row.created_at, row.sent_at,
    )  # fmt: skip


# -- folder ------------------------------------------------------------------------------------
def test_folder_destination_atomic_and_idempotent(tmp_path: Path, rows: list[OutboxRow]) -> None:
    dest = FolderDestination(tmp_path / "dest")
    first = dest.send(rows)
    assert sorted(first.sent) == sorted(r.sop_instance_uid for r in rows) and not first.failed
    for r in rows:
        target = (
            tmp_path
            / "dest"
            / r.study_instance_uid
            / r.series_instance_uid
            / f"{r.sop_instance_uid}.dcm"
        )
        assert target.read_bytes() == r.path.read_bytes()
    again = dest.send(rows)
    assert len(again.sent) == len(rows)
    files = [p for p in (tmp_path / "dest").rglob("*") if p.is_file()]
    assert len(files) == len(rows)  # no duplicate, no leftover temp file
    dest.close()


def test_folder_destination_per_instance_failures(tmp_path: Path, rows: list[OutboxRow]) -> None:
    dest = FolderDestination(tmp_path / "dest")
    missing = _with_path(rows[0], tmp_path / "nope.dcm")
    bad_uid = OutboxRow(
        7, "../../etc", "1.2", "1.2.1", CT, rows[1].path, 1, "sending", 1, 0, None, 0, None
    )
    result = dest.send([missing, bad_uid, rows[2]])
    assert result.failed == {
        missing.sop_instance_uid: (True, "file_missing"),
        "../../etc": (True, "invalid_uid"),
    }
    assert result.sent == [rows[2].sop_instance_uid]


def test_folder_destination_unusable_root_is_retryable(
    tmp_path: Path, rows: list[OutboxRow]
) -> None:
    blocker = tmp_path / "dest"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(RetryableUploadError, match="folder_error"):
        FolderDestination(blocker).send(rows[:1])


# -- real Orthanc ------------------------------------------------------------------------------
@pytest.mark.orthanc
def test_stow_to_real_orthanc_and_duplicates(orthanc: OrthancServer, rows: list[OutboxRow]) -> None:
    with DicomWebDestination(orthanc.dicomweb_url, auth=httpx.BasicAuth(*orthanc.auth)) as dest:
        result = dest.send(rows)
        assert sorted(result.sent) == sorted(r.sop_instance_uid for r in rows) and not result.failed
        assert all(orthanc.lookup(r.sop_instance_uid) for r in rows)
        again = dest.send(rows)  # Orthanc answers 200 for duplicates
    assert len(again.sent) == len(rows)
    assert orthanc.count_instances() == len(rows)


@pytest.mark.orthanc
def test_partly_bad_batch_is_split_to_find_the_bad_instance(
    orthanc: OrthancServer, rows: list[OutboxRow], tmp_path: Path
) -> None:
    # Orthanc: 400, the good parts stored and listed, the bad one listed nowhere.
    bad = _garbage_row(tmp_path)
    with DicomWebDestination(orthanc.dicomweb_url, auth=httpx.BasicAuth(*orthanc.auth)) as dest:
        result = dest.send([*rows[:3], bad, *rows[3:]])
    assert sorted(result.sent) == sorted(r.sop_instance_uid for r in rows)
    assert result.failed == {bad.sop_instance_uid: (True, "http_400 rejected")}
    assert orthanc.count_instances() == len(rows)


@pytest.mark.orthanc
def test_only_garbage_two_parts_bisected(orthanc: OrthancServer, tmp_path: Path) -> None:
    a = _garbage_row(tmp_path, "1.2.3.1000")
    b = _with_path(_garbage_row(tmp_path, "1.2.3.1001"), a.path)
    with DicomWebDestination(orthanc.dicomweb_url, auth=httpx.BasicAuth(*orthanc.auth)) as dest:
        result = dest.send([a, b])
    assert result.sent == [] and set(result.failed) == {"1.2.3.1000", "1.2.3.1001"}


@pytest.mark.orthanc
def test_wrong_credentials_raise_auth_error(orthanc: OrthancServer, rows: list[OutboxRow]) -> None:
    with (
        DicomWebDestination(orthanc.dicomweb_url, auth=httpx.BasicAuth("edge", "wrong")) as dest,
        pytest.raises(PermanentUploadError) as info,
    ):
        dest.send(rows[:2])
    assert info.value.status == 401 and "wrong" not in str(info.value)
    assert orthanc.count_instances() == 0


@pytest.mark.orthanc
def test_confirm_finds_what_orthanc_stored_and_not_what_its_filter_dropped(tmp_path: Path) -> None:
    lua = tmp_path / "reject.lua"
    lua.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        "  return dicom.InstanceNumber ~= '2'\nend\n"
    )
    server = start_orthanc(extra_config={"LuaScripts": [str(lua)]})
    try:
        ob = Outbox(":memory:")
        add_files(ob, make_files(tmp_path / "f", 3))
        items = ob.queue("default").claim(max_items=10, max_bytes=10**9, lease_seconds=60)
        with DicomWebDestination(server.dicomweb_url, auth=httpx.BasicAuth(*server.auth)) as dest:
            assert dest.confirm_storage  # the default
            assert len(dest.send(items).sent) == 3  # the STOW answer claims all three
            assert dest.confirm(items) == {
                r.sop_instance_uid for r in items if r.sop_instance_uid != items[1].sop_instance_uid
            }
        trusting = DicomWebDestination(
            server.dicomweb_url, auth=httpx.BasicAuth(*server.auth), confirm_storage=False
        )
        assert trusting.confirm(items) is None  # no proof: the uploader keeps the files
        trusting.close()
    finally:
        server.close()


def test_connection_refused_is_retryable(rows: list[OutboxRow]) -> None:
    from tests._orthanc import free_port

    with (
        DicomWebDestination(f"http://127.0.0.1:{free_port()}/dicom-web") as dest,
        pytest.raises(RetryableUploadError, match="network_error: ConnectError"),
    ):
        dest.send(rows[:1])


# -- MockTransport: answers a real Orthanc does not give ---------------------------------------
def _uids_in(request: httpx.Request) -> list[str]:
    ctype = request.headers["content-type"]
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = ctype.rsplit("boundary=", 1)[1].encode()
    body = request.read()
    assert int(request.headers["content-length"]) == len(body)
    parts = body.split(b"--" + boundary)[1:-1]
    uids = []
    for part in parts:
        head, payload = part.split(b"\r\n\r\n", 1)
        assert b"Content-Type: application/dicom" in head
        uids.append(str(dcmread(io.BytesIO(payload[:-2]), stop_before_pixels=True).SOPInstanceUID))
    return uids


def _stow_json(ok: list[str], failed: list[tuple[str, int]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in ok]},
        "00081198": {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [c]}}
                for u, c in failed
            ],
        },
    }


def _mock(handler: Callable[[httpx.Request], httpx.Response]) -> DicomWebDestination:
    client = httpx.Client(transport=httpx.MockTransport(handler))
    return DicomWebDestination("http://pacs.test/dicom-web", client=client)


def test_409_failed_sop_sequence_shapes(rows: list[OutboxRow]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        uids = _uids_in(request)
        return httpx.Response(
            409, json=_stow_json([uids[0]], [(uids[1], 0x0110), (uids[2], 0xA700)])
        )

    result = _mock(handler).send(rows[:3])
    assert result.sent == [rows[0].sop_instance_uid]
    assert result.failed == {
        rows[1].sop_instance_uid: (True, "http_409 failure_reason_0x0110"),
        rows[2].sop_instance_uid: (False, "http_409 failure_reason_0xa700"),
    }


def test_202_with_failures_and_unlisted_instances(rows: list[OutboxRow]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        uids = _uids_in(request)
        return httpx.Response(202, json=[_stow_json([uids[0]], [(uids[1], 0xC000)])])

    result = _mock(handler).send(rows[:3])
    assert result.sent == [rows[0].sop_instance_uid]
    assert result.failed[rows[1].sop_instance_uid] == (True, "http_202 failure_reason_0xc000")
    assert result.failed[rows[2].sop_instance_uid] == (False, "http_202 not_acknowledged")


def test_413_splits_the_batch(rows: list[OutboxRow]) -> None:
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        uids = _uids_in(request)
        sizes.append(len(uids))
        if len(uids) > 2:
            return httpx.Response(413)
        if rows[5].sop_instance_uid in uids:
            return httpx.Response(413)
        return httpx.Response(200, json=_stow_json(uids))

    result = _mock(handler).send(rows)
    assert sorted(result.sent) == sorted(r.sop_instance_uid for r in rows[:5])
    assert result.failed == {rows[5].sop_instance_uid: (True, "http_413 too_large")}
    assert sizes[0] == 6 and max(sizes[1:]) <= 3


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry_after"),
    [
        (429, {"Retry-After": "7"}, RetryableUploadError, 7.0),
        (503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, RetryableUploadError, 0.0),
        (500, {}, RetryableUploadError, None),
        (408, {}, RetryableUploadError, None),
        (415, {}, PermanentUploadError, None),
        (404, {}, PermanentUploadError, None),
        (403, {}, PermanentUploadError, None),
        (307, {"Location": "http://elsewhere.test/"}, PermanentUploadError, None),
    ],
)
def test_whole_request_statuses(
    rows: list[OutboxRow],
    status: int,
    headers: dict[str, str],
    error: type[Exception],
    retry_after: float | None,
) -> None:
    dest = _mock(lambda request: httpx.Response(status, headers=headers))
    with pytest.raises(error) as info:
        dest.send(rows[:2])
    assert getattr(info.value, "status", None) == status
    assert getattr(info.value, "retry_after", None) == retry_after
    assert str(info.value).startswith(f"http_{status}")


def test_remote_protocol_error_is_retried_once_on_a_fresh_request(rows: list[OutboxRow]) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json=_stow_json(_uids_in(request)))

    assert len(_mock(handler).send(rows[:2]).sent) == 2 and len(calls) == 2

    def always(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    with pytest.raises(RetryableUploadError, match="protocol_error"):
        _mock(always).send(rows[:1])


def test_translate_httpx_errors() -> None:
    req = httpx.Request("POST", "http://user:pw@x.test/")
    assert isinstance(
        translate_httpx_error(httpx.ReadTimeout("t", request=req)), RetryableUploadError
    )
    assert isinstance(
        translate_httpx_error(httpx.ConnectError("c", request=req)), RetryableUploadError
    )
    assert isinstance(translate_httpx_error(httpx.UnsupportedProtocol("u")), PermanentUploadError)
    err = translate_httpx_error(
        httpx.ConnectError("failed for http://user:pw@x.test/", request=req)
    )
    assert "pw" not in str(err)
    assert parse_retry_after("12") == 12.0 and parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_missing_file_is_a_permanent_per_instance_failure(
    rows: list[OutboxRow], tmp_path: Path
) -> None:
    dest = _mock(lambda request: httpx.Response(200, json=_stow_json(_uids_in(request))))
    gone = _with_path(rows[0], tmp_path / "gone.dcm")
    result = dest.send([gone, rows[1]])
    assert result.failed == {gone.sop_instance_uid: (True, "file_missing")}
    assert result.sent == [rows[1].sop_instance_uid]


def test_bearer_auth_header_and_no_token_in_repr(rows: list[OutboxRow]) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json=_stow_json(_uids_in(request)))

    client = httpx.Client(transport=httpx.MockTransport(handler))
    auth = BearerAuth("tok-123")
    DicomWebDestination("http://pacs.test/dicom-web", client=client, auth=auth).send(rows[:1])
    assert seen == ["Bearer tok-123"] and "tok-123" not in repr(auth)


# -- redirects and TLS with real loopback servers ----------------------------------------------
class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]]
    reply: Callable[[http.server.BaseHTTPRequestHandler], None]

    def do_POST(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        type(self).reply(self)

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args: Any) -> None:
        pass


def _serve(host: str, reply: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[Any]:
    handler = type("H", (_Recorder,), {"seen": [], "reply": staticmethod(reply)})
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_redirect_to_another_host_never_carries_credentials(rows: list[OutboxRow]) -> None:
    def ok(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "2")
        h.end_headers()
        h.wfile.write(b"{}")

    other_gen = _serve("127.0.0.2", ok)
    other, other_handler = next(other_gen)
    target = f"http://127.0.0.2:{other.server_address[1]}/dicom-web/studies"

    def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(307)
        h.send_header("Location", target)
        h.send_header("Content-Length", "0")
        h.end_headers()

    first_gen = _serve("127.0.0.1", redirect)
    first, first_handler = next(first_gen)
    try:
        # Even a client configured to follow redirects is not allowed to here.
        client = httpx.Client(follow_redirects=True)
        dest = DicomWebDestination(
            f"http://127.0.0.1:{first.server_address[1]}/dicom-web",
            client=client,
            auth=httpx.BasicAuth("edge", "edge-secret"),
        )
        with pytest.raises(PermanentUploadError) as info:
            dest.send(rows[:1])
        assert info.value.status == 307 and "redirect_not_followed" in str(info.value)
        assert first_handler.seen[0]["authorization"].startswith("Basic ")
        assert other_handler.seen == []
        client.close()
    finally:
        for gen in (first_gen, other_gen):
            with pytest.raises(StopIteration):
                next(gen)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_tls_verified_by_default_and_ca_bundle_accepted(
    tls_cert: tuple[Path, Path], rows: list[OutboxRow]
) -> None:
    cert, key = tls_cert
    body = json.dumps(_stow_json([rows[0].sop_instance_uid])).encode()

    def ok(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    gen = _serve("127.0.0.1", ok)
    server, _ = next(gen)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        strict = DicomWebDestination(url)
        with pytest.raises(RetryableUploadError, match="network_error"):
            strict.send(rows[:1])
        trusted = DicomWebDestination(url, verify=str(cert))
        assert trusted.send(rows[:1]).sent == [rows[0].sop_instance_uid]
        strict.close()
        trusted.close()
    finally:
        with pytest.raises(StopIteration):
            next(gen)


# -- from settings -----------------------------------------------------------------------------
def test_destination_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(destination_from_settings(DestinationSettings()), FolderDestination)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    s = DestinationSettings(
        kind="dicomweb",
        url="http://127.0.0.1:1/dicom-web",
        auth="basic",
        username="u",
        password_file=pw,
    )
    d = destination_from_settings(s)
    assert isinstance(d, DicomWebDestination) and "s3cret" not in repr(vars(d))
    d.close()
    with pytest.raises(ConfigError, match="password"):
        destination_from_settings(s.model_copy(update={"password_file": None}))
    with pytest.raises(ConfigError, match="username"):
        destination_from_settings(s.model_copy(update={"username": None}))
    with pytest.raises(ConfigError, match="token"):
        destination_from_settings(s.model_copy(update={"auth": "bearer"}))
    tok = tmp_path / "tok"
    tok.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        destination_from_settings(s.model_copy(update={"auth": "bearer", "token_file": tok}))
    with pytest.raises(ConfigError, match="TLS"):
        destination_from_settings(s.model_copy(update={"ca_bundle": tmp_path / "missing.pem"}))
    bearer = destination_from_settings(
        s.model_copy(update={"auth": "bearer", "token": SecretStr("t")})
    )
    bearer.close()
    monkeypatch.setenv("GATEWAY_DESTINATION__PASSWORD", "from-env")
    env = load_settings(
        None,
        {
            "destination.kind": "dicomweb",
            "destination.url": "http://127.0.0.1:1/dicom-web",
            "destination.auth": "basic",
            "destination.username": "u",
        },
    )
    assert env.destination.password is not None
    assert "from-env" not in repr(env.destination)
    destination_from_settings(env.destination).close()
