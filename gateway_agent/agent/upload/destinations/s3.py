"""Destination kind ``s3``: objects in a bucket of AWS S3 or any S3-compatible store, via boto3.

Each instance becomes the object ``<prefix>/<StudyInstanceUID>/<SeriesInstanceUID>/
<SOPInstanceUID>.dcm`` (output UIDs only, so keys carry no PHI and the same instance always lands
on the same key: sending it twice is harmless), ``Content-Type: application/dicom``, with the
file's SHA-256 in the object's metadata (``x-amz-meta-sha256``) for whoever reads it later.

Integrity: every request carries a checksum the store verifies before it accepts the bytes
(``x-amz-checksum-sha256``, or ``Content-MD5`` with ``s3_checksum = "md5"``), and the checksum the
store answers with must be ours. Objects of ``multipart_threshold_mb`` or more go up in parts of
``multipart_chunk_mb``, each streamed from the file with its own checksum; an upload left
incomplete by a crash is aborted before the object is sent again. :meth:`S3Destination.confirm`
proves storage with a ``HEAD`` that compares size and checksum.

Errors map onto the destination contract (``destinations/__init__.py``) in one place,
:func:`translate_boto_error`: network errors, timeouts, throttling (``SlowDown``, 429, 503) and
other 5xx are retriable; refused credentials (``AccessDenied``, ``InvalidAccessKeyId``,
``SignatureDoesNotMatch``, no credentials found) and a bucket in another region refuse the
agent; ``NoSuchBucket`` is a wrong address. Either stops the destination (its rows wait) with a
clear status line instead of dead-lettering every row. Reasons carry the S3 error code only, never
a message, header or credential.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ...._exceptions import ConfigError, PermanentUploadError, RetryableUploadError, UploadError
from ....config import DestinationSettings
from ....logs import get_logger
from ...outbox.db import OutboxRow
from . import SendResult, open_row

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

__all__ = ["S3Destination", "s3_from_settings", "translate_boto_error"]

log = get_logger()

_MB = 1024 * 1024
_READ = 1 << 20
#: How many objects' expected checksums are kept between ``send`` and ``confirm``.
_EXPECTED_MAX = 10_000

#: S3 error codes that mean "the store refuses the agent": fix credentials or policy.
_REFUSED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "NotSignedUp",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
    }
)
#: The bucket is in another region than the one the agent signs for.
_WRONG_REGION = frozenset(
    {"AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException"}
)
#: Busy or failing for now: retried with backoff.
_RETRIABLE = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)
#: The bytes arrived damaged (or the file changed while read), or the multipart upload was
#: aborted under us: this instance, again later.
_AGAIN = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "NoSuchUpload"})


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def translate_boto_error(exc: BaseException) -> UploadError | None:
    """The one place where boto3/botocore exceptions become upload errors (None: not theirs).

    A ``PermanentUploadError`` whose ``status`` is 401/403/301 refuses the agent, 404 is a wrong
    address (both stop the destination); any other status makes the instance ``dead``.
    """
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code") or "Unknown")
        meta = exc.response.get("ResponseMetadata", {}) or {}
        status = int(meta.get("HTTPStatusCode") or 0)
        reason = f"s3 {code} (http_{status})" if status else f"s3 {code}"
        if code in _AGAIN:
            return RetryableUploadError(reason, status=400)
        if code in _REFUSED or status in (401, 403):
            return PermanentUploadError(reason, status=403)
        if code in _WRONG_REGION or status in (301, 307):
            return PermanentUploadError(
                f"{reason}: the bucket is in another region (set destination.region)", status=301
            )
        if code == "NoSuchBucket":
            return PermanentUploadError(reason, status=404)
        if code in _RETRIABLE or status in (408, 429) or status >= 500:
            headers = meta.get("HTTPHeaders", {}) or {}
            retry_after = headers.get("retry-after")
            after = float(retry_after) if retry_after and retry_after.isdigit() else None
            return RetryableUploadError(reason, status=status or 503, retry_after=after)
        return PermanentUploadError(reason, status=status or 400)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return PermanentUploadError(
            "s3 no_credentials: none found (AWS_* environment, destination.aws_credentials_file, "
            "~/.aws/credentials, an instance role)",
            status=401,
        )
    if isinstance(exc, bx.CredentialRetrievalError | bx.TokenRetrievalError):
        return RetryableUploadError(f"s3 credentials_unavailable: {type(exc).__name__}")
    if isinstance(exc, bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return RetryableUploadError(f"timeout: {type(exc).__name__}")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectionClosedError | bx.HTTPClientError):
        return RetryableUploadError(f"network_error: {type(exc).__name__}")
    if isinstance(exc, bx.ProfileNotFound):
        return PermanentUploadError("s3 profile_not_found (destination.aws_profile)", status=401)
    return None


@dataclass(frozen=True)
class _Digests:
    """What one pass over a file found: its size, SHA-256 (and MD5 when asked), and per part."""

    size: int
    sha256: bytes
    md5: bytes | None
    parts: tuple[tuple[int, bytes], ...] = ()  # (length, digest) per part, multipart only

    def expected(self, checksum: str) -> str:
        """What the store answers with: the object's checksum (SHA-256 base64, or the MD5 ETag),
        composite (``<digest of the digests>-N``) for a multipart object."""
        if self.parts:
            combined = hashlib.new("sha256" if checksum == "sha256" else "md5")
            for _, digest in self.parts:
                combined.update(digest)
            if checksum == "sha256":
                return f"{_b64(combined.digest())}-{len(self.parts)}"
            return f"{combined.hexdigest()}-{len(self.parts)}"
        if checksum == "sha256":
            return _b64(self.sha256)
        assert self.md5 is not None
        return self.md5.hex()


def _digest_file(fh: BinaryIO, *, md5: bool, part_size: int | None) -> _Digests:
    """One sequential pass (bounded memory): the whole file's digests and, with ``part_size``,
    each part's (SHA-256, or MD5 with ``md5``)."""
    whole = hashlib.sha256()
    whole_md5 = hashlib.md5() if md5 else None  # noqa: S324 - Content-MD5 is what S3 checks
    parts: list[tuple[int, bytes]] = []
    part = hashlib.md5() if md5 else hashlib.sha256()  # noqa: S324
    in_part = 0
    size = 0
    while chunk := fh.read(_READ if part_size is None else min(_READ, part_size - in_part)):
        whole.update(chunk)
        if whole_md5 is not None:
            whole_md5.update(chunk)
        size += len(chunk)
        if part_size is not None:
            part.update(chunk)
            in_part += len(chunk)
            if in_part == part_size:
                parts.append((in_part, part.digest()))
                part = hashlib.md5() if md5 else hashlib.sha256()  # noqa: S324
                in_part = 0
    if part_size is not None and (in_part or not parts):
        parts.append((in_part, part.digest()))
    return _Digests(size, whole.digest(), whole_md5.digest() if whole_md5 else None, tuple(parts))


