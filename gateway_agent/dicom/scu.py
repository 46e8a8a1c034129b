"""C-STORE sender (SCU) for part-10 files: pooled associations, streamed data sets, per-file status.

:class:`StoreSCU` sends files to one peer (host, port, called AE title) and reports one
:class:`StoreResult` per file, or raises :class:`AssociationError` when the peer cannot be talked
to at all (connection refused, association rejected or aborted, a timeout): the caller's
"destination down". Several threads may call :meth:`StoreSCU.send` at once; each uses its own
association.

* **Associations** are reused while work keeps coming and released after ``idle_release``
  seconds without any (a background thread sleeps until the oldest idle one is due). An
  association is opened with presentation contexts for the SOP classes and transfer syntaxes of
  the batch at hand plus those seen recently (at most 128 contexts); a batch that needs one it
  lacks opens a new association.
* **Transfer syntaxes**: each (SOP class, stored syntax) is proposed as it is, and a second
  context offers the other uncompressed little-endian syntaxes (an acceptor picks one syntax
  per context: offered together, it might pick one that needs a conversion). A file goes as
  stored when its syntax was accepted: streamed from disk without
  decoding (``_config.STORE_SEND_CHUNKED_DATASET``), in PDUs no larger than
  :data:`MAX_SEND_PDU` with at most :data:`SEND_QUEUE_BYTES` of them queued, so memory stays
  bounded (about 10 MB) for a 1 GB multi-frame. Otherwise it is
  converted where that is lossless: between Implicit and Explicit VR Little Endian, and from
  Deflated Explicit VR Little Endian (the data set is decoded in memory then). Compressed pixel
  data is never decompressed: such a file whose syntax was refused fails as
  ``presentation context refused``.
* **Statuses** are classified by :func:`~gateway_agent.dicom.network.classify_store_status`.
"""

from __future__ import annotations

import contextlib
import queue
import ssl
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, build_context

from .network import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    Outcome,
    Rejection,
    classify_store_status,
    set_nodelay,
)

__all__ = [
    "MAX_SEND_PDU",
    "AssociationError",
    "StoreItem",
    "StoreResult",
    "StoreSCU",
]

#: Largest P-DATA PDU we send, whatever the peer allows (a peer may say "unlimited": 0).
MAX_SEND_PDU = 1 << 20
#: Bytes of P-DATA PDUs queued ahead of the socket. Enough for a whole CT slice in the peer's
#: usual 16 kB PDUs: pynetdicom's reactor sleeps 1 ms whenever it finds the queue empty, so a
#: queue that runs dry between PDUs would cost a millisecond per PDU.
SEND_QUEUE_BYTES = 4 << 20
#: Most presentation contexts one association may propose (PS3.8: odd IDs 1..255).
MAX_CONTEXTS = 128
#: How many (SOP class, transfer syntax) pairs are remembered for the next association.
RECENT_PAIRS = 32
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
_UNCOMPRESSED_LE = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)


