"""Settings: defaults < TOML file < GATEWAY_* environment (nested ``__``) < command-line flags."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ._exceptions import ConfigError

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "DeidSettings",
    "DestinationSettings",
    "DiskSettings",
    "ListenerSettings",
    "LogSettings",
    "MatchSettings",
    "MetricsSettings",
    "QCSettings",
    "Settings",
    "load_settings",
    "parse_dicom_address",
    "read_secret_file",
    "validate_ae_title",
    "parse_s3_url",
]

DEFAULT_CONFIG_FILE = Path("/etc/gateway-agent/config.toml")


def validate_ae_title(value: str, what: str) -> str:
    """An Application Entity title as PS3.5 allows it: 1 to 16 characters of the default
    repertoire, no backslash or control character, not only spaces; outer spaces are dropped."""
    title = value.strip(" ")
    if not title:
        raise ValueError(f"{what} must not be empty (an AE title has 1 to 16 characters)")
    if len(title) > 16:
        raise ValueError(f"{what} must not exceed 16 characters (AE title, got {len(title)})")
    if not title.isascii() or any(c == "\\" or not c.isprintable() for c in title):
        raise ValueError(f"{what} must be printable ASCII without backslash (AE title)")
    return title


def parse_dicom_address(value: str) -> tuple[str, str, int]:
    """``CALLED_AE@HOST:PORT`` (``[v6]`` hosts in brackets) -> ``(ae, host, port)``.

    >>> parse_dicom_address("PACS@10.0.0.5:104")
    ('PACS', '10.0.0.5', 104)
    """
    ae, sep, address = value.rpartition("@")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not port.isdigit() or not host:
        raise ValueError(f"expected CALLED_AE@HOST:PORT, got {value!r}")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    return validate_ae_title(ae, "the called AE title"), host.strip("[]"), int(port)


class _Section(BaseModel):
    # A setting's description is the docstring under it (the configuration reference shows it).
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class DeidSettings(_Section):
    """De-identification options: the ten PS3.15 Annex E options plus the pixel policy."""

    retain_safe_private: bool = False
    """Retain Safe Private option: keep the private attributes of PS3.15 Table E.3.10-1 (479 vendor
    attributes known to hold no identity; private pixel data excepted); every other private
    attribute is removed."""
    retain_uids: bool = False
    """Retain UIDs option: keep the original UIDs instead of keyed 2.25.<hmac> UIDs."""
    retain_device_identity: bool = False
    """Retain Device Identity option: keep device serial numbers, station names and the like."""
    retain_institution_identity: bool = False
    """Retain Institution Identity option: keep institution names and addresses."""
    retain_patient_characteristics: bool = False
    """Retain Patient Characteristics option: keep age, sex, size, weight and similar."""
    retain_long_full_dates: bool = False
    """Retain Longitudinal Temporal Information with Full Dates: keep dates as they are (wins over
    retain_long_modified_dates)."""
    retain_long_modified_dates: bool = True
    """Retain Longitudinal Temporal Information with Modified Dates: keep dates, shifted by a keyed
    per-patient offset of 1 to 365 days back."""
    clean_descriptors: bool = True
    """Clean Descriptors option: keep descriptions and comments, with identifying words replaced by
    ***."""
    clean_structured_content: bool = False
    """Clean Structured Content option: keep structured report content, cleaned."""
    clean_graphics: bool = False
    """Clean Graphics option: keep curves and graphic annotations with their text cleaned (overlay
    bitmaps only with burned_in = "allow")."""
    burned_in: Literal["clean", "quarantine", "allow"] = "clean"
    """Images whose pixels may show patient data (BurnedInAnnotation YES, ultrasound, secondary
    captures and screen grabs, dose screens and screen saves, derived X-ray angiography and
    fluoroscopy images, devices known to burn text in, photos, documents; the full list is in
    docs/deidentification.md): "clean" paints burned-in text out of the images, verifies that no
    identity is readable and quarantines what cannot be verified (photos and documents stay
    quarantined); "quarantine" holds them all back; "allow" sends them as they are."""
    station_name: str | None = Field(default=None, max_length=16)
    """StationName written into every output (at most 16 characters). Default: unit_name."""
    secret_file: Path | None = None
    """The site secret that keys UIDs, pseudonyms and date shifts; created with mode 0600 on first
    use. Back it up: without it, re-sent studies get new UIDs. Default: <state_dir>/secret.key."""

    @model_validator(mode="after")
    def _dates(self) -> DeidSettings:
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            # Full dates win; modified dates would shift what the user asked to keep.
            self.retain_long_modified_dates = False
        return self


#: A destination's name: lower-case letters, digits, ``-``, ``_`` and ``.``; used in ``status``,
#: metric labels, logs and ``retry --destination``.
DESTINATION_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
#: The name of the destination configured with the single ``[destination]`` table.
DEFAULT_DESTINATION = "default"


def parse_s3_url(value: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> ``(bucket, prefix)`` (the prefix without outer slashes).

    >>> parse_s3_url("s3://research-archive/site-a/ct")
    ('research-archive', 'site-a/ct')
    """
    if not value.startswith("s3://"):
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {value!r}")
    bucket, _, prefix = value[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {value!r}")
    return bucket, prefix.strip("/")


class MatchSettings(_Section):
    """Which instances a destination receives; every key given must match (values of one key are
    alternatives). No key: every instance. Attributes are those of the de-identified output."""

    modality: list[str] = Field(default_factory=list)
    """Modality values (CT, MR, SR...), e.g. ["CT", "MR"]."""
    sop_class_uid: list[str] = Field(default_factory=list)
    """SOP Class UIDs; a trailing .* matches a family, e.g. "1.2.840.10008.5.1.4.1.1.88.*" for every
    structured report."""
    inbox_folder: list[str] = Field(default_factory=list)
    """Sub-folders of the inbox (the first folder under it) the file was dropped into, e.g.
    ["ct-scanner-1"]; "" is the inbox itself."""
    calling_ae: list[str] = Field(default_factory=list)
    """Calling AE titles of the scanners that sent the instance over C-STORE."""

    @model_validator(mode="after")
    def _values(self) -> MatchSettings:
        self.modality = [m.strip().upper() for m in self.modality]
        self.calling_ae = [a.strip(" ") for a in self.calling_ae]
        for uid in self.sop_class_uid:
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*(\.\*)?", uid):
                raise ValueError(
                    f"match.sop_class_uid: {uid!r} is not a UID (digits and dots, optionally "
                    "ending in .*)"
                )
        for folder in self.inbox_folder:
            if "/" in folder or folder in (".", ".."):
                raise ValueError(
                    f"match.inbox_folder: {folder!r} must be one folder name directly under the "
                    'inbox ("" for the inbox itself)'
                )
        return self

    @property
    def empty(self) -> bool:
        """True when no key is given: every instance matches."""
        return not (self.modality or self.sop_class_uid or self.inbox_folder or self.calling_ae)


class DestinationSettings(_Section):
    """Where de-identified instances go."""

    name: str = DEFAULT_DESTINATION
    """The destination's name in status, metrics, logs and retry --destination (lower-case letters,
    digits, - _ .; at most 32 characters). Required in [[destinations]]; the single [destination] is
    named default."""
    kind: Literal["folder", "dicomweb", "dicom", "s3"] = "folder"
    """ "folder": a local folder; "dicomweb": a DICOMweb server (STOW-RS), such as Orthanc or a
    PACS; "dicom": a PACS or any DICOM node over C-STORE; "s3": an S3 bucket (AWS or any
    S3-compatible store)."""
    match: MatchSettings = Field(default_factory=MatchSettings)
    """Which instances this destination receives (see the match table); none given: every
    instance."""
    folder: Path = Path("destination")
    """Where kind = "folder" writes <study>/<series>/<instance>.dcm."""
    url: str | None = None
    """DICOMweb base URL, e.g. http://127.0.0.1:8042/dicom-web; required when kind = "dicomweb"."""
    auth: Literal["none", "basic", "bearer"] = "none"
    """ "basic" (username and password) or "bearer" (token)."""
    username: str | None = None
    """User name for auth = "basic"."""
    password: SecretStr | None = None
    """Password for auth = "basic"; prefer password_file or GATEWAY_DESTINATION__PASSWORD to the
    TOML file."""
    password_file: Path | None = None
    """File holding the password (mode 0600), read at start-up."""
    token: SecretStr | None = None
    """Token for auth = "bearer"; prefer token_file or GATEWAY_DESTINATION__TOKEN to the TOML
    file."""
    token_file: Path | None = None
    """File holding the token (mode 0600), read at start-up."""
    host: str | None = None
    """The peer's host name or address (kind = "dicom")."""
    port: int = Field(default=104, ge=1, le=65535)
    """The peer's DICOM port (kind = "dicom"; 2762 by convention with TLS)."""
    called_ae: str | None = None
    """The peer's AE title (kind = "dicom"), as its administrator registered it."""
    calling_ae: str | None = None
    """Our AE title towards the peer (kind = "dicom", at most 16 characters); default unit_name. The
    PACS must know it."""
    tls: bool = False
    """DICOM TLS (PS3.15 Annex B) to the peer (kind = "dicom"); verify_tls, ca_bundle, client_cert
    and client_key apply as for HTTPS."""
    idle_release_seconds: float = Field(default=5.0, ge=0)
    """kind = "dicom": an association is reused while work keeps coming and released after this many
    seconds without any."""
    bucket: str | None = None
    """The bucket (kind = "s3"); it must exist."""
    prefix: str = ""
    """Key prefix (kind = "s3"): objects are stored as
    <prefix>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm."""
    endpoint_url: str | None = None
    """An S3-compatible store's URL (kind = "s3"), e.g. http://127.0.0.1:8333 for SeaweedFS or
    MinIO; unset: AWS."""
    region: str | None = None
    """The bucket's region (kind = "s3"); unset: from the AWS configuration (AWS_REGION,
    ~/.aws/config), else us-east-1."""
    aws_profile: str | None = None
    """A named profile of the AWS shared files (kind = "s3"); unset: the standard chain (AWS_*
    environment, ~/.aws/credentials, an instance role)."""
    aws_credentials_file: Path | None = None
    """An AWS shared credentials file (INI, mode 0600) to read instead of ~/.aws/credentials (kind =
    "s3"); aws_profile picks the section."""
    server_side_encryption: Literal["none", "AES256", "aws:kms"] = "none"
    """Ask the store to encrypt objects at rest (kind = "s3"): "AES256" (SSE-S3) or "aws:kms"
    (SSE-KMS, with sse_kms_key_id or the bucket's key)."""
    sse_kms_key_id: str | None = None
    """The KMS key for server_side_encryption = "aws:kms"."""
    storage_class: str | None = None
    """S3 storage class of new objects (kind = "s3"), e.g. "STANDARD_IA"; unset: the bucket's
    default."""
    s3_checksum: Literal["sha256", "md5"] = "sha256"
    """Integrity check of every upload (kind = "s3"): "sha256" sends x-amz-checksum-sha256, which
    the store verifies and keeps; "md5" sends Content-MD5, for stores without SHA-256 checksums."""
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """ "path" (http://host/bucket/key) or "virtual" (http://bucket.host/key); "auto": path with
    endpoint_url, virtual on AWS."""
    multipart_threshold_mb: float = Field(default=64.0, ge=5)
    """Objects of this size or larger are uploaded in parts (kind = "s3")."""
    multipart_chunk_mb: float = Field(default=16.0, ge=5, le=5120)
    """Size of each part (kind = "s3"); each part is streamed from the file, never held in memory
    whole."""
    verify_tls: bool = True
    """Verify the server's TLS certificate (against ca_bundle if set)."""
    ca_bundle: Path | None = None
    """CA certificates (PEM) to verify the server against."""
    client_cert: Path | None = None
    """Client certificate (PEM) for servers that require one."""
    client_key: Path | None = None
    """The client certificate's key."""
    timeout_seconds: float = Field(default=30.0, gt=0)
    """Deadline of a whole reply, counted from the moment the request is sent; a server that does
    not answer completely by then counts as down (the request is retried later)."""
    min_kb_per_second: float = Field(default=64.0, gt=0)
    """Slowest upload tolerated: sending a request may take timeout_seconds plus its size at this
    speed (kB/s); a server that reads it more slowly counts as stalled."""
    batch_max_instances: int = Field(default=25, ge=1, le=1000)
    """Instances per STOW-RS request (kind = "dicom": per turn on an association), at most."""
    batch_max_mb: float = Field(default=16.0, gt=0)
    """Megabytes per STOW-RS request (or turn), at most."""
    parallel_requests: int = Field(default=4, ge=1, le=32)
    """Requests in flight at once (kind = "dicom": associations in parallel)."""
    max_attempts: int = Field(default=20, ge=1)
    """An instance goes to dead after this many failed attempts (attempts made while the server is
    down or refuses the credentials do not count)."""
    max_age_hours: float = Field(default=72.0, gt=0)
    """An instance still not delivered after this many hours goes to dead."""
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    """Retry delay: random up to min(backoff_cap_seconds, backoff_base_seconds * 2^failures); a
    server's Retry-After is honoured."""
    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    """The longest retry delay."""
    confirm_storage: bool = True
    """Prove that the server holds each acknowledged instance (DICOMweb: QIDO-RS; DICOM: C-FIND at
    IMAGE level; S3: a HEAD comparing size and checksum; batched) before counting it sent. Off:
    acknowledgements are trusted, and the outbox files of such instances are kept (see
    disk.keep_unconfirmed)."""

    @property
    def target(self) -> str:
        """Where instances go, for people and logs: ``folder /abs/path``,
        ``dicomweb https://host:port/path``, ``dicom PACS@host:104`` or
        ``s3 s3://bucket/prefix [at https://host:port]`` (never credentials)."""
        if self.kind == "folder":
            return f"folder {Path(self.folder).resolve()}"
        if self.kind == "dicom":
            tls = " (TLS)" if self.tls else ""
            return f"dicom {self.called_ae}@{self.host}:{self.port}{tls}"
        if self.kind == "s3":
            where = f"s3 s3://{self.bucket}/{self.prefix}".rstrip("/")
            if self.endpoint_url:
                where += f" at {_url_without_credentials(self.endpoint_url)}"
            return where
        return f"{self.kind} {_url_without_credentials(self.url or '')}"

    @model_validator(mode="after")
    def _name(self) -> DestinationSettings:
        if not DESTINATION_NAME_RE.match(self.name):
            raise ValueError(
                f"destination name {self.name!r}: use 1 to 32 lower-case letters, digits, "
                '"-", "_" or "." (starting with a letter or digit)'
            )
        return self

    @model_validator(mode="after")
    def _s3(self) -> DestinationSettings:
        if self.kind == "s3" and not self.bucket:
            raise ValueError(
                'destination.bucket is required when destination.kind = "s3" '
                "(or run --destination-s3 s3://BUCKET/PREFIX)"
            )
        self.prefix = self.prefix.strip("/")
        if self.endpoint_url is not None:
            _check_http_url(
                self.endpoint_url,
                "destination.endpoint_url",
                ": use the AWS credential chain or destination.aws_credentials_file",
            )
        if self.sse_kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError(
                "destination.sse_kms_key_id is set but destination.server_side_encryption is not "
                '"aws:kms"'
            )
        if self.multipart_chunk_mb > self.multipart_threshold_mb:
            raise ValueError(
                "destination.multipart_chunk_mb must not exceed destination.multipart_threshold_mb"
            )
        return self

    @model_validator(mode="after")
    def _dicom(self) -> DestinationSettings:
        for name in ("called_ae", "calling_ae"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, validate_ae_title(value, f"destination.{name}"))
        if self.kind == "dicom" and not (self.host and self.called_ae):
            raise ValueError(
                'destination.kind = "dicom" needs destination.host, destination.port and '
                "destination.called_ae (or run --destination-dicom CALLED_AE@HOST:PORT)"
            )
        return self

    @model_validator(mode="after")
    def _url(self) -> DestinationSettings:
        if self.kind == "dicomweb" and not self.url:
            raise ValueError('destination.url is required when destination.kind = "dicomweb"')
        if self.url:
            _check_http_url(
                self.url,
                "destination.url",
                ' (user:password@): set destination.auth = "basic" with username and password_file',
            )
        return self

    @model_validator(mode="after")
    def _auth(self) -> DestinationSettings:
        for name in ("password", "token"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"set destination.{name} or destination.{name}_file, not both")
        if self.auth == "basic" and not (self.username and (self.password or self.password_file)):
            raise ValueError(
                'destination.auth = "basic" needs destination.username and '
                "destination.password (or password_file)"
            )
        if self.auth == "bearer" and not (self.token or self.token_file):
            raise ValueError('destination.auth = "bearer" needs destination.token (or token_file)')
        if self.auth == "none":
            given = [
                name
                for name in ("username", "password", "password_file", "token", "token_file")
                if getattr(self, name) is not None
            ]
            if given:
                raise ValueError(
                    f'destination.{given[0]} is set but destination.auth = "none" would not '
                    'send it: set destination.auth = "basic" or "bearer", or remove it'
                )
        return self


class ListenerSettings(_Section):
    """The C-STORE listener (DICOM Storage SCP): scanners push here; one more inbox when on."""

    enabled: bool = False
    """Receive instances over C-STORE (and answer C-ECHO); off by default."""
    ae_title: str | None = None
    """Our AE title as the scanners call it (at most 16 characters); default unit_name. Associations
    calling another title are rejected."""
    host: str = "0.0.0.0"  # noqa: S104  (scanners on the network must reach it)
    """Address to listen on; 0.0.0.0 is every interface."""
    port: int = Field(default=11112, ge=0, le=65535)
    """TCP port (104 needs root; 11112 is the usual unprivileged one)."""
    allowed_calling_aes: list[str] = Field(default_factory=list)
    """Calling AE titles accepted (empty: any); an association from any other title is rejected."""
    max_associations: int = Field(default=10, ge=1, le=256)
    """Associations at once; more are rejected (transient, the sender retries)."""
    timeout_seconds: float = Field(default=60.0, gt=0)
    """A peer silent this long (during association, a message or between messages) is dropped."""

    @model_validator(mode="after")
    def _titles(self) -> ListenerSettings:
        if self.ae_title is not None:
            self.ae_title = validate_ae_title(self.ae_title, "listener.ae_title")
        self.allowed_calling_aes = [
            validate_ae_title(ae, "listener.allowed_calling_aes") for ae in self.allowed_calling_aes
        ]
        return self


def _check_http_url(url: str, key: str, instead: str) -> None:
    """``url`` starts with http:// or https:// and names no user or password; ``instead`` ends
    the error message with what to do instead."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{key} must start with http:// or https://")
    if "@" in url.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(f"{key} must not carry credentials{instead}")


def _url_without_credentials(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


class QCSettings(_Section):
    """Periodic QC inside the agent."""

    enabled: bool = True
    """Run QC passes inside the agent."""
    interval_seconds: float = Field(default=300.0, gt=0)
    """Seconds between passes."""
    slices_per_series: int = Field(default=3, ge=1)
    """Instances measured per series, spread over the series."""
    n_clusters: int = Field(default=2, ge=1, le=20)
    """Groups the fleet model sorts scans into."""
    max_cpu_fraction: float = Field(default=0.05, gt=0, le=1)
    """CPU budget of one QC pass as a fraction of interval_seconds on one core; instances beyond it
    are passed over (counted as skipped_budget)."""
    scanner_ttl_hours: float = Field(default=168.0, gt=0)
    """A scanner not measured for this long drops out of the per-scanner metrics."""
    max_scanners: int = Field(default=500, ge=1)
    """At most this many scanners (the most recently measured) in the metrics."""


class MetricsSettings(_Section):
    """Prometheus metrics and health endpoints."""

    enabled: bool = True
    """Serve /metrics, /healthz and /readyz over HTTP."""
    host: str = "127.0.0.1"
    """Address to listen on; keep loopback unless a scraper elsewhere needs it."""
    port: int = Field(default=9464, ge=0, le=65535)
    """Port; 0 picks a free one."""
    ready_upload_window_seconds: float = Field(default=300.0, gt=0)
    """/readyz and status report the upload as stalled when rows have waited this many seconds and
    nothing was delivered within them."""
    ready_max_waiting: int = Field(default=10000, ge=0)
    """With nothing delivered within ready_upload_window_seconds, /readyz is also not ready once
    more than this many rows wait..."""
    ready_max_waiting_age_seconds: float = Field(default=3600.0, gt=0)
    """...or the oldest waiting row is older than this many seconds."""


class DiskSettings(_Section):
    """Operating limits on the state folder."""

    min_free_mb: float = Field(default=500.0, ge=0)
    """Intake pauses below this much free space on the state folder's file system (originals wait in
    the inbox) and resumes 10 % above it; 0 turns the guard off."""
    sent_retention_hours: float = Field(default=24.0, ge=0)
    """Outbox files of delivered instances are removed this many hours after the destination proved
    it holds them."""
    keep_unconfirmed: bool = True
    """Keep the outbox files of instances the destination acknowledged without proving it holds them
    (confirmation off, or a destination that cannot prove it); false removes them after
    sent_retention_hours like proven ones."""
    audit_retention_days: float = Field(default=365.0, gt=0)
    """Outbox rows of delivered instances (the audit trail) are kept this many days, then
    deleted."""
    check_interval_seconds: float = Field(default=10.0, gt=0)
    """How often the disk guard measures free space while nothing arrives (seconds)."""


class LogSettings(_Section):
    """Logging: JSON when not on a terminal, console on a terminal."""

    format: Literal["auto", "json", "console"] = "auto"
    """ "auto": JSON lines when stdout is not a terminal (journald, Docker), colour on a
    terminal."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level written."""