class _Part(io.RawIOBase):
    """``length`` bytes of a file from ``start``, read with ``pread`` as the client asks for
    them: a part is streamed, never held in memory whole."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + offset), self._length)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def __len__(self) -> int:
        return self._length


class S3Destination:
    """Objects in one bucket under one prefix (see the module docstring).

    Parameters
    ----------
    client
        A boto3 S3 client (thread-safe; the uploader's workers share it).
    bucket, prefix
        Where objects go; ``prefix`` without outer slashes ("" for the bucket's root).
    checksum
        ``"sha256"`` (``x-amz-checksum-sha256``) or ``"md5"`` (``Content-MD5``).
    extra
        Arguments for every object (``ServerSideEncryption``, ``SSEKMSKeyId``, ``StorageClass``).
    multipart_threshold, part_size
        Bytes from which an object goes up in parts, and the size of each part.
    confirm_storage
        Whether :meth:`confirm` proves storage (a ``HEAD`` per object) or answers None.
    label
        For status and logs (no credential).
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        checksum: str = "sha256",
        extra: dict[str, str] | None = None,
        multipart_threshold: int = 64 * _MB,
        part_size: int = 16 * _MB,
        confirm_storage: bool = True,
        label: str | None = None,
    ) -> None:
        if checksum not in ("sha256", "md5"):
            raise ValueError('Argument "checksum" must be "sha256" or "md5".')
        if part_size > multipart_threshold:
            raise ValueError('Argument "part_size" must not exceed "multipart_threshold".')
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.checksum = checksum
        self._extra: dict[str, Any] = dict(extra or {})
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.confirm_storage = confirm_storage
        self.label = label or f"s3:{bucket}/{self.prefix}".rstrip("/")
        self._expected: dict[str, _Digests] = {}
        self._expected_lock = threading.Lock()

    def key(self, row: OutboxRow) -> str:
        """``<prefix>/<study>/<series>/<sop>.dcm`` from the output UIDs."""
        tail = f"{row.study_instance_uid}/{row.series_instance_uid}/{row.sop_instance_uid}.dcm"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    # -- the contract ------------------------------------------------------------------------
    def send(self, items: Sequence[OutboxRow]) -> SendResult:
        result = SendResult()
        for row in items:
            fh = open_row(row, result, uids_name_it=True)
            if fh is None:
                continue
            with fh:
                try:
                    digests = self._upload(fh, self.key(row))
                except _ObjectError as failed:
                    result.failed[row.sop_instance_uid] = (failed.permanent, failed.reason)
                    continue
            self._remember(row.sop_instance_uid, digests)
            result.sent.append(row.sop_instance_uid)
        return result

    def confirm(self, items: Sequence[OutboxRow]) -> set[str] | None:
        """The SOP UIDs among ``items`` whose object the store holds with their size and
        checksum (a ``HEAD`` each); None when ``confirm_storage`` is off."""
        if not self.confirm_storage:
            return None
        proven: set[str] = set()
        for row in items:
            digests = self._expected_for(row)
            if digests is None:
                continue
            try:
                head = self._client.head_object(
                    Bucket=self.bucket, Key=self.key(row), ChecksumMode="ENABLED"
                )
            except Exception as exc:
                error = translate_boto_error(exc)
                if error is None:
                    raise
                if error.status == 404 and "NoSuchBucket" not in str(error):
                    continue  # no such key: not stored
                raise error from None
            if self._matches(head, digests):
                proven.add(row.sop_instance_uid)
        return proven

    def close(self) -> None:
        self._client.close()

    # -- one object --------------------------------------------------------------------------
    def _upload(self, fh: BinaryIO, key: str) -> _Digests:
        size = os.fstat(fh.fileno()).st_size
        multipart = size >= self.multipart_threshold
        digests = _digest_file(
            fh, md5=self.checksum == "md5", part_size=self.part_size if multipart else None
        )
        if digests.size != size:
            raise _ObjectError(False, "file_changed_during_upload")
        fh.seek(0)
        try:
            put = self._put_parts if multipart else self._put
            answer = put(fh, key, digests)
        except _ObjectError:
            raise
        except Exception as exc:
            error = translate_boto_error(exc)
            if error is None:
                raise
            if isinstance(error, RetryableUploadError) and error.status == 400:
                raise _ObjectError(False, str(error)) from None  # damaged in transit
            if isinstance(error, PermanentUploadError) and error.status not in (401, 403, 301, 404):
                raise _ObjectError(True, str(error)) from None  # this object will never go
            raise error from None
        self._check_answer(answer, digests)
        return digests

    def _object_args(self, digests: _Digests) -> dict[str, Any]:
        return {
            "ContentType": "application/dicom",
            "Metadata": {"sha256": digests.sha256.hex()},
            **self._extra,
        }

    def _put(self, fh: BinaryIO, key: str, digests: _Digests) -> dict[str, Any]:
        check: dict[str, Any] = (
            {"ChecksumSHA256": _b64(digests.sha256)}
            if self.checksum == "sha256"
            else {"ContentMD5": _b64(digests.md5 or b"")}
        )
        response = self._client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=fh,
            ContentLength=digests.size,
            **check,
            **self._object_args(digests),
        )
        return dict(response)

    def _put_parts(self, fh: BinaryIO, key: str, digests: _Digests) -> dict[str, Any]:
        self._abort_stale(key)
        create_args = self._object_args(digests)
        if self.checksum == "sha256":
            create_args["ChecksumAlgorithm"] = "SHA256"
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, **create_args
        )["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            offset = 0
            for number, (length, digest) in enumerate(digests.parts, start=1):
                body = _Part(fh.fileno(), offset, length)
                offset += length
                check: dict[str, Any] = (
                    {"ChecksumSHA256": _b64(digest)}
                    if self.checksum == "sha256"
                    else {"ContentMD5": _b64(digest)}
                )
                answer = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,  # type: ignore[arg-type]  # a file-like part (IO-like)
                    ContentLength=length,
                    **check,
                )
                part: dict[str, Any] = {"PartNumber": number, "ETag": answer["ETag"]}
                if self.checksum == "sha256":
                    if answer.get("ChecksumSHA256") not in (None, check["ChecksumSHA256"]):
                        raise _ObjectError(False, "s3 checksum_mismatch")
                    part["ChecksumSHA256"] = check["ChecksumSHA256"]
                elif answer["ETag"].strip('"') != digest.hex():
                    raise _ObjectError(False, "s3 checksum_mismatch")
                parts.append(part)
            done = self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # the store is down: the next attempt aborts it
                log.info("s3_abort_failed", error=type(exc).__name__)
            raise
        return dict(done)

    def _abort_stale(self, key: str) -> None:
        """Abort incomplete uploads of this key (left by a crash or a lost answer): only this
        agent writes a key derived from its keyed UIDs, and the object is about to be sent."""
        listing = self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        for upload in listing.get("Uploads", []) or []:
            if upload.get("Key") == key and upload.get("UploadId"):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload["UploadId"]
                )
                log.info("s3_stale_upload_aborted")

    def _check_answer(self, answer: dict[str, Any], digests: _Digests) -> None:
        """The store's checksum must be ours (it computed it over what it received)."""
        if self.checksum == "sha256":
            got = answer.get("ChecksumSHA256")
            if got is None:
                raise PermanentUploadError(
                    "s3 checksum_unsupported: the store does not answer with the SHA-256 "
                    'checksum; set destination.s3_checksum = "md5"',
                    status=501,
                )
            if got != digests.expected("sha256"):
                raise _ObjectError(False, "s3 checksum_mismatch")
            return
        etag = str(answer.get("ETag") or "").strip('"')
        if self._extra.get("ServerSideEncryption") == "aws:kms":
            return  # SSE-KMS ETags are not MD5s; the store checked Content-MD5 on every part
        if etag != digests.expected("md5"):
            raise _ObjectError(False, "s3 checksum_mismatch")

    def _matches(self, head: Any, digests: _Digests) -> bool:
        if int(head.get("ContentLength", -1)) != digests.size:
            return False
        if self.checksum == "sha256" and head.get("ChecksumSHA256"):
            return bool(head["ChecksumSHA256"] == digests.expected("sha256"))
        etag = str(head.get("ETag") or "").strip('"')
        if self.checksum == "md5" and etag == digests.expected("md5"):
            return True
        metadata = head.get("Metadata") or {}
        return bool(metadata.get("sha256") == digests.sha256.hex())

    # -- expected checksums between send and confirm ----------------------------------------
    def _remember(self, uid: str, digests: _Digests) -> None:
        with self._expected_lock:
            if len(self._expected) >= _EXPECTED_MAX:
                self._expected.pop(next(iter(self._expected)))
            self._expected[uid] = digests

    def _expected_for(self, row: OutboxRow) -> _Digests | None:
        with self._expected_lock:
            digests = self._expected.pop(row.sop_instance_uid, None)
        if digests is not None:
            return digests
        try:  # asked later (a recheck): read the outbox file again
            with row.path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                multipart = size >= self.multipart_threshold
                return _digest_file(
                    fh, md5=self.checksum == "md5", part_size=self.part_size if multipart else None
                )
        except OSError:
            return None


