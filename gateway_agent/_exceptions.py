"""The one exception tree of gateway-agent; every error a caller may handle is drawn here.

::

    GatewayError                      base of everything below
    ├── ConfigError                   settings invalid or missing (CLI exit status 2)
    ├── IngestError(reason)           an input cannot be taken or de-identified safely;
    │   │                             ``reason`` is a machine-readable slug used for quarantine
    │   └── DeidError(reason)         the de-identification engine refused the input
    ├── QCError                       QC could not compute features for an image
    └── UploadError                   an upload failed
        ├── RetryableUploadError      network error, timeout, 408, 429, 5xx (retry later)
        └── PermanentUploadError      other 4xx: retrying the same bytes will not help

Programming errors (``TypeError``, ``ValueError`` for bad arguments) are not part of the tree.
Messages never contain PHI: they name reasons, tags and output UIDs, never values or inbox names.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeidError",
    "GatewayError",
    "IngestError",
    "PermanentUploadError",
    "QCError",
    "RetryableUploadError",
    "UploadError",
]


class GatewayError(Exception):
    """Base of every error gateway-agent raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names each key and what is allowed."""


class IngestError(GatewayError):
    """An input file cannot be processed; ``reason`` is a stable slug for the quarantine record.

    Reasons in use: ``not_dicom``, ``empty_file``, ``truncated``, ``unreadable_header``,
    ``no_sop_instance_uid``, ``missing_uid``, ``unsupported_transfer_syntax``,
    ``burned_in_annotation``, ``dicomdir``, ``too_large``, ``internal_error``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class DeidError(IngestError):
    """The de-identification engine refused an input (see ``IngestError.reason``)."""


class QCError(GatewayError):
    """QC features could not be computed for an image."""


class UploadError(GatewayError):
    """An upload to a destination failed.

    ``status`` is the HTTP status when there was one; ``retry_after`` the server's hint in seconds.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class RetryableUploadError(UploadError):
    """Transient: network error, timeout, 408, 429 or 5xx. The outbox schedules a retry."""


class PermanentUploadError(UploadError):
    """Permanent for these bytes (4xx other than 408/429). The outbox marks the row dead."""
