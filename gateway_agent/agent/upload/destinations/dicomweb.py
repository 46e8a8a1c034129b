"""The DICOMweb destination: STOW-RS over httpx, TLS, basic or bearer auth, storage proven by QIDO.

Whole-request failures map onto the destination contract (``destinations/__init__.py``):

* :class:`RetryableUploadError`: network error, timeout (httpx's per operation, or the whole
  request's deadline), 408, 429, 5xx (``retry_after`` set from the server's ``Retry-After``), and
  a 2xx that is not a STOW-RS response (empty, an HTML page) or acknowledges none of the batch;
* :class:`PermanentUploadError`: 401/403 (``status`` set: the uploader treats these like an outage
  and reports ``auth_failing``), 3xx (redirects are never followed), 404/405/501 (``status`` set:
  a wrong URL, treated like an outage too), 415 and other 4xx.

Every request has a deadline (:mod:`.deadline`): ``timeout_seconds`` plus the body's size at
``min_kb_per_second`` to send it, then ``timeout_seconds`` for the whole reply.

After a STOW-RS success, :meth:`DicomWebDestination.confirm` asks QIDO-RS for the acknowledged
instances, one query per study and page of SOP Instance UIDs (UID list matching), and asks one
by one for those a list query did not find (servers without list matching, truncated answers).

httpx exceptions are translated to that tree in one place (:func:`translate_httpx_error`).
Reasons are short slugs with the HTTP status; they never carry a credential or a header value.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import secrets
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx
from pydantic import SecretStr

from ...._exceptions import ConfigError, PermanentUploadError, RetryableUploadError, UploadError
from ....config import DestinationSettings, read_secret_file
from ....logs import get_logger
from ...outbox.db import OutboxRow
from . import SendResult, open_row
from .deadline import CONNECTING, SENDING, Deadlines, Slot, install

__all__ = [
    "DEFAULT_MIN_BYTES_PER_SECOND",
    "DEFAULT_TIMEOUT",
    "MAX_REPLY_BYTES",
    "QIDO_PAGE",
    "BearerAuth",
    "DicomWebDestination",
    "dicomweb_from_settings",
    "error_for_status",
    "parse_retry_after",
    "parse_stow_response",
    "translate_httpx_error",
]

log = get_logger()

#: Connect fast, but give a large batch time to be written and stored.
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

#: The slowest upload speed tolerated by default (bytes per second, 512 kbit/s).
DEFAULT_MIN_BYTES_PER_SECOND = 64_000.0
#: A reply larger than this is not a STOW-RS or QIDO-RS answer (it is not read further).
MAX_REPLY_BYTES = 32 << 20
#: SOP Instance UIDs per QIDO-RS query (a URL of about 2.6 kB with 64-character UIDs).
QIDO_PAGE = 40

_CHUNK = 1 << 20
_SOP_INSTANCE_UID = "00080018"
_REFERENCED_SOP_SEQ = "00081199"
_FAILED_SOP_SEQ = "00081198"
_REFERENCED_SOP_UID = "00081155"
_FAILURE_REASON = "00081197"
_SEQUENCES = (_REFERENCED_SOP_SEQ, _FAILED_SOP_SEQ)
#: Statuses whose body may list per-instance results, and where splitting the batch can help.
_SPLITTABLE = frozenset({400, 409, 413})


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token>``; the token never appears in ``repr``."""

    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"