class _ObjectError(Exception):
    """This object failed (``permanent``: it never will go), the others of the batch go on."""

    def __init__(self, permanent: bool, reason: str) -> None:
        self.permanent = permanent
        self.reason = reason
        super().__init__(reason)


# -- from settings ------------------------------------------------------------------------------
def s3_from_settings(s: DestinationSettings, *, client: Any = None) -> S3Destination:
    """Build the S3 destination. Credentials come from the AWS chain (environment, shared files,
    an instance role) or ``aws_credentials_file``; they are never logged. Raises ConfigError for
    a profile or credentials file that cannot be used."""
    assert s.bucket is not None  # the settings validator requires it for s3
    if client is None:
        client = _client(s)
    extra: dict[str, str] = {}
    if s.server_side_encryption != "none":
        extra["ServerSideEncryption"] = s.server_side_encryption
    if s.sse_kms_key_id:
        extra["SSEKMSKeyId"] = s.sse_kms_key_id
    if s.storage_class:
        extra["StorageClass"] = s.storage_class
    label = f"s3:{s.bucket}/{s.prefix}".rstrip("/")
    if s.endpoint_url:
        from urllib.parse import urlsplit

        parts = urlsplit(s.endpoint_url)
        label += f"@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return S3Destination(
        client,
        s.bucket,
        s.prefix,
        checksum=s.s3_checksum,
        extra=extra,
        multipart_threshold=int(s.multipart_threshold_mb * _MB),
        part_size=int(s.multipart_chunk_mb * _MB),
        confirm_storage=s.confirm_storage,
        label=label,
    )


