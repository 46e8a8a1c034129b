"""The data transfer phase of an accepted association, in its own thread: C-STORE and C-ECHO.

pynetdicom accepts the association (A-ASSOCIATE, AE titles, presentation contexts, the limit
of associations); :func:`~gateway_agent.dicom.network.detach_accepted` then stops its two
threads and hands the connection, with the PDUs they had already read, to a
:class:`ReceiveLink`, which serves the peer's requests in the association's thread:

* A C-STORE-RQ's data set goes, as its PDVs arrive, into a new file of ``incoming``
  (preamble, file meta, the data set as sent) through one reused buffer: memory per
  association is that buffer whatever the instance's size. After its last fragment the file
  is fsynced and closed, and the ``store`` callback gives the response status (the listener
  renames the file into place and fsyncs the folder before it answers 0x0000); the
  C-STORE-RSP is sent after it returns. When ``wanted()`` says no as the command arrives,
  the data set is read and dropped, and the callback is told so (``Receipt.path`` is None).
  A write error (disk full) is recorded, the rest of the data set read and dropped, and the
  callback told (``Receipt.error``): the association goes on.
* A C-ECHO-RQ is answered 0x0000.
* An A-RELEASE-RQ is answered and ends the association; an A-ABORT, a closed connection,
  ``timeout`` s without a byte from the peer, another DIMSE service, a presentation context
  that was not accepted or a malformed PDU end it too (with an A-ABORT from us), and a
  partial file is removed.

Why not pynetdicom's reactors: they pass each PDU through queues between a DUL thread and an
association thread that poll each other every millisecond, and write and flush every 16 kB
fragment on its own; about 4.5 ms of CPU per CT slice received. This path reads and writes in
256 kB blocks (``docs/performance.md``).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from .codec import Element
from .files import encode_file_meta
from .link import (
    A_ABORT,
    A_RELEASE_RQ,
    ABORT_PDU,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    COMMAND_PDV,
    LAST_PDV,
    NO_DATA_SET,
    P_DATA_TF,
    PDATA_HEADER,
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RP_PDU,
    LinkLostError,
    command_values,
    encode_response,
)

__all__ = ["READ_BYTES", "Receipt", "ReceiveLink"]

#: Bytes read from the socket at a time, and written to a data set's file at a time.
READ_BYTES = 256 << 10
#: Longest command set accepted (a C-STORE-RQ's is about 200 bytes).
MAX_COMMAND = 64 << 10


_PREAMBLE = b"\0" * 128 + b"DICM"


class Receipt:
    """One C-STORE-RQ received: what it said, and where its data set is.

    ``error`` is the ``OSError`` that cut writing short (the file, if any, is incomplete);
    without one, ``path`` is the fsynced part-10 file in ``incoming``, or None when ``wanted()``
    said no and nothing was written. ``size``: the bytes of the data set.
    """

    __slots__ = ("error", "path", "size", "sop_class", "sop_instance", "transfer_syntax")

    def __init__(self, sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.transfer_syntax = transfer_syntax
        self.path: Path | None = None
        self.error: OSError | None = None
        self.size = 0


def _ui(raw: bytes) -> bytes:
    return raw + b"\0" if len(raw) % 2 else raw


def file_meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group of a received instance (the UIDs as the
    C-STORE-RQ gave them)."""
    return _PREAMBLE + encode_file_meta(
        [
            Element(0x00020001, "OB", b"\x00\x01"),
            Element(0x00020002, "UI", _ui(sop_class)),
            Element(0x00020003, "UI", _ui(sop_instance)),
            Element(0x00020010, "UI", _ui(transfer_syntax.encode("ascii"))),
            Element(0x00020012, "UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID).encode())),
            Element(0x00020013, "SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode().ljust(16)[:16]),
        ]
    )


class ReceiveLink:
    """The requests of one accepted association, served in the calling thread.

    Parameters
    ----------
    sock
        The association's connected socket (TLS or not), taken from pynetdicom.
    unread
        PDUs pynetdicom had read from it before it stopped, re-encoded: served first.
    contexts
        The accepted presentation contexts: ID → (abstract syntax, transfer syntax).
    incoming
        Where data sets are written (``.recv-*.dcm``).
    timeout
        Seconds without a byte from the peer after which the association is aborted.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        unread: bytes,
        contexts: dict[int, tuple[str, str]],
        incoming: Path,
        timeout: float,
    ) -> None:
        sock.settimeout(timeout)
        self._sock = sock
        self._reader = cast(io.BufferedReader, sock.makefile("rb", buffering=READ_BYTES))
        self._unread = memoryview(unread)
        self._contexts = contexts
        self._incoming = incoming
        self._buf = bytearray(READ_BYTES)
        self._view = memoryview(self._buf)
        self._pdu_left = 0  # bytes of the current P-DATA-TF PDU not yet read
        self._partial: str | None = None  # the file being written, removed if the link ends
        self.alive = True

    # -- the loop -----------------------------------------------------------------------------
    def serve(
        self,
        store: Callable[[Receipt], int],
        *,
        wanted: Callable[[], bool],
        echoed: Callable[[], None],
    ) -> str:
        """Serve requests until the association ends; why it ended, in a few words.

        ``store`` gives the status of each C-STORE-RQ received, ``wanted`` says before its data
        set whether to write it at all, ``echoed`` is told of each C-ECHO-RQ answered.
        """
        try:
            while True:
                context_id, values = self._command()
                field = int.from_bytes(values.get(0x0100, b""), "little")
                message_id = int.from_bytes(values.get(0x0110, b""), "little")
                if field == C_ECHO_RQ:
                    sop_class = values.get(0x0002, b"")
                    self._respond(context_id, encode_response(C_ECHO_RSP, sop_class, message_id, 0))
                    echoed()
                elif field == C_STORE_RQ:
                    self._store(context_id, message_id, values, store, wanted)
                else:
                    raise self._protocol_error(f"DIMSE command 0x{field:04X} not supported")
        except LinkLostError as exc:
            return exc.reason
        finally:
            self._discard_partial()
            self._close()

    def abort(self) -> None:
        """Send an A-ABORT (best effort) and close: the thread in :meth:`serve` returns."""
        if self.alive:
            with contextlib.suppress(OSError):
                self._sock.settimeout(1.0)
                self._sock.sendall(ABORT_PDU)
        self._close()

    # -- messages -----------------------------------------------------------------------------
    def _command(self) -> tuple[int, dict[int, bytes]]:
        command = bytearray()
        while True:
            context_id, control, n = self._pdv()
            if not control & COMMAND_PDV:
                raise self._protocol_error("a data set where a command was expected")
            if len(command) + n > MAX_COMMAND:
                raise self._protocol_error("command set too long")
            command += self._read(n)
            if control & LAST_PDV:
                break
        if context_id not in self._contexts:
            raise self._protocol_error("a request on a presentation context not accepted")
        return context_id, command_values(command)

    def _store(
        self,
        context_id: int,
        message_id: int,
        values: dict[int, bytes],
        store: Callable[[Receipt], int],
        wanted: Callable[[], bool],
    ) -> None:
        sop_class = values.get(0x0002, b"")
        sop_instance = values.get(0x1000, b"")
        if values.get(0x0800) == NO_DATA_SET.to_bytes(2, "little"):
            raise self._protocol_error("a C-STORE-RQ without a data set")
        class_uid, instance_uid = sop_class.rstrip(b"\0 "), sop_instance.rstrip(b"\0 ")
        receipt = Receipt(
            class_uid.decode("ascii", "replace"),
            instance_uid.decode("ascii", "replace"),
            self._contexts[context_id][1],
        )
        fd = -1
        fill = 0
        if wanted():
            try:
                fd, name = tempfile.mkstemp(prefix=".recv-", suffix=".dcm", dir=self._incoming)
            except OSError as exc:
                receipt.error = exc  # the data set is read and dropped
            else:
                self._partial = name
                receipt.path = Path(name)
                head = file_meta(class_uid, instance_uid, receipt.transfer_syntax)
                fill = len(head)
                self._buf[:fill] = head
        try:
            fill = self._data_set(context_id, fd, fill, receipt)
            self._write(fd, fill, receipt)
            if fd >= 0 and receipt.error is None:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    receipt.error = exc
        finally:
            if fd >= 0:
                os.close(fd)
        self._partial = None
        try:
            status = store(receipt)
        finally:
            if receipt.path is not None:  # still there unless the callback moved it
                with contextlib.suppress(FileNotFoundError):
                    receipt.path.unlink()
        self._respond(
            context_id, encode_response(C_STORE_RSP, sop_class, message_id, status, sop_instance)
        )

    def _data_set(self, context_id: int, fd: int, fill: int, receipt: Receipt) -> int:
        """Read the data set's fragments into the buffer, writing it out each time it is full;
        the bytes left in the buffer."""
        view, size = self._view, len(self._buf)
        while True:
            cx, control, n = self._pdv()
            if control & COMMAND_PDV or cx != context_id:
                raise self._protocol_error("a command where a data set was expected")
            receipt.size += n
            while n:
                if fill == size:
                    fill = self._write(fd, fill, receipt)
                k = min(n, size - fill)
                self._read_into(view[fill : fill + k])
                fill += k
                n -= k
            if control & LAST_PDV:
                return fill

    def _write(self, fd: int, fill: int, receipt: Receipt) -> int:
        """Write the buffer's ``fill`` bytes to ``fd`` unless writing is off or failed; 0."""
        if fd >= 0 and receipt.error is None:
            view = self._view[:fill]
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                receipt.error = exc
        return 0

    def _respond(self, context_id: int, command: bytes) -> None:
        n = len(command)
        pdu = PDATA_HEADER.pack(P_DATA_TF, n + 6, n + 2, context_id, COMMAND_PDV | LAST_PDV)
        try:
            self._sock.sendall(pdu + command)
        except OSError as exc:
            self._close()
            raise LinkLostError(f"connection lost: {type(exc).__name__}") from None

    # -- PDUs -------------------------------------------------------------------------------
    def _pdv(self) -> tuple[int, int, int]:
        """The next PDV's header: ``(context ID, control, bytes of its fragment)``."""
        while not self._pdu_left:
            kind, length = PDU_HEADER.unpack(self._read(6))
            if kind != P_DATA_TF:
                self._other_pdu(kind)
            self._pdu_left = length
        if self._pdu_left < 6:
            raise self._protocol_error("malformed P-DATA-TF PDU")
        length, context_id, control = PDV_HEADER.unpack(self._read(6))
        if length < 2 or length + 4 > self._pdu_left:
            raise self._protocol_error("malformed P-DATA-TF PDU")
        self._pdu_left -= length + 4
        return context_id, control, length - 2

    def _other_pdu(self, kind: int) -> None:
        if kind == A_RELEASE_RQ:
            with contextlib.suppress(OSError):
                self._sock.sendall(RELEASE_RP_PDU)
            self._close()
            raise LinkLostError("released")
        if kind == A_ABORT:
            self._close()
            raise LinkLostError("aborted by the peer")
        raise self._protocol_error(f"unexpected PDU type 0x{kind:02X}")

    def _protocol_error(self, reason: str) -> LinkLostError:
        self.abort()
        return LinkLostError(reason)

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        self._read_into(memoryview(buf))
        return bytes(buf)

    def _read_into(self, view: memoryview) -> None:
        if self._unread:
            k = min(len(view), len(self._unread))
            view[:k] = self._unread[:k]
            self._unread = self._unread[k:]
            view = view[k:]
        while view:
            try:
                k = self._reader.readinto(view) or 0
            except TimeoutError:
                self.abort()
                raise LinkLostError("nothing from the peer (timeout)") from None
            except (OSError, ValueError) as exc:
                self._close()
                raise LinkLostError(f"connection lost: {type(exc).__name__}") from None
            if not k:
                self._close()
                raise LinkLostError("connection closed by the peer")
            view = view[k:]

    # -- life cycle --------------------------------------------------------------------------
    def _discard_partial(self) -> None:
        name, self._partial = self._partial, None
        if name is not None:
            with contextlib.suppress(OSError):
                Path(name).unlink()

    def _close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()