class Settings(BaseSettings):
    """Everything gateway-agent reads at start-up (build it with :func:`load_settings`).

    Parameters
    ----------
    **values
        Field values by name; sections (``deid``, ``destination``, ``qc``, ``metrics``,
        ``disk``, ``log``) as dicts or their models. ``GATEWAY_*`` variables fill the rest
        (nested keys with ``__``: ``GATEWAY_DESTINATION__URL``).

    Raises
    ------
    pydantic.ValidationError
        A value is invalid (:func:`load_settings` turns this into a :class:`ConfigError`).
    """

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    inbox: Path = Path("inbox")
    """The folder scanners drop DICOM files into."""
    state_dir: Path = Path("state")
    """The agent's own state: outbox.db, outbox files, quarantine, QC reports and the site secret
    (mode 0700)."""
    unit_name: str = Field(default="EDGE01", max_length=16)
    """Name of this edge box (at most 16 characters); the default StationName and the default AE
    title of the DICOM destination and listener."""
    settle_seconds: float = Field(default=2.0, ge=0)
    """A file whose writer did not signal its end counts as complete once its size and modification
    time stayed unchanged this long."""
    originals: Literal["delete", "archive", "keep"] = "delete"
    """What happens to an original once its de-identified copy is safe: "delete", "archive" (moved
    to archive_dir) or "keep" (left in place and remembered, for read-only inboxes)."""
    archive_dir: Path | None = None
    """Where originals go with originals = "archive"."""
    intake_workers: int = Field(default_factory=lambda: max(1, os.cpu_count() or 1), ge=1)
    """De-identification processes. Default: the number of CPUs."""
    deid: DeidSettings = DeidSettings()
    destination: DestinationSettings = DestinationSettings()
    destinations: list[DestinationSettings] = Field(default_factory=list)
    """Several destinations, each a [[destinations]] table with a name, a kind, the kind's settings
    and an optional [destinations.match]; every instance goes to every destination it matches.
    Replaces [destination]."""
    listener: ListenerSettings = ListenerSettings()
    qc: QCSettings = QCSettings()
    metrics: MetricsSettings = MetricsSettings()
    disk: DiskSettings = DiskSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _archive(self) -> Settings:
        if self.originals == "archive" and self.archive_dir is None:
            raise ValueError('archive_dir is required when originals = "archive"')
        return self

    @model_validator(mode="after")
    def _unit_name(self) -> Settings:
        # The unit name is the default AE title on both sides: it must be a valid one then.
        for d in self.all_destinations:
            if d.kind == "dicom" and d.calling_ae is None:
                validate_ae_title(self.unit_name, "unit_name (the default destination.calling_ae)")
        if self.listener.enabled and self.listener.ae_title is None:
            validate_ae_title(self.unit_name, "unit_name (the default listener.ae_title)")
        return self

    @property
    def calling_ae(self) -> str:
        """Our AE title towards the single ``[destination]`` when it is a DICOM one."""
        return self.calling_ae_for(self.destination)

    def calling_ae_for(self, destination: DestinationSettings) -> str:
        """Our AE title towards a DICOM destination: its ``calling_ae``, else the unit name."""
        return destination.calling_ae or self.unit_name.strip(" ")

    @property
    def listener_ae(self) -> str:
        """Our AE title as a C-STORE listener."""
        return self.listener.ae_title or self.unit_name.strip(" ")

    @model_validator(mode="after")
    def _destinations(self) -> Settings:
        if not self.destinations:
            return self
        if "destination" in self.model_fields_set:
            raise ValueError(
                "set [destination] (or a --destination-* flag, GATEWAY_DESTINATION__*) or "
                "[[destinations]], not both: move the single destination into [[destinations]] "
                'with name = "default" to keep its queue'
            )
        seen: set[str] = set()
        for i, d in enumerate(self.destinations):
            if "name" not in d.model_fields_set:
                raise ValueError(f"destinations[{i}] ({d.kind}) needs a name")
            if d.name in seen:
                raise ValueError(f"destinations: the name {d.name!r} is used twice")
            seen.add(d.name)
        return self

    @property
    def all_destinations(self) -> list[DestinationSettings]:
        """The destinations in effect: ``[[destinations]]``, else the single ``[destination]``
        (named ``default``)."""
        return list(self.destinations) if self.destinations else [self.destination]

    @property
    def secret_file(self) -> Path:
        return self.deid.secret_file or self.state_dir / "secret.key"

    @property
    def station_name(self) -> str:
        return self.deid.station_name or self.unit_name

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry TOML merged with CLI flags (see load_settings); env sits between.
        return (_OverridesSource(settings_cls), env_settings, init_settings)


