"""DICOM networking on pynetdicom: C-STORE statuses and association rejects, TLS, TCP_NODELAY.

This module holds the protocol facts the C-STORE sender (``agent.upload.destinations.dicom``) and
the listener (``agent.intake.listener``) share; policy (what a status does to an outbox row) is
theirs.

* :func:`classify_store_status` maps a C-STORE response status (PS3.4 B.2.3, PS3.7 C) to an
  :class:`Outcome` and a short reason such as ``"0xA700 refused: out of resources"``.
* :class:`Rejection` reads an A-ASSOCIATE-RJ (PS3.8 9.3.4): permanent or transient, and whether it
  means *our* configuration is wrong (called or calling AE title not recognised).
* :func:`client_ssl_context` / :func:`server_ssl_context`: DICOM TLS (PS3.15 Annex B), verified
  by default.
* :func:`set_nodelay`: an ``EVT_CONN_OPEN`` handler. pynetdicom leaves Nagle's algorithm on, and
  with the peer's delayed ACK each small PDU (a C-STORE response, a command set) may wait for it.
* :func:`detach_socket` / :func:`detach_accepted`: stop pynetdicom's threads of an established
  association and take its connection, for the data transfer phase of the C-STORE sender
  (:mod:`.link`) and of the listener (:mod:`.receive`).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import evt, transport
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import A_RELEASE

from .link import ABORT_PDU, RELEASE_RQ_PDU

__all__ = [
    "EXPLICIT_VR_LE",
    "IMPLICIT_VR_LE",
    "Outcome",
    "Rejection",
    "association_handlers",
    "classify_store_status",
    "client_ssl_context",
    "detach_accepted",
    "detach_socket",
    "hold_data",
    "server_ssl_context",
    "set_nodelay",
    "status_meaning",
]

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


class Outcome(enum.Enum):
    """What a C-STORE response status means for the instance sent."""

    SUCCESS = "success"
    #: Stored, with a warning (coercion, elements discarded, data set does not match SOP class).
    WARNING = "warning"
    #: Refused for now (out of resources): worth sending again later.
    RETRY = "retry"
    #: Refused or failed for these bytes: sending them again will not help.
    FAILURE = "failure"


# PS3.4 Table B.2-1 (Storage) and PS3.7 Annex C (general statuses).
_MEANINGS: dict[int, str] = {
    0x0000: "success",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: data set does not match SOP class",
    0x0107: "warning: attribute list error",
    0x0116: "warning: attribute value out of range",
    0x0110: "failure: processing failure",
    0x0111: "failure: duplicate SOP instance",
    0x0117: "failure: invalid object instance",
    0x0118: "failure: no such SOP class",
    0x0122: "refused: SOP class not supported",
    0x0124: "refused: not authorized",
    0x0210: "failure: duplicate invocation",
    0x0211: "failure: unrecognized operation",
    0x0212: "failure: mistyped argument",
    0x0213: "failure: resource limitation",
    0xFE00: "cancelled",
}


def status_meaning(status: int) -> str:
    """A short meaning of a DIMSE status, e.g. ``"refused: out of resources"``."""
    if status in _MEANINGS:
        return _MEANINGS[status]
    if 0xA700 <= status <= 0xA7FF:
        return "refused: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "error: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "error: cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def classify_store_status(status: int) -> tuple[Outcome, str]:
    """``(outcome, "0xNNNN meaning")`` for a C-STORE response status.

    0x0000 is success; 0xB000/0xB006/0xB007 (any 0xBxxx, and 0x0107/0x0116) are stored with a
    warning; 0xA7xx (out of resources) and 0x0213 (resource limitation) are worth a retry;
    everything else (0xA9xx, 0xCxxx, 0x0122 SOP class not supported, 0x0110 ...) is a failure.
    """
    reason = f"0x{status:04X} {status_meaning(status)}"
    if status == 0x0000:
        return Outcome.SUCCESS, reason
    if 0xB000 <= status <= 0xBFFF or status in (0x0107, 0x0116):
        return Outcome.WARNING, reason
    if 0xA700 <= status <= 0xA7FF or status == 0x0213:
        return Outcome.RETRY, reason
    return Outcome.FAILURE, reason


# PS3.8 Table 9-21: A-ASSOCIATE-RJ result, source and reason/diagnostic.
_REJECT_REASONS: dict[tuple[int, int], str] = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 0): "reserved",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ: ``result`` 1 permanent / 2 transient, ``source`` 1 service user,
    2 ACSE provider, 3 presentation provider; ``diagnostic`` the reason code."""

    result: int
    source: int
    diagnostic: int

    @property
    def permanent(self) -> bool:
        return self.result == 1

    @property
    def misconfigured(self) -> bool:
        """True when the peer does not know the AE titles we use: a configuration problem."""
        return self.source == 1 and self.diagnostic in (3, 7)

    @property
    def reason(self) -> str:
        return _REJECT_REASONS.get((self.source, self.diagnostic), f"reason {self.diagnostic}")

    def describe(self) -> str:
        kind = "permanent" if self.permanent else "transient"
        return f"association rejected ({kind}): {self.reason}"