def translate_httpx_error(exc: httpx.HTTPError) -> UploadError:
    """The one place where httpx exceptions become upload errors (most specific match first)."""
    detail = _safe_detail(exc)
    if isinstance(exc, httpx.TimeoutException):
        return RetryableUploadError(f"timeout: {type(exc).__name__}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return RetryableUploadError(f"protocol_error: {detail}")
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return PermanentUploadError(f"request_error: {type(exc).__name__}")
    if isinstance(exc, httpx.TransportError):  # ConnectError, ReadError, WriteError, ProxyError...
        return RetryableUploadError(f"network_error: {type(exc).__name__}: {detail}")
    if isinstance(exc, httpx.HTTPStatusError):
        return error_for_status(exc.response)
    return RetryableUploadError(f"http_error: {type(exc).__name__}")


def _safe_detail(exc: BaseException) -> str:
    """A short description without URLs (which might carry user:password@)."""
    text = str(exc) or type(exc).__name__
    text = re.sub(r"\w+://\S+", "<url>", text)
    return text[:160]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_for_status(response: httpx.Response) -> UploadError:
    """The whole-request error for a status that carries no per-instance result."""
    status = response.status_code
    phrase = response.reason_phrase.lower().replace(" ", "_") if response.reason_phrase else ""
    reason = f"http_{status}" + (f" {phrase}" if phrase else "")
    if status == 501:  # Not Implemented: there is no such service at this URL
        return PermanentUploadError(reason, status=status)
    if status in (408, 429) or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return RetryableUploadError(reason, status=status, retry_after=retry_after)
    if 300 <= status < 400:
        return PermanentUploadError(f"http_{status} redirect_not_followed", status=status)
    if 400 <= status < 500:
        return PermanentUploadError(reason, status=status)
    return RetryableUploadError(reason, status=status)


def _sequence_uids(doc: dict[str, Any], tag: str) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    seq = doc.get(tag)
    if not isinstance(seq, dict):
        return out
    for item in seq.get("Value") or []:
        if not isinstance(item, dict):
            continue
        uid_el = item.get(_REFERENCED_SOP_UID) or {}
        uids = uid_el.get("Value") if isinstance(uid_el, dict) else None
        if not uids:
            continue
        reason_el = item.get(_FAILURE_REASON) or {}
        codes = reason_el.get("Value") if isinstance(reason_el, dict) else None
        code = int(codes[0]) if codes else None
        out.append((str(uids[0]), code))
    return out


def parse_stow_response(
    response: httpx.Response,
) -> tuple[list[str], list[tuple[str, int | None]]] | None:
    """``(referenced uids, [(failed uid, FailureReason)])`` from a STOW-RS reply, or None when the
    body is not a STOW-RS response (empty, an HTML page, JSON or XML of something else).

    DICOM JSON and DICOM XML (``NativeDicomModel``) are read. The Content-Type is not trusted
    (Orthanc sends none with 400).
    """
    body = response.content.lstrip()
    if body.startswith(b"<"):
        return _parse_stow_xml(body)
    try:
        doc = response.json()
    except ValueError:
        return None
    if isinstance(doc, list):
        doc = doc[0] if doc and isinstance(doc[0], dict) else {}
    if not isinstance(doc, dict) or not (_REFERENCED_SOP_SEQ in doc or _FAILED_SOP_SEQ in doc):
        return None
    referenced = [uid for uid, _ in _sequence_uids(doc, _REFERENCED_SOP_SEQ)]
    return referenced, _sequence_uids(doc, _FAILED_SOP_SEQ)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_stow_xml(body: bytes) -> tuple[list[str], list[tuple[str, int | None]]] | None:
    """The same from DICOM XML (PS3.19 Native DICOM Model); None for any other XML or HTML."""
    if b"<!" in body:  # a DTD (entity declarations) or an HTML doctype: not a STOW-RS reply
        return None
    try:
        # Without a DTD no entity can be declared, so nothing expands; nothing external is read.
        root = ET.fromstring(body)  # noqa: S314
    except ET.ParseError:
        return None
    if _local(root.tag) != "NativeDicomModel":
        return None
    seqs: dict[str, list[tuple[str, int | None]]] = {}
    for attr in root:
        tag = attr.get("tag", "").upper()
        if _local(attr.tag) != "DicomAttribute" or tag not in _SEQUENCES:
            continue
        items = seqs.setdefault(tag, [])
        for item in attr:
            values: dict[str, str] = {}
            for el in item:
                value = next((v.text for v in el if _local(v.tag) == "Value"), None)
                if value is not None:
                    values[el.get("tag", "").upper()] = value.strip()
            uid = values.get(_REFERENCED_SOP_UID)
            if uid:
                code = values.get(_FAILURE_REASON)
                items.append((uid, int(code) if code and code.isdigit() else None))
    if not seqs:
        return None
    return [u for u, _ in seqs.get(_REFERENCED_SOP_SEQ, [])], seqs.get(_FAILED_SOP_SEQ, [])


def _describe_body(response: httpx.Response) -> str:
    """What a reply that is not an answer holds, in a slug: ``empty body``, ``text/html``."""
    if not response.content.strip():
        return "empty body"
    ctype = response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    ctype = re.sub(r"[^a-z0-9/+.-]", "", ctype)[:40]
    return ctype or "body without content type"


def _failure_is_permanent(code: int | None) -> bool:
    """FailureReason 0xA7xx (out of resources) is worth retrying; the rest will not change."""
    return not (code is not None and 0xA700 <= code <= 0xA7FF)


@dataclass
class _Part:
    row: OutboxRow
    fh: BinaryIO
    size: int


def _ssl_context(verify: bool | str, cert: Any) -> ssl.SSLContext | bool:
    """Verified TLS by default (certifi, or the given CA bundle); an optional client certificate."""
    if verify is False and cert is None:
        return False
    if isinstance(verify, str):
        ctx = ssl.create_default_context(cafile=verify)
    else:
        import certifi

        ctx = ssl.create_default_context(cafile=certifi.where())
        if verify is False:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        if isinstance(cert, (tuple, list)):
            ctx.load_cert_chain(str(cert[0]), str(cert[1]) if len(cert) > 1 and cert[1] else None)
        else:
            ctx.load_cert_chain(str(cert))
    return ctx


class DicomWebDestination:
    """STOW-RS ``POST {base}/studies``, streamed ``multipart/related; type="application/dicom"``.

    Parameters
    ----------
    base_url
        The DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
    client
        An ``httpx.Client`` to use (tests inject one with a ``MockTransport``); else one is made
        with the TLS, timeout and connection settings given here.
    auth
        ``httpx.BasicAuth`` or :class:`BearerAuth`; applied per request, never logged.
    timeout
        httpx's timeouts per network operation; its read timeout is also the deadline of a
        whole reply (and of a request's body beyond its size at ``min_bytes_per_second``).
    confirm_storage
        Prove with QIDO-RS that each acknowledged instance is stored (:meth:`confirm`); when
        false, :meth:`confirm` returns None (no proof).
    min_bytes_per_second
        The slowest upload speed tolerated before a request counts as stalled.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.Client | None = None,
        auth: httpx.Auth | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        verify: bool | str = True,
        cert: Any = None,
        confirm_storage: bool = True,
        max_connections: int = 8,
        min_bytes_per_second: float = DEFAULT_MIN_BYTES_PER_SECOND,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError('Argument "base_url" must start with http:// or https://.')
        parts = urlsplit(base_url)
        if parts.username or parts.password:
            raise ValueError('Argument "base_url" must not carry credentials; use "auth".')
        if min_bytes_per_second <= 0:
            raise ValueError('Argument "min_bytes_per_second" must be > 0.')
        self.base_url = base_url.rstrip("/")
        self.label = f"dicomweb:{parts.hostname}:{parts.port or ''}".rstrip(":")
        self._auth = auth
        self._own_client = client is None
        self._client = client or httpx.Client(
            timeout=timeout,
            verify=_ssl_context(verify, cert),
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.confirm_storage = confirm_storage
        self.reply_seconds = float(timeout.read or DEFAULT_TIMEOUT.read or 30.0)
        self.min_bytes_per_second = float(min_bytes_per_second)
        self.deadlines = Deadlines()
        install(self._client, self.deadlines)
        #: Whether the server matches a list of UIDs in one query (learned; True until shown not).
        self.uid_lists = True
        self._qido_seen = False

    def close(self) -> None:
        self.deadlines.close()
        if self._own_client:
            self._client.close()

    def __enter__(self) -> DicomWebDestination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests under a deadline -----------------------------------------------------------
    def _request(self, method: str, url: str, seconds: float, **kwargs: Any) -> httpx.Response:
        """One request whose whole exchange must end within ``seconds`` (a body generator may
        move the deadline with ``self.deadlines.restart``); the reply is read up to
        :data:`MAX_REPLY_BYTES`. httpx errors are raised as they are, or as a timeout when the
        deadline cut the request."""
        auth: Any = self._auth if self._auth is not None else httpx.USE_CLIENT_DEFAULT
        with self.deadlines.limit(seconds) as slot:
            try:
                with self._client.stream(
                    method, url, auth=auth, follow_redirects=False, **kwargs
                ) as response:
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > MAX_REPLY_BYTES:
                            raise RetryableUploadError(
                                f"http_{response.status_code} reply_too_large",
                                status=response.status_code,
                            )
                    return httpx.Response(
                        response.status_code,
                        headers=response.headers,
                        content=bytes(body),
                        request=response.request,
                        extensions={"reason_phrase": response.reason_phrase.encode()},
                    )
            except httpx.HTTPError as exc:
                if slot.expired:
                    raise _overran(slot) from exc
                raise

    def _body(self, parts: Sequence[_Part], boundary: str) -> Iterator[bytes]:
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        for part in parts:
            part.fh.seek(0)
            yield head
            remaining = part.size
            while remaining > 0:
                chunk = part.fh.read(min(_CHUNK, remaining))
                if not chunk:
                    raise RetryableUploadError("file_changed_during_upload")
                remaining -= len(chunk)
                yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()
        # The body is handed over: the whole reply must now come within the reply deadline.
        self.deadlines.restart(self.reply_seconds)

    def _post(self, parts: Sequence[_Part]) -> httpx.Response:
        boundary = "gw" + secrets.token_hex(16)
        length = sum(
            len(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n") + p.size + 2
            for p in parts
        )
        length += len(f"--{boundary}--\r\n")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
            "Accept": "application/dicom+json",
        }
        url = self.base_url + "/studies"
        send_seconds = self.reply_seconds + length / self.min_bytes_per_second
        for attempt in (1, 2):
            try:
                return self._request(
                    "POST", url, send_seconds, content=self._body(parts, boundary), headers=headers
                )
            except httpx.RemoteProtocolError as exc:
                # A keep-alive connection closed by the server under us (or a lost reply): the
                # request is idempotent per SOP UID, so try once more on a fresh connection.
                if attempt == 2:
                    raise translate_httpx_error(exc) from exc
            except httpx.HTTPError as exc:
                raise translate_httpx_error(exc) from exc
        raise AssertionError("unreachable")

    def _post_and_classify(self, parts: Sequence[_Part], result: SendResult) -> None:
        response = self._post(parts)
        status = response.status_code
        if not (200 <= status < 300 or status in _SPLITTABLE):
            raise error_for_status(response)
        by_uid = {p.row.sop_instance_uid: p for p in parts}
        parsed = parse_stow_response(response)
        ok = 200 <= status < 300
        if ok and parsed is None:
            # An empty 200, a captive portal's page, a proxy's error page: not the archive.
            raise RetryableUploadError(
                f"http_{status} not_a_stow_response: {_describe_body(response)}", status=status
            )
        referenced, failed = parsed or ([], [])
        if ok and not any(u in by_uid for u in (*referenced, *(u for u, _ in failed))):
            # A STOW-RS answer about none of these instances (a cache, a misrouted proxy).
            raise RetryableUploadError(f"http_{status} acknowledged_none", status=status)
        acked = [u for u in dict.fromkeys(referenced) if u in by_uid]
        result.sent.extend(acked)
        listed = set(referenced)
        for uid, code in failed:
            if uid in by_uid and uid not in listed:
                listed.add(uid)
                reason = f"failure_reason_{code:#06x}" if code is not None else "failed"
                result.failed[uid] = (_failure_is_permanent(code), f"http_{status} {reason}")
        rest = [p for p in parts if p.row.sop_instance_uid not in listed]
        if not rest:
            return
        if ok:
            for p in rest:
                result.failed[p.row.sop_instance_uid] = (False, f"http_{status} not_acknowledged")
        elif len(rest) == 1:
            result.failed[rest[0].row.sop_instance_uid] = (True, _rejected_reason(response))
        else:
            # A batch-level 400/409/413 that does not say which instance: split and send the halves.
            mid = len(rest) // 2
            self._post_and_classify(rest[:mid], result)
            self._post_and_classify(rest[mid:], result)

    # -- the contract ------------------------------------------------------------------------
    def send(self, items: Sequence[OutboxRow]) -> SendResult:
        result = SendResult()
        parts: list[_Part] = []
        try:
            for row in items:
                fh = open_row(row, result)
                if fh is None:
                    continue
                parts.append(_Part(row, fh, os.fstat(fh.fileno()).st_size))
            if parts:
                self._post_and_classify(parts, result)
        finally:
            for p in parts:
                with contextlib.suppress(OSError):
                    p.fh.close()
        return result

    def confirm(self, items: Sequence[OutboxRow]) -> set[str] | None:
        """The acknowledged instances QIDO-RS finds (None when ``confirm_storage`` is off).

        One query per study and page of :data:`QIDO_PAGE` UIDs; the UIDs a list query did not
        find are asked for one by one (a server without UID list matching answers a list with
        nothing: the destination then asks one by one from the start).
        """
        if not self.confirm_storage:
            return None
        by_study: dict[str, list[str]] = {}
        for row in items:
            by_study.setdefault(row.study_instance_uid, []).append(row.sop_instance_uid)
        found: set[str] = set()
        for study, uids in by_study.items():
            page = QIDO_PAGE if self.uid_lists else 1
            for i in range(0, len(uids), page):
                chunk = uids[i : i + page]
                got = self._qido(study, chunk)
                found |= got
                missing = [u for u in chunk if u not in got]
                if len(chunk) > 1 and missing:
                    singles: set[str] = set()
                    for uid in missing:
                        singles |= self._qido(study, [uid])
                    if singles and not got:
                        self.uid_lists = False
                        log.info("qido_uid_lists_unsupported", destination=self.label)
                    found |= singles
        return found

    def _qido(self, study: str, uids: Sequence[str]) -> set[str]:
        """Which of ``uids`` (of ``study``) QIDO-RS lists."""
        url = f"{self.base_url}/studies/{study}/instances"
        params = {"SOPInstanceUID": ",".join(uids), "includefield": _SOP_INSTANCE_UID}
        response = self._check_request(url, params)
        status = response.status_code
        if status == 204:
            return set()
        if status == 404:
            # Some servers answer 404 for a study they do not hold; others have no QIDO-RS.
            if self._qido_available(study):
                return set()
            raise PermanentUploadError(
                "http_404 no_qido: the storage check (QIDO-RS) is not available at this URL",
                status=404,
            )
        if status != 200:
            raise error_for_status(response)
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, list):
            raise RetryableUploadError(
                f"http_200 not_a_qido_response: {_describe_body(response)}", status=200
            )
        self._qido_seen = True
        wanted = set(uids)
        listed: set[str] = set()
        for item in doc:
            el = item.get(_SOP_INSTANCE_UID) if isinstance(item, dict) else None
            values = el.get("Value") if isinstance(el, dict) else None
            if values and str(values[0]) in wanted:
                listed.add(str(values[0]))
        return listed

    def _qido_available(self, study: str) -> bool:
        if self._qido_seen:
            return True
        response = self._check_request(
            f"{self.base_url}/studies", {"StudyInstanceUID": study, "limit": "1"}
        )
        self._qido_seen = response.status_code in (200, 204)
        return self._qido_seen

    def _check_request(self, url: str, params: dict[str, str]) -> httpx.Response:
        try:
            return self._request(
                "GET",
                url,
                self.reply_seconds,
                params=params,
                headers={"Accept": "application/dicom+json"},
            )
        except httpx.HTTPError as exc:
            raise translate_httpx_error(exc) from exc


def _overran(slot: Slot) -> RetryableUploadError:
    """The upload error of a request stopped by its deadline, naming the phase it was in."""
    seconds = round(slot.seconds)
    if slot.phase == SENDING:
        text = f"the server did not take the request within {seconds} s"
    elif slot.phase == CONNECTING:
        text = f"no connection within {seconds} s"
    else:
        text = f"no complete reply within {seconds} s"
    return RetryableUploadError(f"timeout: {text} (deadline)")


def _rejected_reason(response: httpx.Response) -> str:
    status = response.status_code
    if status == 413:
        return "http_413 too_large"
    if status == 409:
        return "http_409 conflict"
    return f"http_{status} rejected"


# -- from settings ------------------------------------------------------------------------------
def _credential(value: SecretStr | None, file: Path | None, key: str) -> str:
    """A secret from ``destination.<key>_file`` (preferred) or ``destination.<key>``."""
    if file is not None:
        return read_secret_file(file, f"destination.{key}_file")
    if value is not None:
        return value.get_secret_value()
    raise ConfigError(
        f"destination.{key} (or GATEWAY_DESTINATION__{key.upper()}) or destination.{key}_file"
        f" is required for destination.auth"
    )


def dicomweb_from_settings(
    s: DestinationSettings, *, client: httpx.Client | None = None
) -> DicomWebDestination:
    """Build the DICOMweb destination. Credentials come from the settings (which read
    ``GATEWAY_DESTINATION__PASSWORD``/``__TOKEN``) or from a file; they are never logged."""
    assert s.url is not None  # the settings validator requires it for dicomweb
    auth: httpx.Auth | None = None
    if s.auth == "basic":
        if not s.username:
            raise ConfigError('destination.username is required when destination.auth = "basic"')
        auth = httpx.BasicAuth(s.username, _credential(s.password, s.password_file, "password"))
    elif s.auth == "bearer":
        auth = BearerAuth(_credential(s.token, s.token_file, "token"))
    verify: bool | str = str(s.ca_bundle) if s.ca_bundle is not None else s.verify_tls
    cert: Any = None
    if s.client_cert is not None:
        cert = (str(s.client_cert), str(s.client_key)) if s.client_key else str(s.client_cert)
    try:
        return DicomWebDestination(
            s.url,
            client=client,
            auth=auth,
            timeout=httpx.Timeout(s.timeout_seconds, connect=min(10.0, s.timeout_seconds)),
            verify=verify,
            cert=cert,
            confirm_storage=s.confirm_storage,
            max_connections=s.parallel_requests + 2,
            min_bytes_per_second=s.min_kb_per_second * 1000.0,
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destination TLS files: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:
        raise ConfigError(f"destination.url: {exc}") from None