class _OverridesSource(PydanticBaseSettingsSource):
    """Command-line flags: the highest precedence, set through ``load_settings(overrides=...)``."""

    current: ClassVar[dict[str, Any]] = {}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.current.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.current)


def _deep_set(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a ConfigError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


_SECRET_PARTS = ("password", "token", "secret", "key")


def _describe_error(err: Any, toml: dict[str, Any], flags: dict[str, Any]) -> str:
    """One line: which key, what was wrong (what is allowed), the value given and where from."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "(settings)"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model: Any = Settings
        for part in loc[:-1]:
            model = getattr(model.model_fields.get(part), "annotation", None)
        allowed = ", ".join(getattr(model, "model_fields", {})) or "none"
        msg = f"unknown setting (allowed here: {allowed})"
    value = err.get("input")
    if isinstance(value, str | int | float | bool) and loc and err["type"] != "extra_forbidden":
        secret = any(s in loc[-1] for s in _SECRET_PARTS) or (
            isinstance(value, str) and "@" in value
        )
        shown = "***" if secret else repr(value)[:60]
        msg += f" (got {shown})"

    def has(tree: dict[str, Any]) -> bool:
        for part in loc:
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return bool(loc)

    env = "GATEWAY_" + "__".join(loc).upper()
    if has(flags):
        msg += " [from the command line]"
    elif any(k.upper() == env for k in os.environ):
        msg += f" [from {env}]"
    elif has(toml):
        msg += " [from the config file]"
    return f"{key}: {msg}"


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the Settings from their layers: defaults < TOML file < ``GATEWAY_*`` < flags.

    Parameters
    ----------
    config_file
        The TOML file; None means ``/etc/gateway-agent/config.toml`` if it exists.
    overrides
        Dotted keys (``"destination.url"``) to values from the command line; None values are
        ignored.

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        One line per problem: the key, what is allowed, where the value came from (secrets
        masked). Also for a ``GATEWAY_*`` variable that names no setting or holds bad JSON.
    """
    toml: dict[str, Any] = {}
    if config_file is not None:
        toml = read_toml(config_file)
    elif DEFAULT_CONFIG_FILE.is_file():
        toml = read_toml(DEFAULT_CONFIG_FILE)
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _deep_set(flags, key, value)
    unknown = _unknown_variables(os.environ)
    _OverridesSource.current = flags
    try:
        settings = Settings(**toml)
    except SettingsError as exc:
        # A GATEWAY_* variable that must hold JSON (a section, a list) does not.
        raise ConfigError(f"invalid configuration: {_settings_error(exc)}") from None
    except ValidationError as exc:
        lines = unknown + [_describe_error(err, toml, flags) for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    finally:
        _OverridesSource.current = {}
    if unknown:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(unknown))
    return settings


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``GATEWAY_*`` variable that names no setting (``GATEWAY_INBX``).

    pydantic-settings ignores such variables at the top level (it reports nested ones): a typo
    would silently leave the default in force.
    """
    lines = []
    for var in sorted(environ):
        if not var.upper().startswith("GATEWAY_"):
            continue
        name = var[len("GATEWAY_") :].split("__", 1)[0].lower()
        if name not in Settings.model_fields:
            close = difflib.get_close_matches(name, list(Settings.model_fields), n=1)
            hint = (
                f"did you mean GATEWAY_{close[0].upper()}?"
                if close
                else "allowed: " + ", ".join(f"GATEWAY_{f.upper()}" for f in Settings.model_fields)
            )
            lines.append(f"{var}: unknown setting [from the environment] ({hint})")
    return lines


def read_secret_file(path: Path, key: str) -> str:
    """The secret held in a file (outer white space dropped), for the setting or flag ``key``
    that names it; an unreadable or empty file is a ConfigError naming ``key``, never the value."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read the file ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"{key}: the file is empty")
    return value


def _settings_error(exc: SettingsError) -> str:
    """The variable a SettingsError is about, without its value (it may hold a credential)."""
    text = str(exc)
    match = re.search(r'field "(\w+)" from source "(\w+)"', text)
    if match is None:
        return "a GATEWAY_* variable could not be parsed (sections and lists take JSON)"
    var = "GATEWAY_" + match.group(1).upper()
    return f'{var}: not valid JSON (a section takes a JSON object, e.g. \'{{"folder": "out"}}\')'