class AssociationError(Exception):
    """The peer could not be talked to: connection refused or lost, association rejected or
    aborted, or a timeout. ``results`` holds what was settled before (those instances were
    answered); ``rejection`` the A-ASSOCIATE-RJ when there was one; ``misconfigured`` is True
    when the peer does not recognise our called or calling AE title."""

    def __init__(
        self,
        reason: str,
        *,
        rejection: Rejection | None = None,
        results: list[StoreResult] | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejection = rejection
        self.results = results or []

    @property
    def misconfigured(self) -> bool:
        return self.rejection is not None and self.rejection.misconfigured


@dataclass(frozen=True)
class StoreItem:
    """A file to send; ``key`` comes back in its :class:`StoreResult`."""

    key: Hashable
    path: Path
    sop_class_uid: str


@dataclass(frozen=True)
class StoreResult:
    """The peer's answer for one file (``status`` None when it never got that far)."""

    key: Hashable
    outcome: Outcome
    reason: str
    status: int | None = None


@dataclass
class _Assoc:
    assoc: Any
    pairs: frozenset[tuple[str, str]]
    idle_since: float = field(default_factory=time.monotonic)
    msg_id: int = 0

    def next_id(self) -> int:
        self.msg_id = self.msg_id % 65535 + 1
        return self.msg_id


class _BoundedQueue(queue.Queue[Any]):
    """pynetdicom's DUL send queue, bounded: C-STORE of a file queues all its P-DATA PDUs at once
    (the whole file in memory); with a bound the sender waits for the socket instead. While the
    queue is full and the DUL reactor is gone (connection lost), PDUs are dropped: the C-STORE
    then ends without a response, which the caller treats as a lost association."""

    def __init__(self, dul: Any, maxsize: int) -> None:
        super().__init__(maxsize)
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        while True:
            try:
                super().put(item, block, 0.5 if block else timeout)
                return
            except queue.Full:
                if not block or not self._dul.is_alive() or self._dul._kill_thread:
                    return


def _bound_send_queue(assoc: Any, pdus: int) -> None:
    dul = assoc.dul
    old = dul.to_provider_queue
    new = _BoundedQueue(dul, pdus)
    while True:
        try:
            new.queue.append(old.get_nowait())  # none expected once established
        except queue.Empty:
            break
    dul.to_provider_queue = new


def _recording_ssl_socket(errors: list[str]) -> type[ssl.SSLSocket]:
    """An ``SSLSocket`` class that notes why a handshake failed: pynetdicom only logs it, and
    "connection refused" would send the operator looking in the wrong place."""

    class _Recording(ssl.SSLSocket):
        def connect(self, address: Any) -> None:
            try:
                super().connect(address)
            except ssl.SSLError as exc:
                detail = getattr(exc, "verify_message", "") or getattr(exc, "reason", "") or ""
                errors.append(f"TLS handshake failed: {detail or type(exc).__name__}")
                raise

    return _Recording


def _cap_send_pdu(assoc: Any, cap: int) -> None:
    """Send P-DATA PDUs of at most ``cap`` bytes, even to a peer that accepts any length (0)."""
    for item in assoc.acceptor.user_information:
        if type(item).__name__ == "MaximumLengthNotification":
            value = item.maximum_length_received
            if not value or value > cap:
                item.maximum_length_received = cap


class StoreSCU:
    """C-STORE to one peer.

    Parameters
    ----------
    host, port, called_ae
        The peer.
    calling_ae
        Our AE title (1 to 16 characters).
    timeout
        Seconds to wait for the peer's answer to an association request or a C-STORE, and the
        longest silence tolerated on the connection.
    connect_timeout
        Seconds to wait for the TCP (and TLS) connection.
    ssl_context, server_hostname
        DICOM TLS: the client context (its ``sslsocket_class`` is set here, to report handshake
        failures) and the name the peer's certificate must carry (default ``host``).
    idle_release
        Release an association after this many seconds without work (0: after every batch).
    max_pdu
        Largest PDU we receive (our Maximum Length).
    """

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        idle_release: float = 5.0,
        max_pdu: int = 131072,
    ) -> None:
        if not 1 <= len(calling_ae.strip()) <= 16:
            raise ValueError('Argument "calling_ae" must have 1 to 16 characters (AE title).')
        if not 1 <= len(called_ae.strip()) <= 16:
            raise ValueError('Argument "called_ae" must have 1 to 16 characters (AE title).')
        self.host, self.port, self.called_ae = host, int(port), called_ae
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self._tls_errors: list[str] = []
        if ssl_context is not None:
            # The context is ours from here on: it reports handshake failures to this sender.
            ssl_context.sslsocket_class = _recording_ssl_socket(self._tls_errors)
        self.server_hostname = server_hostname or host
        self.idle_release = idle_release
        self.max_pdu = max_pdu
        # File paths are streamed, never decoded, when their syntax was accepted as stored.
        # (A pynetdicom-wide setting: other senders in this process must then pass data sets,
        # or files whose exact transfer syntax was accepted.)
        _config.STORE_SEND_CHUNKED_DATASET = True
        self._lock = threading.Condition()
        self._idle: list[_Assoc] = []
        self._recent: dict[tuple[str, str], None] = {}
        self._closed = False
        self._reaper: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Release every idle association; later :meth:`send` calls open new ones."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = True
            self._lock.notify_all()
        for a in idle:
            self._release(a)
        if self._reaper is not None:
            self._reaper.join(timeout=5.0)
            self._reaper = None
        with self._lock:
            self._closed = False

    def idle_associations(self) -> int:
        with self._lock:
            return len(self._idle)

    def _reap(self) -> None:
        """Release idle associations when due; sleeps (no polling) while there are none."""
        while True:
            with self._lock:
                while not self._closed and not self._idle:
                    self._lock.wait()
                if self._closed:
                    return
                now = time.monotonic()
                due = [a for a in self._idle if now - a.idle_since >= self.idle_release]
                self._idle = [a for a in self._idle if a not in due]
                wait = min(
                    (self.idle_release - (now - a.idle_since) for a in self._idle), default=None
                )
                if not due:
                    self._lock.wait(wait)
            for a in due:
                self._release(a)

    # -- associations ------------------------------------------------------------------------
    def _contexts(self, pairs: Sequence[tuple[str, str]]) -> list[PresentationContext]:
        contexts: list[PresentationContext] = []
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for sop_class, syntax in pairs:
            # The stored syntax alone (an acceptor picks one syntax per context: offered
            # together, it might pick a converted one), then the lossless fallback.
            wanted = [(syntax,), tuple(x for x in _UNCOMPRESSED_LE if x != syntax)]
            for syntaxes in wanted:
                if (sop_class, syntaxes) not in seen and len(contexts) < MAX_CONTEXTS:
                    seen.add((sop_class, syntaxes))
                    contexts.append(build_context(sop_class, list(syntaxes)))
        return contexts

    def _associate(self, pairs: set[tuple[str, str]]) -> _Assoc:
        with self._lock:
            recent = [p for p in reversed(self._recent) if p not in pairs]
        wanted = list(pairs) + recent
        contexts = self._contexts(wanted)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = self.connect_timeout
        ae.maximum_pdu_size = self.max_pdu
        rejected: list[Rejection] = []
        connected: list[bool] = []
        self._tls_errors.clear()

        def on_open(event: Any) -> None:
            connected.append(True)
            set_nodelay(event)

        def on_pdu(event: Any) -> None:
            # The PDU as decoded (the A-ASSOCIATE-RJ primitive may never reach the ACSE when
            # the peer closes the connection right after it).
            p = event.pdu
            if type(p).__name__ == "A_ASSOCIATE_RJ":
                rejected.append(Rejection(int(p.result), int(p.source), int(p.reason_diagnostic)))

        kwargs: dict[str, Any] = {}
        if self.ssl_context is not None:
            kwargs["tls_args"] = (self.ssl_context, self.server_hostname)
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_PDU_RECV, on_pdu)]
        try:
            assoc = ae.associate(
                self.host,
                self.port,
                contexts=contexts,
                ae_title=self.called_ae,
                evt_handlers=handlers,
                **kwargs,
            )
        except (OSError, ssl.SSLError) as exc:  # TLS handshake failures surface here
            raise AssociationError(f"connection failed: {type(exc).__name__}") from None
        if assoc.is_established:
            _cap_send_pdu(assoc, MAX_SEND_PDU)
            pdu = assoc.acceptor.maximum_length or MAX_SEND_PDU
            _bound_send_queue(assoc, max(4, SEND_QUEUE_BYTES // pdu))
            accepted = frozenset(
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            )
            return _Assoc(assoc, accepted)
        if rejected:
            raise AssociationError(rejected[0].describe(), rejection=rejected[0])
        if connected and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer accepted the association but none of its contexts (pynetdicom aborts
            # then): these SOP classes/syntaxes are refused; the peer itself is up.
            refused = frozenset(
                (str(cx.abstract_syntax), str(ts))
                for cx in assoc.rejected_contexts
                for ts in cx.transfer_syntax
            )
            raise _NoContextsError(refused)
        if not connected:
            if self._tls_errors:
                raise AssociationError(self._tls_errors[-1])
            raise AssociationError("connection refused or timed out")
        if assoc.is_aborted:
            raise AssociationError("association aborted by the peer")
        raise AssociationError("no answer to the association request (timeout)")

    def _checkout(self, pairs: set[tuple[str, str]]) -> tuple[_Assoc, bool]:
        """An idle association usable for ``pairs`` (reused: True), or a new one."""
        with self._lock:
            for p in pairs:
                self._recent.pop(p, None)
                self._recent[p] = None
            while len(self._recent) > RECENT_PAIRS:
                del self._recent[next(iter(self._recent))]
            for a in reversed(self._idle):
                if a.assoc.is_established and self._covers(a, pairs):
                    self._idle.remove(a)
                    return a, True
        return self._associate(pairs), False

    @staticmethod
    def _covers(a: _Assoc, pairs: set[tuple[str, str]]) -> bool:
        classes = {c for c, _ in a.pairs}
        for sop_class, syntax in pairs:
            if (sop_class, syntax) in a.pairs:
                continue
            if syntax in (*_UNCOMPRESSED_LE, _DEFLATED_LE) and any(
                (sop_class, s) in a.pairs for s in _UNCOMPRESSED_LE
            ):
                continue
            if sop_class in classes:
                continue  # accepted for another syntax only: the peer will not change its mind
            return False
        return True

    def _checkin(self, a: _Assoc) -> None:
        if not a.assoc.is_established:
            return
        if self.idle_release <= 0:
            self._release(a)
            return
        with self._lock:
            if self._closed:
                release = True
            else:
                release = False
                a.idle_since = time.monotonic()
                self._idle.append(a)
                if self._reaper is None:
                    self._reaper = threading.Thread(
                        target=self._reap, name="dicom-release", daemon=True
                    )
                    self._reaper.start()
                self._lock.notify_all()
        if release:
            self._release(a)

    @staticmethod
    def _release(a: _Assoc) -> None:
        with contextlib.suppress(Exception):
            if a.assoc.is_established:
                a.assoc.release()
            else:
                a.assoc.abort()

    # -- sending -----------------------------------------------------------------------------
    def send(self, items: Sequence[StoreItem]) -> list[StoreResult]:
        """Send ``items`` over one association; one result per item, in order.

        Files that cannot be read or sent as they are (missing, not part-10, a syntax the peer
        refused and no lossless conversion) fail on their own. Raises :class:`AssociationError`
        when the association cannot be opened or is lost; its ``results`` lists the items
        settled by then (answered by the peer, or failed on their own).
        """
        results: dict[Hashable, StoreResult] = {}
        todo: list[tuple[StoreItem, str]] = []
        for item in items:
            try:
                meta = read_file_meta_info(item.path)
                syntax = str(meta.TransferSyntaxUID)
            except FileNotFoundError:
                results[item.key] = StoreResult(item.key, Outcome.FAILURE, "file missing")
                continue
            except Exception as exc:  # OSError, InvalidDicomError, AttributeError
                results[item.key] = StoreResult(
                    item.key, Outcome.RETRY, f"file unreadable: {type(exc).__name__}"
                )
                continue
            todo.append((item, syntax))
        if todo:
            pairs = {(item.sop_class_uid, syntax) for item, syntax in todo}
            a: _Assoc | None = None
            try:
                try:
                    a, reused = self._checkout(pairs)
                except _NoContextsError:
                    for item, _syntax in todo:
                        results[item.key] = StoreResult(
                            item.key,
                            Outcome.FAILURE,
                            f"presentation context refused: SOP class {item.sop_class_uid}"
                            " not accepted",
                        )
                    return [results[i.key] for i in items]
                try:
                    self._send_on(a, todo, results)
                except _LostError as lost:
                    if not (reused and lost.answered == 0):
                        raise AssociationError(lost.reason) from None
                    # An idle association the peer had dropped before it answered anything:
                    # once more on a fresh one (C-STORE is idempotent per SOP Instance UID).
                    a = self._associate(pairs)
                    try:
                        self._send_on(a, todo, results)
                    except _LostError as lost2:
                        raise AssociationError(lost2.reason) from None
            except AssociationError as exc:
                exc.results = [results[i.key] for i in items if i.key in results]
                raise
            finally:
                if a is not None:
                    self._checkin(a)
        return [results[i.key] for i in items]

    def _send_on(
        self,
        a: _Assoc,
        todo: list[tuple[StoreItem, str]],
        results: dict[Hashable, StoreResult],
    ) -> None:
        """Send what is not settled yet; raise :class:`_LostError` when the association is lost."""
        answered = 0
        for item, syntax in todo:
            if item.key in results:
                continue
            try:
                payload = self._payload(a, item, syntax)
            except _UnsendableError as exc:
                results[item.key] = StoreResult(item.key, Outcome.FAILURE, str(exc))
                continue
            reason = ""
            try:
                rsp = a.assoc.send_c_store(payload, msg_id=a.next_id())
                status = getattr(rsp, "Status", None)
            except (RuntimeError, OSError) as exc:
                status, reason = None, f"association lost: {type(exc).__name__}"
            except (ValueError, AttributeError, TypeError) as exc:
                # pynetdicom refuses this data set (no usable context, inconsistent meta ...).
                results[item.key] = StoreResult(
                    item.key, Outcome.FAILURE, f"cannot send: {str(exc)[:160]}"
                )
                continue
            if status is None:
                if not reason:
                    reason = (
                        "association aborted during C-STORE (by the peer, or a timeout)"
                        if a.assoc.is_aborted
                        else "no C-STORE response (association aborted, connection lost or timeout)"
                    )
                with contextlib.suppress(Exception):
                    a.assoc.abort()
                raise _LostError(reason, answered)
            answered += 1
            outcome, why = classify_store_status(int(status))
            results[item.key] = StoreResult(item.key, outcome, why, int(status))

    @staticmethod
    def _payload(a: _Assoc, item: StoreItem, syntax: str) -> Path | Any:
        """The file itself when its syntax was accepted, else a losslessly converted data set."""
        cls = item.sop_class_uid
        if (cls, syntax) in a.pairs:
            return item.path
        target = next((s for s in _UNCOMPRESSED_LE if (cls, s) in a.pairs), None)
        if target is None:
            accepted = sorted(s for c, s in a.pairs if c == cls)
            if not accepted:
                raise _UnsendableError(
                    f"presentation context refused: SOP class {cls} not accepted"
                )
            raise _UnsendableError(
                f"presentation context refused: transfer syntax {syntax} not accepted"
                f" for {cls} (accepted: {', '.join(accepted)})"
            )
        if syntax not in (*_UNCOMPRESSED_LE, _DEFLATED_LE):
            raise _UnsendableError(
                f"presentation context refused: transfer syntax {syntax} not accepted for {cls}"
                " and not converted (compressed pixel data)"
            )
        ds = dcmread(item.path)
        if syntax == _DEFLATED_LE:
            # Decoded now; pynetdicom encodes it for the accepted (uncompressed) context.
            ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LE)
        return ds


class _UnsendableError(Exception):
    """This file cannot go over this association."""


class _NoContextsError(Exception):
    """The association was accepted with no presentation context."""

    def __init__(self, refused: frozenset[tuple[str, str]]) -> None:
        super().__init__("no presentation context accepted")
        self.refused = refused


class _LostError(Exception):
    """The association was lost after ``answered`` responses."""

    def __init__(self, reason: str, answered: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answered = answered
