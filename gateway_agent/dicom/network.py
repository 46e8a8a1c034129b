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
* :func:`detach_socket`: stop pynetdicom's threads of an established association and take its
  connection, for the C-STORE sender's own data transfer phase (:mod:`.link`).
* :func:`receive_into`: where pynetdicom's chunked C-STORE receipt
  (``_config.STORE_RECV_CHUNKED_DATASET``) puts its temporary files for one AE, so the listener
  renames a received instance into place instead of copying it across file systems.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import ssl
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom
from pynetdicom import dimse_messages, evt, transport

__all__ = [
    "EXPLICIT_VR_LE",
    "IMPLICIT_VR_LE",
    "Outcome",
    "Rejection",
    "association_handlers",
    "classify_store_status",
    "client_ssl_context",
    "detach_socket",
    "receive_error",
    "receive_into",
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


#: A-ABORT PDU: from the service user, no reason given (PS3.8 9.3.8).
_A_ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


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
    dul = assoc.dul
    assoc._kill = True
    assoc._reactor_checkpoint.set()
    dul._kill_thread = True
    problem = ""
    for thread in (assoc, dul):
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
        if thread.is_alive():
            problem = "pynetdicom's association threads did not stop"
    if not problem and (not dul.to_user_queue.empty() or not dul.event_queue.empty()):
        problem = "the peer sent a PDU before the first request"
    sock = getattr(dul.socket, "socket", None)
    if not isinstance(sock, socket.socket):
        raise RuntimeError("the association has no connected socket")
    # pynetdicom no longer owns the connection: nothing of it may close or use it.
    dul.socket.socket = None
    assoc.is_established = False
    assoc.is_released = True
    if problem:
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)
            sock.sendall(_A_ABORT)
        with contextlib.suppress(OSError):
            sock.close()
        raise RuntimeError(problem)
    return sock


# -- chunked receipt --------------------------------------------------------------------------
_RECEIVE_DIRS: weakref.WeakKeyDictionary[pynetdicom.AE, Path] = weakref.WeakKeyDictionary()
_INSTALL_LOCK = threading.Lock()
_original_ntf = tempfile.NamedTemporaryFile


class _SpoolFile:
    """pynetdicom's temporary file for one received data set, failing softly.

    A write error (disk full) in pynetdicom's reactor thread would abort the association; here
    the error is recorded instead, the rest of the data set is read and dropped, and the store
    handler answers 0xA700 (out of resources) so the sender keeps the instance and retries.
    """

    def __init__(self, directory: Path) -> None:
        self._ntf = _original_ntf(mode="wb", suffix=".dcm", prefix=".recv-", dir=directory)
        self.name: str = self._ntf.name
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                return int(self._ntf.write(data))
            except OSError as exc:
                self.error = exc
                _FAILED[self.name] = exc
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._ntf.file.flush()
            except OSError as exc:
                self.error = exc
                _FAILED[self.name] = exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._ntf.close()


_FAILED: dict[str, OSError] = {}


def _named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for a C-STORE data set, in the receiving AE's folder.

    pynetdicom creates it in the DUL reactor thread of the association, which knows its AE.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    ae = getattr(assoc, "ae", None)
    directory = _RECEIVE_DIRS.get(ae) if ae is not None else None
    if directory is not None and "dir" not in kwargs:
        return _SpoolFile(directory)
    return _original_ntf(*args, **kwargs)


def receive_error(path: str | Path) -> OSError | None:
    """The error that cut short the writing of a received data set (e.g. ENOSPC), once."""
    return _FAILED.pop(str(path), None)


def receive_into(ae: pynetdicom.AE, directory: Path) -> None:
    """Have C-STORE data sets received by ``ae`` streamed to files in ``directory``.

    Turns on ``_config.STORE_RECV_CHUNKED_DATASET`` (the data set goes to a file as its PDUs
    arrive: memory stays bounded whatever the instance size) and places those files in
    ``directory`` instead of the system's temporary folder. ``event.dataset_path`` then lies on
    the listener's file system and can be renamed into place. pynetdicom removes the file after
    the ``EVT_C_STORE`` handler unless the handler moved it; an association aborted in the
    middle of a data set leaves its ``.recv-*`` file behind for the caller to clean up. A write
    error does not abort the association: the handler must ask :func:`receive_error` first.
    """
    with _INSTALL_LOCK:
        pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
        if getattr(dimse_messages, "NamedTemporaryFile", None) is not _named_temporary_file:
            setattr(dimse_messages, "NamedTemporaryFile", _named_temporary_file)  # noqa: B010
        _RECEIVE_DIRS[ae] = Path(directory)