# -- sockets ------------------------------------------------------------------------------------
def set_nodelay(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        # Already closed by the peer? The association will notice by itself.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def association_handlers(connected: list[bool], rejected: list[Rejection]) -> list[Any]:
    """``evt_handlers`` for an association request that record what happened: ``True`` appended
    to ``connected`` when the connection opens (with Nagle's algorithm disabled on it), and each
    A-ASSOCIATE-RJ received appended to ``rejected``."""

    def on_open(event: Any) -> None:
        connected.append(True)
        set_nodelay(event)

    def on_pdu(event: Any) -> None:
        # The PDU as decoded (the A-ASSOCIATE-RJ primitive may never reach the ACSE when
        # the peer closes the connection right after it).
        p = event.pdu
        if type(p).__name__ == "A_ASSOCIATE_RJ":
            rejected.append(Rejection(int(p.result), int(p.source), int(p.reason_diagnostic)))

    return [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu)]


def client_ssl_context(
    *,
    verify: bool = True,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> ssl.SSLContext:
    """A TLS client context: the system's CAs (or ``ca_file``) verify the peer and its host name
    unless ``verify`` is False; an optional client certificate; TLS 1.2 or later."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def server_ssl_context(
    cert_file: Path, key_file: Path | None = None, *, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS server context with our certificate; with ``client_ca_file``, peers must present a
    certificate signed by it (mutual TLS, as PS3.15 B.1 expects)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if client_ca_file is not None else ssl.CERT_NONE
    return ctx


def _shutdown_socket(self: transport.AssociationSocket) -> None:
    """Shut down and close the socket, each step on its own.

    pynetdicom 3.0's version closes the socket only if ``shutdown`` succeeded; on a connection
    that never got established (connection refused) ``shutdown`` fails with ENOTCONN and the
    descriptor leaks until garbage collection (a ``ResourceWarning`` per failed attempt).
    """
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


transport.AssociationSocket._shutdown_socket = _shutdown_socket  # type: ignore[method-assign]


def detach_socket(assoc: Any, timeout: float = 5.0) -> socket.socket:
    """Stop the two threads of an established requestor association; return its socket.

    pynetdicom runs an association with a DUL reactor (reads and writes the socket, polls its
    queues every millisecond) and an association reactor (serves incoming requests). A
    C-STORE requestor that sends one request at a time needs neither once the association is
    established: :class:`~gateway_agent.dicom.link.StoreLink` then reads and writes the socket
    itself. Relies on pynetdicom 3.0's internals (``Association._kill`` and
    ``_reactor_checkpoint``, ``DULServiceProvider._kill_thread``, ``.socket.socket``), hence
    the ``<3.1`` pin; ``tests/dicomnet/test_link.py`` checks it. Both reactors end at the top
    of their loops, so the stream is at a PDU boundary. Raises ``RuntimeError`` when the
    threads do not stop within ``timeout`` or a PDU from the peer had already arrived (an abort
    right after the association was accepted), after sending an A-ABORT and closing.
    """
    sock, problem = _take_socket(assoc, timeout)
    dul = assoc.dul
    if not problem and (not dul.to_user_queue.empty() or not dul.event_queue.empty()):
        problem = "the peer sent a PDU before the first request"
    if problem:
        _abort_and_close(sock)
        raise RuntimeError(problem)
    return sock


class _Held(list[Any]):
    """The P-DATA primitives pynetdicom's DUL thread passed on, kept in order, undecoded."""

    def __call__(self, primitive: Any) -> None:
        self.append(primitive)


