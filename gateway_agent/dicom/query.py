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

from pynetdicom import AE

from .._exceptions import DeidError
from .codec import parse_dataset
from .link import LinkLostError, StoreLink, implicit_element
from .network import Rejection, association_handlers, detach_socket
from .scu import AssociationError

__all__ = [
    "FIND_PAGE",
    "STUDY_ROOT_FIND",
    "QueryRefusedError",
    "find_instances",
    "identifier",
    "listed_uid",
]

#: Study Root Query/Retrieve Information Model - FIND.
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: SOP Instance UIDs asked for in one C-FIND (List of UID Matching).
FIND_PAGE = 40
#: The identifiers go in the default transfer syntax, which every peer accepts.
_IMPLICIT_VR_LE = "1.2.840.10008.1.2"


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
    ae.add_requested_context(STUDY_ROOT_FIND, _IMPLICIT_VR_LE)
    rejected: list[Rejection] = []
    connected: list[bool] = []
    kwargs: dict[str, Any] = {}
    if ssl_context is not None:
        kwargs["tls_args"] = (ssl_context, server_hostname or host)
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called_ae,
            evt_handlers=association_handlers(connected, rejected),
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
    context_id = next(
        int(cx.context_id or 0)
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == STUDY_ROOT_FIND
    )
    try:
        link = StoreLink(
            detach_socket(assoc),
            send_pdu=int(assoc.acceptor.maximum_length or 0),
            timeout=timeout,
        )
    except (RuntimeError, ValueError, OSError) as exc:
        raise AssociationError(f"association unusable: {exc}") from None
    found: set[str] = set()
    message_id = 0
    try:
        for study, series_uid, uids in series:
            for i in range(0, len(uids), FIND_PAGE):
                chunk = list(uids[i : i + FIND_PAGE])
                message_id += 1
                got = _find(link, context_id, message_id, study, series_uid, chunk)
                if len(chunk) > 1:
                    for uid in chunk:
                        if uid not in got:
                            message_id += 1
                            got |= _find(link, context_id, message_id, study, series_uid, [uid])
                found |= got
    except LinkLostError as exc:
        raise AssociationError(f"c_find: {exc.reason}") from None
    finally:
        link.release()
    return found


def identifier(study: str, series_uid: str, uids: Sequence[str]) -> bytes:
    """The C-FIND identifier (implicit VR little endian) asking which of ``uids`` (one series)
    the peer holds: IMAGE level, List of UID Matching on SOP Instance UID."""
    return b"".join(
        (
            implicit_element(0x00080018, "\\".join(uids).encode("ascii")),  # SOPInstanceUID
            implicit_element(0x00080052, b"IMAGE", b" "),  # QueryRetrieveLevel
            implicit_element(0x0020000D, study.encode("ascii")),  # StudyInstanceUID
            implicit_element(0x0020000E, series_uid.encode("ascii")),  # SeriesInstanceUID
        )
    )


def listed_uid(answer: bytes) -> str:
    """The SOP Instance UID of one C-FIND answer's identifier ("" when it has none or cannot
    be read)."""
    try:
        elements, _ = parse_dataset(answer, len(answer), 0, True, True)
    except DeidError:
        return ""
    for el in elements:
        if el.tag == 0x00080018:
            return el.raw.decode("ascii", "replace").strip("\0 ")
    return ""


def _find(
    link: StoreLink, context_id: int, message_id: int, study: str, series_uid: str, uids: list[str]
) -> set[str]:
    status, answers = link.find(
        context_id, STUDY_ROOT_FIND, identifier(study, series_uid, uids), message_id
    )
    if status == 0x0000:
        wanted = set(uids)
        return {uid for uid in map(listed_uid, answers) if uid in wanted}
    if status & 0xFF00 == 0xA700:
        raise AssociationError(f"c_find out of resources (0x{status:04x})")
    raise QueryRefusedError(f"c_find_failed: status 0x{status:04x}")
