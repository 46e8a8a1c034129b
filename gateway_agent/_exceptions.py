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

A compiled pixel codec that panics on odd input (Rust codecs built with pyo3, such as
pylibjpeg-rle, raise ``PanicException``, a ``BaseException`` that ``except Exception`` lets
through) is turned into ``CodecPanicError``, a ``RuntimeError``, by :func:`codec_panics`.

Programming errors (``TypeError``, ``ValueError`` for bad arguments) are not part of the tree.
Messages never contain PHI: they name reasons, tags and output UIDs, never values or inbox names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = [
    "REASONS",
    "CodecPanicError",
    "ConfigError",
    "DeidError",
    "GatewayError",
    "IngestError",
    "PermanentUploadError",
    "QCError",
    "RetryableUploadError",
    "UploadError",
    "codec_panics",
]


class GatewayError(Exception):
    """Base of every error gateway-agent raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is invalid; the message names each key and what is allowed."""


#: Every reason an input can be refused for (the quarantine's ``reason``), with what it means.
REASONS: dict[str, str] = {
    "not_dicom": "not a DICOM part-10 file",
    "empty_file": "the file is empty",
    "truncated": "the file ends early (cut short, or still being written)",
    "unreadable": "the file cannot be read",
    "unreadable_header": "the DICOM header is malformed",
    "no_sop_instance_uid": "no SOP Instance UID (0008,0018)",
    "missing_uid": "no Study, Series Instance or SOP Class UID",
    "unsupported_transfer_syntax": "the transfer syntax is not supported",
    "burned_in_annotation": "the pixels may carry burned-in text (policy: quarantine, or "
    "a photograph, slide or document, which text cleaning does not make safe)",
    "burned_in_text_remaining": "identity still readable after Clean Pixel Data",
    "burned_in_undecodable": "the pixels of an object at risk cannot be decoded or re-encoded",
    "dicomdir": "a DICOMDIR media index, not an instance",
    "path_too_long": "its path is longer than the system allows (4096 bytes)",
    "too_large": "too large to process in memory",
    "internal_error": "de-identification failed unexpectedly",
}


class IngestError(GatewayError):
    """An input file cannot be processed; ``reason`` is a stable slug for the quarantine record.

    ``reason`` is one of :data:`REASONS`; ``detail`` says more and is never empty (without one,
    the reason's description from :data:`REASONS`). Neither carries values from the input.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or REASONS.get(reason, reason.replace("_", " "))
        super().__init__(f"{reason}: {self.detail}")


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


class CodecPanicError(RuntimeError):
    """A compiled pixel codec gave up on its input by panicking (see :func:`codec_panics`)."""


@contextlib.contextmanager
def codec_panics() -> Iterator[None]:
    """Run pixel decoding or encoding with a codec's panic raised as ``CodecPanicError``.

    A Rust codec's ``PanicException`` derives from ``BaseException``: uncaught, it would end the
    intake worker (or the QC pass) instead of refusing one bad file. Its message is not kept
    (it may quote the input).
    """
    try:
        yield
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise CodecPanicError("the pixel codec panicked on this input") from None
