"""A durable C-STORE receiver (Storage SCP): each instance is on disk, fsynced, before "success".

:class:`StoreSCP` listens for associations (C-STORE for every storage SOP class and transfer
syntax pynetdicom knows, C-ECHO) and writes each received data set, as the peer sent it, into
``spool/<source>/<time>-<n>.dcm``:

1. pynetdicom negotiates the association; its data transfer phase runs on the project's own
   :class:`~gateway_agent.dicom.receive.ReceiveLink`, which streams the data set, as its PDUs
   arrive, into ``spool/.incoming/.recv-*`` (bounded memory whatever the size) and fsyncs it;
2. the listener renames it into the source's folder and fsyncs that folder;
3. only then is the response 0x0000 sent. A modality that received it may forget the instance.

When ``accept()`` says no as a C-STORE-RQ arrives (the disk guard paused intake: its data set
is read and dropped), or writing failed (disk full, I/O error), the response is 0xA700
(refused: out of resources) and nothing is kept: the modality keeps the instance and sends it
again later. The ``source`` of an instance is the calling AE title of its association; its
folder name is that title percent-encoded (``ae-CT%201``), so :func:`source_of` gives it back
from the path. File names carry no PHI (time and a counter).

Calling AE titles outside ``allowed_calling_aes`` (when given) are rejected at association
(A-ASSOCIATE-RJ, "calling AE title not recognised"), as are called AE titles other than ours and
associations beyond ``max_associations`` ("local limit exceeded", transient).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from .files import fsync_dir
from .network import Rejection, detach_accepted, hold_data, set_nodelay
from .receive import Receipt, ReceiveLink
from .spool import INCOMING_DIR, folder_name, received_files, source_of

__all__ = [
    "INCOMING_DIR",
    "ListenerEvent",
    "StoreSCP",
    "received_files",
    "source_of",
]

VERIFICATION = "1.2.840.10008.1.1"
#: C-STORE status for "refused: out of resources" (PS3.4 B.2.3): the sender keeps and retries.
OUT_OF_RESOURCES = 0xA700


@dataclass(frozen=True)
class ListenerEvent:
    """What happened, for metrics and status.

    ``kind``: ``association`` (accepted), ``rejected`` (``reason`` says why), ``stored``,
    ``refused`` (answered 0xA700; ``reason`` says why), ``echo``.
    """

    kind: str
    calling_ae: str
    reason: str = ""
    size: int = 0


class StoreSCP:
    """The listener.

    Parameters
    ----------
    spool
        Where received instances are written (one folder per calling AE title).
    ae_title, host, port
        Our AE title and address (port 0 picks a free one; see :attr:`port` after
        :meth:`start`).
    allowed_calling_aes
        Calling AE titles accepted; empty accepts any.
    max_associations
        Concurrent associations; more are rejected (transient, local limit exceeded).
    timeout
        Seconds of silence after which an association is dropped (ACSE, DIMSE, network).
    ssl_context
        DICOM TLS: a server context (``network.server_ssl_context``).
    accept
        Asked before each instance is kept: False answers 0xA700.
    on_stored
        Called with the path and the calling AE title of each instance kept (after the file is
        durable, before the response); an exception there does not change the response.
    on_event
        Called with a :class:`ListenerEvent` for each association, rejection and instance.
    """

    def __init__(
        self,
        spool: Path,
        *,
        ae_title: str,
        host: str = "0.0.0.0",  # noqa: S104  (scanners on the network must reach it)
        port: int = 11112,
        allowed_calling_aes: Sequence[str] = (),
        max_associations: int = 10,
        timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        accept: Callable[[], bool] | None = None,
        on_stored: Callable[[Path, str], None] | None = None,
        on_event: Callable[[ListenerEvent], None] | None = None,
    ) -> None:
        if not 1 <= len(ae_title.strip()) <= 16:
            raise ValueError('Argument "ae_title" must have 1 to 16 characters (AE title).')
        self.spool = Path(spool)
        self.incoming = self.spool / INCOMING_DIR
        self.ae_title = ae_title.strip()
        self.host = host
        self.port = port
        self.allowed = [a.strip() for a in allowed_calling_aes]
        self.max_associations = max_associations
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._accept = accept
        self._on_stored = on_stored
        self._on_event = on_event
        self._server: Any = None
        self._ae: AE | None = None
        self._seq = itertools.count()
        self._folders: set[str] = set()
        self._lock = threading.Lock()
        self._links: set[ReceiveLink] = set()

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Create the spool, drop partial receipts of an earlier run, listen."""
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.incoming.mkdir(mode=0o700, exist_ok=True)
        self.clean_incoming(max_age=0.0)
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        ae.require_calling_aet = list(self.allowed)
        ae.require_called_aet = True
        ae.maximum_associations = self.max_associations
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.maximum_pdu_size = 131072
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_ESTABLISHED, self._on_established),
        ]
        self._server = ae.start_server(
            (self.host, self.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self.ssl_context,
        )
        self.port = int(self._server.server_address[1])
        self._ae = ae

    def stop(self) -> None:
        """Stop listening; associations in progress are aborted (their senders retry)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.abort()
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def alive(self) -> bool:
        server = self._server
        thread = getattr(server, "_thread", None) if server is not None else None
        return server is not None and (thread is None or thread.is_alive())

    def active_associations(self) -> int:
        ae = self._ae
        return len(ae.active_associations) if ae is not None else 0

    def clean_incoming(self, max_age: float) -> int:
        """Remove partial receipts (of aborted associations) untouched for ``max_age`` s."""
        removed = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.incoming):
                try:
                    if now - entry.stat().st_mtime >= max_age:
                        Path(entry.path).unlink()
                        removed += 1
                except OSError:
                    continue
        return removed

    # -- handlers (association threads) ------------------------------------------------------
    def _emit(self, kind: str, calling_ae: str, reason: str = "", size: int = 0) -> None:
        if self._on_event is not None:
            self._on_event(ListenerEvent(kind, calling_ae, reason, size))

    def _on_acse_sent(self, event: Any) -> None:
        p = event.primitive
        if type(p).__name__ == "A_ASSOCIATE" and p.result not in (None, 0):
            r = Rejection(int(p.result), int(p.result_source), int(p.diagnostic))
            self._emit("rejected", str(event.assoc.requestor.ae_title).strip(), r.reason)

    def _on_open(self, event: Any) -> None:
        set_nodelay(event)
        hold_data(event.assoc)

    def _on_established(self, event: Any) -> None:
        """Serve the association, in its thread, until it ends."""
        calling = str(event.assoc.requestor.ae_title).strip()
        self._emit("association", calling)
        contexts = {
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in event.assoc.accepted_contexts
        }
        try:
            sock, unread = detach_accepted(event.assoc)
        except RuntimeError:
            return  # aborted and closed: the sender sends again
        link = ReceiveLink(
            sock, unread=unread, contexts=contexts, incoming=self.incoming, timeout=self.timeout
        )
        with self._lock:
            self._links.add(link)
        try:
            link.serve(
                lambda receipt: self._store(receipt, calling),
                wanted=self._wanted,
                echoed=lambda: self._emit("echo", calling),
            )
        finally:
            with self._lock:
                self._links.discard(link)

    def _wanted(self) -> bool:
        try:
            return self._accept() if self._accept is not None else True
        except Exception:
            return True  # a broken gate must not refuse everything; the write will tell

    def _store(self, receipt: Receipt, calling: str) -> int:
        if receipt.error is not None:
            self._emit("refused", calling, f"write_failed: {_errno_name(receipt.error)}")
            return OUT_OF_RESOURCES
        if receipt.path is None:
            self._emit("refused", calling, "intake_paused")
            return OUT_OF_RESOURCES
        try:
            path = self._keep(receipt.path, calling)
        except OSError as exc:
            self._emit("refused", calling, f"write_failed: {_errno_name(exc)}")
            return OUT_OF_RESOURCES
        self._emit("stored", calling, size=receipt.size)
        if self._on_stored is not None:
            # The instance is durable: whatever happens here, it is taken at the next start.
            with contextlib.suppress(Exception):
                self._on_stored(path, calling)
        return 0x0000

    def _keep(self, tmp: Path, calling: str) -> Path:
        """Rename the received (fsynced) file into its source's folder, fsync the folder."""
        name = folder_name(calling)
        folder = self.spool / name
        if name not in self._folders:
            with self._lock:
                if not folder.is_dir():
                    folder.mkdir(mode=0o700, exist_ok=True)
                    fsync_dir(self.spool)
                self._folders.add(name)
        dest = folder / f"{time.time_ns():020d}-{next(self._seq):08d}.dcm"
        tmp.rename(dest)
        fsync_dir(folder)
        return dest


def _errno_name(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
