"""C-FIND of stored instances (Study Root, IMAGE level): which SOP Instance UIDs a peer holds.

:func:`find_instances` opens one association proposing Study Root Query/Retrieve - FIND, asks
once per series and page of UIDs (List of UID Matching, PS3.4 C.2.2.2.2), asks the UIDs a list
query did not find once more alone (a peer without list matching answers a list with nothing),
and releases. It raises :class:`~gateway_agent.dicom.scu.AssociationError` when the peer cannot
be talked to, and :class:`QueryRefusedError` when the peer answers but will not be queried (our AE
title not allowed to query, the FIND context refused, a failure status).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from .network import Rejection, set_nodelay
from .scu import AssociationError

__all__ = ["FIND_PAGE", "STUDY_ROOT_FIND", "QueryRefusedError", "find_instances"]

#: Study Root Query/Retrieve Information Model - FIND.
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: SOP Instance UIDs asked for in one C-FIND (List of UID Matching).
FIND_PAGE = 40
_PENDING = (0xFF00, 0xFF01)


class QueryRefusedError(Exception):
    """The peer answers but refuses to be queried by us; ``reason`` is a short slug."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def find_instances(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    series: Iterable[tuple[str, str, Sequence[str]]],
    *,
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> set[str]:
    """The SOP Instance UIDs among ``series`` (``(study UID, series UID, SOP Instance UIDs)``)
    that the peer's C-FIND lists."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = connect_timeout
    ae.add_requested_context(STUDY_ROOT_FIND)
    rejected: list[Rejection] = []
    connected: list[bool] = []

    def on_open(event: Any) -> None:
        connected.append(True)
        set_nodelay(event)

    def on_pdu(event: Any) -> None:
        p = event.pdu
        if type(p).__name__ == "A_ASSOCIATE_RJ":
            rejected.append(Rejection(int(p.result), int(p.source), int(p.reason_diagnostic)))

    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["tls_args"] = (ssl_context, server_hostname or host)
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called_ae,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu)],
            **kwargs,
        )
    except (OSError, ssl.SSLError) as exc:
        raise AssociationError(f"connection failed: {type(exc).__name__}") from None
    if not assoc.is_established:
        if rejected and rejected[0].permanent and rejected[0].source == 1:
            raise QueryRefusedError(f"c_find_refused: {rejected[0].describe()}")
        if rejected:
            raise AssociationError(rejected[0].describe(), rejection=rejected[0])
        if connected and assoc.rejected_contexts and not assoc.accepted_contexts:
            raise QueryRefusedError("c_find_refused: the peer does not offer Query/Retrieve (FIND)")
        if not connected:
            raise AssociationError("connection refused or timed out")
        raise AssociationError("association aborted or no answer (timeout)")
    found: set[str] = set()
    try:
        for study, series_uid, uids in series:
            for i in range(0, len(uids), FIND_PAGE):
                chunk = list(uids[i : i + FIND_PAGE])
                got = _find(assoc, study, series_uid, chunk)
                if len(chunk) > 1:
                    for uid in chunk:
                        if uid not in got:
                            got |= _find(assoc, study, series_uid, [uid])
                found |= got
    finally:
        if assoc.is_established:
            assoc.release()
    return found


def _find(assoc: Any, study: str, series_uid: str, uids: list[str]) -> set[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = uids if len(uids) > 1 else uids[0]
    wanted = set(uids)
    listed: set[str] = set()
    for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
        code = getattr(status, "Status", None)
        if code is None:
            raise AssociationError("no answer to C-FIND (timeout or association lost)")
        code = int(code)
        if code in _PENDING:
            uid = str(getattr(identifier, "SOPInstanceUID", "") or "")
            if uid in wanted:
                listed.add(uid)
        elif code == 0x0000:
            break
        elif code & 0xFF00 == 0xA700:
            raise AssociationError(f"c_find out of resources (0x{code:04x})")
        else:
            raise QueryRefusedError(f"c_find_failed: status 0x{code:04x}")
    return listed