def _client(s: DestinationSettings) -> Any:
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    core = botocore.session.Session()
    if s.aws_credentials_file is not None:
        path = Path(s.aws_credentials_file)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"destination.aws_credentials_file: {path} is not a readable file")
        core.set_config_variable("credentials_file", str(path))
    if s.aws_profile is not None:
        if s.aws_profile not in core.available_profiles:
            raise ConfigError(
                f"destination.aws_profile: no profile {s.aws_profile!r} in the AWS shared files"
            )
        core.set_config_variable("profile", s.aws_profile)
    region = s.region or core.get_config_variable("region") or "us-east-1"
    style = s.s3_addressing_style
    if style == "auto":
        style = "path" if s.endpoint_url else "virtual"
    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": style},
        retries={"total_max_attempts": 1, "mode": "standard"},  # backoff belongs to the outbox
        connect_timeout=min(10.0, s.timeout_seconds),
        read_timeout=s.timeout_seconds,
        max_pool_connections=s.parallel_requests + 2,
        request_checksum_calculation="when_required",  # the agent sends its own checksums
        response_checksum_validation="when_required",
    )
    verify: bool | str = str(s.ca_bundle) if s.ca_bundle is not None else s.verify_tls
    try:
        session = boto3.session.Session(botocore_session=core)
        return session.client("s3", endpoint_url=s.endpoint_url, config=config, verify=verify)
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(f"destination (kind s3): {type(exc).__name__}") from None