def hold_data(assoc: Any) -> None:
    """``EVT_CONN_OPEN`` (acceptor): keep the P-DATA this association receives undecoded
    until :func:`detach_accepted` takes them, instead of pynetdicom's DIMSE decoding them.

    The peer sends its first request as soon as it has the A-ASSOCIATE-AC, and pynetdicom's
    DUL thread may read it before it is stopped; its DIMSE provider would decode it (and
    write its data set to a file of its own) where the listener never sees it.
    """
    assoc.dimse.receive_primitive = _Held()


def detach_accepted(assoc: Any, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
    """Stop the two threads of an association we just accepted; return its socket and the
    PDUs pynetdicom already read from it (encoded again, in order), for
    :class:`~gateway_agent.dicom.receive.ReceiveLink`.

    Called from an ``EVT_ESTABLISHED`` handler, in the association's thread, on an
    association :func:`hold_data` was applied to. It first waits for the DUL thread to have
    sent the A-ASSOCIATE-AC. Same internals and ``RuntimeError`` as :func:`detach_socket`, and
    two more: the DUL's ``state_machine.current_state`` and ``_recv_pdu`` queue, and its state
    machine handing P-DATA to ``assoc.dimse.receive_primitive`` (``tests/dicomnet/test_scp.py``
    checks them).
    """
    held = assoc.dimse.receive_primitive
    if not isinstance(held, _Held):
        raise RuntimeError("hold_data() was not applied to the association")
    dul = assoc.dul
    deadline = time.monotonic() + timeout
    while (
        dul.state_machine.current_state != "Sta6" and dul.is_alive() and time.monotonic() < deadline
    ):
        time.sleep(0.0002)  # the DUL thread sends the A-ASSOCIATE-AC within a loop or two
    sock, problem = _take_socket(assoc, max(0.0, deadline - time.monotonic()))
    if problem:
        _abort_and_close(sock)
        raise RuntimeError(problem)
    return sock, _unread_pdus(held, dul)


def _take_socket(assoc: Any, timeout: float) -> tuple[socket.socket, str]:
    """Stop an association's reactors and take its socket; what went wrong, if anything."""
    dul = assoc.dul
    assoc._kill = True
    assoc._reactor_checkpoint.set()
    dul._kill_thread = True
    problem = ""
    for thread in (assoc, dul):
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
        if thread.is_alive() and thread is not threading.current_thread():
            problem = "pynetdicom's association threads did not stop"
    sock = getattr(dul.socket, "socket", None)
    if not isinstance(sock, socket.socket):
        raise RuntimeError("the association has no connected socket")
    # pynetdicom no longer owns the connection: nothing of it may close or use it.
    dul.socket.socket = None
    assoc.is_established = False
    assoc.is_released = True
    return sock, problem


def _abort_and_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(ABORT_PDU)
    with contextlib.suppress(OSError):
        sock.close()


def _unread_pdus(held: list[Any], dul: Any) -> bytes:
    """The PDUs a stopped DUL thread read but nobody consumed, encoded again, oldest first:
    those its state machine passed on (P-DATA held, then a release or an abort), then those
    still waiting for it."""
    out = bytearray()
    for primitive in held:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out += pdu.encode()
    while not dul.to_user_queue.empty():
        primitive = dul.to_user_queue.get_nowait()
        if isinstance(primitive, A_RELEASE):
            out += RELEASE_RQ_PDU
        else:  # A-ABORT, A-P-ABORT: the peer is gone
            out += ABORT_PDU
    while not dul._recv_pdu.empty():
        out += dul._recv_pdu.get_nowait().encode()
    return bytes(out)
