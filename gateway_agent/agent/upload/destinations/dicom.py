"""Destination kind ``dicom``: C-STORE to a PACS or any DICOM node (pynetdicom, via StoreSCU).

Each ``send`` goes over one association of :class:`~gateway_agent.dicom.scu.StoreSCU` (reused
while work keeps coming, released after ``idle_release_seconds``; the uploader's
``parallel_requests`` workers each use their own), the files streamed from the outbox as stored.
The peer's answers map onto the contract (``destinations/__init__.py``) like DICOMweb's
per-instance results:

==================================================  ===========================================
the peer answers                                    result
==================================================  ===========================================
0x0000 success                                      ``sent``
0xB000 / 0xB006 / 0xB007 (any 0xBxxx) warning       ``sent``, the warning in ``warnings``
0xA7xx refused: out of resources                    ``failed`` (retry with the row's backoff)
0xA9xx, 0xCxxx, 0x0122 ... and refused presentation ``failed`` permanently → ``dead``, with the
contexts (SOP class or transfer syntax not taken)   status and its meaning as the reason
association rejected, aborted, timed out, refused   ``RetryableUploadError``: the destination is
                                                    down (circuit, backoff)
A-ASSOCIATE-RJ: called / calling AE title not       ``PermanentUploadError(status=403)``: the
recognised                                          destination refuses the agent (a
                                                    misconfiguration; ``status`` says so)
==================================================  ===========================================

When the association is lost after the peer answered part of the batch, the answered instances
are recorded and the rest retried on their own; only a batch that got no answer at all reports
the destination down.

Storage is proven with C-FIND (Study Root, IMAGE level, one query per series and 40 UIDs, on an
association of its own): a PACS that answers queries lists what it holds. A peer that refuses
queries from the agent (its AE title not allowed to query, no Query/Retrieve) leaves the rows
acknowledged with their proof pending and their outbox files kept, and ``status`` says what to
do (allow the agent's AE title to query, or ``confirm_storage = false``). Storage Commitment is
not used: its answer comes back on an association the peer opens to the agent.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from ...._exceptions import ConfigError, PermanentUploadError, RetryableUploadError
from ....config import DestinationSettings
from ....dicom.network import Outcome, client_ssl_context
from ....dicom.query import QueryRefusedError, find_instances
from ....dicom.scu import AssociationError, StoreItem, StoreResult, StoreSCU
from ...outbox.db import OutboxRow
from . import SendResult

__all__ = ["DicomDestination", "dicom_from_settings"]

#: ``PermanentUploadError.status`` for "the peer does not know our AE titles" (the contract's
#: "refuses the agent"; there is no HTTP status in DICOM).
REFUSED_STATUS = 403


class DicomDestination:
    """C-STORE to one peer through a :class:`StoreSCU`."""

    def __init__(self, scu: StoreSCU, *, confirm_storage: bool = True) -> None:
        self._scu = scu
        self.confirm_storage = confirm_storage
        tls = " tls" if scu.ssl_context is not None else ""
        self.label = f"dicom:{scu.called_ae}@{scu.host}:{scu.port}{tls}"

    def send(self, items: Sequence[OutboxRow]) -> SendResult:
        store = [StoreItem(row.sop_instance_uid, row.path, row.sop_class_uid) for row in items]
        try:
            results = self._scu.send(store)
        except AssociationError as exc:
            if exc.misconfigured:
                rejection = exc.rejection
                who = "called" if rejection is not None and rejection.diagnostic == 7 else "calling"
                raise PermanentUploadError(
                    f"{exc.reason}: check destination.{who}_ae"
                    + (" (or register our AE title at the peer)" if who == "calling" else ""),
                    status=REFUSED_STATUS,
                ) from None
            answered = [r for r in exc.results if r.status is not None]
            if not answered:
                raise RetryableUploadError(exc.reason) from None
            # Lost after some answers: record those; the rest are retried on their own.
            settled = {r.key for r in exc.results}
            results = exc.results + [
                StoreResult(item.key, Outcome.RETRY, exc.reason)
                for item in store
                if item.key not in settled
            ]
        out = SendResult()
        for r in results:
            uid = str(r.key)
            if r.outcome is Outcome.SUCCESS:
                out.sent.append(uid)
            elif r.outcome is Outcome.WARNING:
                out.sent.append(uid)
                out.warnings[uid] = r.reason
            else:
                out.failed[uid] = (r.outcome is Outcome.FAILURE, r.reason)
        return out

    def confirm(self, items: Sequence[OutboxRow]) -> set[str] | None:
        """The acknowledged instances the peer's C-FIND lists (None when ``confirm_storage`` is
        off)."""
        if not self.confirm_storage:
            return None
        by_series: dict[tuple[str, str], list[str]] = {}
        for row in items:
            key = (row.study_instance_uid, row.series_instance_uid)
            by_series.setdefault(key, []).append(row.sop_instance_uid)
        scu = self._scu
        try:
            return find_instances(
                scu.host,
                scu.port,
                scu.called_ae,
                scu.calling_ae,
                [(study, series, uids) for (study, series), uids in by_series.items()],
                timeout=scu.timeout,
                connect_timeout=scu.connect_timeout,
                ssl_context=scu.ssl_context,
                server_hostname=scu.server_hostname,
            )
        except QueryRefusedError as exc:
            raise PermanentUploadError(exc.reason, status=REFUSED_STATUS) from None
        except AssociationError as exc:
            raise RetryableUploadError(f"c_find {exc.reason}") from None

    def close(self) -> None:
        self._scu.close()


def dicom_from_settings(s: DestinationSettings, *, calling_ae: str | None) -> DicomDestination:
    """Build the ``dicom`` destination; ``ConfigError`` for unusable TLS files."""
    if not s.host or not s.called_ae:
        raise ConfigError('destination.kind = "dicom" needs destination.host and called_ae')
    ours = s.calling_ae or calling_ae
    if not ours:
        raise ConfigError("destination.calling_ae (or unit_name) is required for kind dicom")
    context: ssl.SSLContext | None = None
    if s.tls:
        try:
            context = client_ssl_context(
                verify=s.verify_tls,
                ca_file=s.ca_bundle,
                cert_file=s.client_cert,
                key_file=s.client_key,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"destination TLS files: {exc.strerror or type(exc).__name__}"
            ) from None
    scu = StoreSCU(
        s.host,
        s.port,
        s.called_ae,
        ours,
        timeout=s.timeout_seconds,
        connect_timeout=min(10.0, s.timeout_seconds),
        ssl_context=context,
        idle_release=s.idle_release_seconds,
    )
    return DicomDestination(scu, confirm_storage=s.confirm_storage)
