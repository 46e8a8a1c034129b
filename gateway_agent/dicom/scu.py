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
  stored when its syntax was accepted: its data set streamed from disk without decoding, in
  P-DATA PDUs of the peer's maximum length (at most :data:`~.link.MAX_SEND_PDU`), through one
  reused buffer per association, so memory stays bounded (about 1 MB per association) for a
  1 GB multi-frame. Otherwise it is converted where that is lossless: between Implicit and
  Explicit VR Little Endian, and from Deflated Explicit VR Little Endian (the data set is
  decoded in memory then). Compressed pixel data is never decompressed: such a file whose
  syntax was refused fails as ``presentation context refused``.
* **pynetdicom** negotiates each association (contexts, maximum lengths, TLS, rejections);
  the C-STORE requests and responses on it then run in the sending thread
  (:class:`~.link.StoreLink`), without pynetdicom's per-association reactor threads.
* **Statuses** are classified by :func:`~gateway_agent.dicom.network.classify_store_status`.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context

from .files import FileMeta, read_file_meta
from .link import MAX_SEND_PDU, FileSlice, LinkLostError, StoreLink
from .network import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    Outcome,
    Rejection,
    association_handlers,
    classify_store_status,
    detach_socket,
)

__all__ = [
    "MAX_SEND_PDU",
    "AssociationError",
    "StoreItem",
    "StoreResult",
    "StoreSCU",
]

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
    link: StoreLink
    #: Accepted (SOP class, transfer syntax) -> presentation context ID.
    contexts: dict[tuple[str, str], int]
    idle_since: float = field(default_factory=time.monotonic)
    msg_id: int = 0

    def next_id(self) -> int:
        self.msg_id = self.msg_id % 65535 + 1
        return self.msg_id


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
        kwargs: dict[str, Any] = {}
        if self.ssl_context is not None:
            kwargs["tls_args"] = (self.ssl_context, self.server_hostname)
        try:
            assoc = ae.associate(
                self.host,
                self.port,
                contexts=contexts,
                ae_title=self.called_ae,
                evt_handlers=association_handlers(connected, rejected),
                **kwargs,
            )
        except (OSError, ssl.SSLError) as exc:  # TLS handshake failures surface here
            raise AssociationError(f"connection failed: {type(exc).__name__}") from None
        if assoc.is_established:
            accepted: dict[tuple[str, str], int] = {}
            for cx in assoc.accepted_contexts:
                key = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                accepted.setdefault(key, int(cx.context_id or 0))
            try:
                sock = detach_socket(assoc)
                link = StoreLink(
                    sock, send_pdu=int(assoc.acceptor.maximum_length or 0), timeout=self.timeout
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise AssociationError(f"association unusable: {exc}") from None
            return _Assoc(link, accepted)
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
        while True:
            with self._lock:
                found = next((a for a in reversed(self._idle) if self._covers(a, pairs)), None)
                if found is not None:
                    self._idle.remove(found)
            if found is None:
                return self._associate(pairs), False
            # Outside the lock: reads the peer's A-ABORT or close of an association it dropped.
            if found.link.usable():
                return found, True

    @staticmethod
    def _covers(a: _Assoc, pairs: set[tuple[str, str]]) -> bool:
        classes = {c for c, _ in a.contexts}
        for sop_class, syntax in pairs:
            if (sop_class, syntax) in a.contexts:
                continue
            if syntax in (*_UNCOMPRESSED_LE, _DEFLATED_LE) and any(
                (sop_class, s) in a.contexts for s in _UNCOMPRESSED_LE
            ):
                continue
            if sop_class in classes:
                continue  # accepted for another syntax only: the peer will not change its mind
            return False
        return True

    def _checkin(self, a: _Assoc) -> None:
        if not a.link.alive:
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
            a.link.release()

    # -- sending -----------------------------------------------------------------------------
    def send(self, items: Sequence[StoreItem]) -> list[StoreResult]:
        """Send ``items`` over one association; one result per item, in order.

        Files that cannot be read or sent as they are (missing, not part-10, a syntax the peer
        refused and no lossless conversion) fail on their own. Raises :class:`AssociationError`
        when the association cannot be opened or is lost; its ``results`` lists the items
        settled by then (answered by the peer, or failed on their own).
        """
        results: dict[Hashable, StoreResult] = {}
        todo: list[_Todo] = []
        for item in items:
            try:
                meta = read_file_meta(item.path)
            except FileNotFoundError:
                results[item.key] = StoreResult(item.key, Outcome.FAILURE, "file missing")
                continue
            except (OSError, ValueError) as exc:
                results[item.key] = StoreResult(
                    item.key, Outcome.RETRY, f"file unreadable: {type(exc).__name__}"
                )
                continue
            todo.append(_Todo(item, meta, meta.sop_class_uid or item.sop_class_uid))
        if todo:
            pairs = {(t.sop_class, t.meta.transfer_syntax) for t in todo}
            a: _Assoc | None = None
            try:
                try:
                    a, reused = self._checkout(pairs)
                except _NoContextsError:
                    for t in todo:
                        results[t.item.key] = StoreResult(
                            t.item.key,
                            Outcome.FAILURE,
                            f"presentation context refused: SOP class {t.sop_class} not accepted",
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

    def _send_on(self, a: _Assoc, todo: list[_Todo], results: dict[Hashable, StoreResult]) -> None:
        """Send what is not settled yet; raise :class:`_LostError` when the association is lost."""
        answered = 0
        for t in todo:
            key = t.item.key
            if key in results:
                continue
            try:
                context_id, instance, data = self._payload(a, t)
            except _UnsendableError as exc:
                results[key] = StoreResult(key, Outcome.FAILURE, str(exc))
                continue
            try:
                status = a.link.store(context_id, t.sop_class, instance, a.next_id(), data)
            except LinkLostError as exc:
                raise _LostError(f"C-STORE: {exc.reason}", answered) from None
            except FileNotFoundError:
                results[key] = StoreResult(key, Outcome.FAILURE, "file missing")
                continue
            except OSError as exc:  # opening the file; nothing was sent
                results[key] = StoreResult(
                    key, Outcome.RETRY, f"file unreadable: {type(exc).__name__}"
                )
                continue
            answered += 1
            outcome, why = classify_store_status(status)
            results[key] = StoreResult(key, outcome, why, status)

    @staticmethod
    def _payload(a: _Assoc, t: _Todo) -> tuple[int, str, FileSlice | bytes]:
        """(context ID, SOP Instance UID, data set): the file's own data set when its syntax was
        accepted, else a losslessly converted one."""
        cls, syntax = t.sop_class, t.meta.transfer_syntax
        context_id = a.contexts.get((cls, syntax))
        if context_id is not None:
            if not t.meta.sop_instance_uid:
                raise _UnsendableError("cannot send: no SOP Instance UID in the file meta")
            return context_id, t.meta.sop_instance_uid, FileSlice(t.item.path, t.meta.data_offset)
        target = next((s for s in _UNCOMPRESSED_LE if (cls, s) in a.contexts), None)
        if target is None:
            accepted = sorted(s for c, s in a.contexts if c == cls)
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
        try:
            ds = dcmread(t.item.path)
            instance = str(ds.SOPInstanceUID)
            data = encode(ds, target == IMPLICIT_VR_LE, True)
        except Exception as exc:  # unreadable, or pydicom cannot encode it that way
            raise _UnsendableError(f"cannot send: {type(exc).__name__}") from None
        if data is None:
            raise _UnsendableError("cannot send: the data set could not be encoded")
        return a.contexts[(cls, target)], instance, data


@dataclass(frozen=True)
class _Todo:
    item: StoreItem
    meta: FileMeta
    #: The file meta's SOP Class UID (the item's when the meta lacks it).
    sop_class: str


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
