"""C-STORE and C-FIND on an established association, in the caller's thread: framing, answers.

pynetdicom negotiates the association (A-ASSOCIATE, presentation contexts, maximum lengths);
:func:`~gateway_agent.dicom.network.detach_socket` then stops its two threads and hands the
connection to a :class:`StoreLink`, which runs the data transfer phase (PS3.8 9.3.5, PS3.7
9.3.1) in the caller's thread:

* :meth:`StoreLink.store` encodes the C-STORE-RQ command set (implicit VR little endian), then
  streams the data set from the file into P-DATA-TF PDUs of the peer's maximum length: a reused
  buffer, each PDU header packed in place, the file read straight into it, one ``sendall`` per
  :data:`SEND_BYTES`. Memory per association is one such buffer (at most ``MAX_SEND_PDU`` plus
  headers), whatever the file's size. It then reads PDUs until the C-STORE-RSP and returns its
  status.
* :meth:`StoreLink.find` sends a C-FIND-RQ and its identifier (bytes in the context's transfer
  syntax) the same way, then reads the C-FIND-RSPs until the final one: the identifiers of the
  pending answers and the final status.
* A peer's A-ABORT, A-RELEASE-RQ, closed connection, a timeout, or anything that is not the
  response to our request ends the association: :class:`LinkLostError` with a short reason.
* :meth:`StoreLink.release` (A-RELEASE-RQ, wait for A-RELEASE-RP) and :meth:`StoreLink.abort`.

The PDU constants, command encoders (:func:`encode_response` included) and
:func:`command_values` serve the listener's side too (:mod:`.receive`).

Why not pynetdicom's own ``send_c_store``: it passes every PDU through a queue to a reactor
thread that polls the socket and its queues every millisecond (two such threads per
association), so a 525 kB CT slice in a peer's usual 16 kB PDUs costs about 2.5 ms of CPU and
the idle associations a few percent of a core; this path costs a tenth of that
(``docs/performance.md``). A requestor that sends one request at a time and waits for its
answer needs no reactor: nothing else can arrive but the response, an abort or a close. The
proof of storage's C-FIND queries go the same way (with the reactors, an association open for
a page of queries polled for as long as the peer took to answer).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
from collections.abc import Callable
from io import FileIO
from pathlib import Path

__all__ = [
    "MAX_SEND_PDU",
    "SEND_BYTES",
    "FileSlice",
    "LinkLostError",
    "StoreLink",
    "command_values",
    "encode_find_rq",
    "encode_store_rq",
    "implicit_element",
]

#: Largest P-DATA PDU we send, whatever the peer allows (a peer may say "unlimited": 0).
MAX_SEND_PDU = 1 << 20
#: Bytes of PDUs handed to the socket in one ``sendall`` (several PDUs of a peer's usual 16 kB).
SEND_BYTES = 256 << 10
#: Longest PDU accepted from the peer: a C-STORE peer sends responses of a few hundred bytes.
MAX_RECV_PDU = 16 << 20

P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
#: Message control header bits of a PDV (PS3.8 E.2).
COMMAND_PDV = 0x01
LAST_PDV = 0x02
#: Command Field values (PS3.7 E.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
#: C-FIND-RSP statuses that announce an identifier and more answers (PS3.4 C.4.1.1.4).
FIND_PENDING = (0xFF00, 0xFF01)
#: Priority MEDIUM, as dcmtk's storescu sends it (PS3.7 9.3.1.1).
PRIORITY_MEDIUM = 0x0000
#: Command Data Set Type: anything but 0x0101 says a data set follows.
DATA_SET_PRESENT = 0x0001
NO_DATA_SET = 0x0101
#: Pending answers kept from one C-FIND (the caller asks for a page of UIDs at a time).
MAX_FIND_ANSWERS = 10_000

PDU_HEADER = struct.Struct(">BxI")  # PDU type, reserved, PDU length
#: A P-DATA-TF PDU's header and its one PDV's: PDU type, PDU length, PDV length, context, control.
PDATA_HEADER = struct.Struct(">BxIIBB")
PDV_HEADER = struct.Struct(">IBB")  # PDV item length, presentation context ID, control header
_ELEMENT = struct.Struct("<HHI")  # implicit VR little endian: group, element, length
_US = struct.Struct("<HHIH")
_UL = struct.Struct("<HHII")
RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
#: A-ABORT from the service user, no reason given.
ABORT_PDU = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_HEAD = PDATA_HEADER.size  # 12 bytes of headers per P-DATA-TF PDU of one PDV


class LinkLostError(Exception):
    """The association is over: aborted, released or closed by the peer, a timeout, a protocol
    error. ``reason`` is short and names no file or patient."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FileSlice:
    """The data set of a part-10 file: ``path`` from byte ``offset`` to its end."""

    __slots__ = ("offset", "path")

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset


def implicit_element(tag: int, raw: bytes, pad: bytes = b"\0") -> bytes:
    """One element in implicit VR little endian, its value padded to an even length with
    ``pad`` (NUL for UIDs, a space for text)."""
    if len(raw) % 2:
        raw += pad
    return _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(raw)) + raw


def _uid(tag: int, value: str) -> bytes:
    return implicit_element(tag, value.encode("ascii"))


def _us(element: int, value: int) -> bytes:
    return _US.pack(0x0000, element, 2, value)


def _command_set(*elements: bytes) -> bytes:
    """A command set (implicit VR little endian) of these elements, in ascending order, after
    a correct Command Group Length."""
    body = b"".join(elements)
    return _UL.pack(0x0000, 0x0000, 4, len(body)) + body


def _request(sop_class: str, command_field: int, message_id: int, *more: bytes) -> bytes:
    """A request command set: Affected SOP Class UID, Command Field, Message ID, Priority
    MEDIUM, a data set present, then the elements ``more`` (in ascending order)."""
    return _command_set(
        _uid(0x00000002, sop_class),
        _us(0x0100, command_field),
        _us(0x0110, message_id),
        _us(0x0700, PRIORITY_MEDIUM),
        _us(0x0800, DATA_SET_PRESENT),
        *more,
    )


def encode_store_rq(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RQ (PS3.7 9.3.1.1), implicit VR little endian, elements in
    ascending order and a correct Command Group Length."""
    return _request(sop_class, C_STORE_RQ, message_id, _uid(0x00001000, sop_instance))


def encode_find_rq(sop_class: str, message_id: int) -> bytes:
    """The command set of a C-FIND-RQ (PS3.7 9.3.2.1), implicit VR little endian."""
    return _request(sop_class, C_FIND_RQ, message_id)


def encode_response(
    command_field: int, sop_class: bytes, message_id: int, status: int, sop_instance: bytes = b""
) -> bytes:
    """The command set of a C-STORE-RSP or C-ECHO-RSP (PS3.7 9.3.1.2, 9.3.5.2), implicit VR
    little endian; the Affected SOP Instance UID only when ``sop_instance`` is given."""
    return _command_set(
        implicit_element(0x00000002, sop_class),
        _us(0x0100, command_field),
        _us(0x0120, message_id),
        _us(0x0800, NO_DATA_SET),
        _us(0x0900, status),
        *([implicit_element(0x00001000, sop_instance)] if sop_instance else []),
    )


def command_values(command: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set (implicit VR little endian): raw values by element
    number, up to the first element that is not of group 0000 or runs past the end."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos + 8 <= end:
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            break
        values[element] = bytes(command[pos : pos + length])
        pos += length
    return values


def _command_fields(command: bytes | bytearray) -> dict[int, int]:
    """The US elements of a command set, by element number."""
    return {
        element: int.from_bytes(raw, "little")
        for element, raw in command_values(command).items()
        if len(raw) == 2
    }


class _Source:
    """Fills views from a file (``readinto``) or from bytes; a file cut short raises."""

    def __init__(self, fh: FileIO | None, data: bytes | None = None) -> None:
        self._fh = fh
        self._data = memoryview(data) if data is not None else None
        self._pos = 0

    def fill(self, view: memoryview) -> None:
        n = len(view)
        if self._data is not None:
            view[:] = self._data[self._pos : self._pos + n]
            self._pos += n
            return
        assert self._fh is not None
        got = 0
        while got < n:
            k = self._fh.readinto(view[got:])
            if not k:
                raise _SourceShortError
            got += k


class _SourceShortError(Exception):
    """The file ended before its announced length (it changed while being sent)."""


class StoreLink:
    """The data transfer phase of one established association; one thread at a time.

    Parameters
    ----------
    sock
        The association's connected socket (TLS or not), taken from pynetdicom.
    send_pdu
        The peer's Maximum Length (of the PDVs in one P-DATA-TF PDU); 0 means no limit, and
        :data:`MAX_SEND_PDU` is used then, as it is for any larger value.
    timeout
        Seconds to wait for the peer: a response, a send making no progress, a release.
    """

    def __init__(self, sock: socket.socket, *, send_pdu: int, timeout: float) -> None:
        if not send_pdu or send_pdu > MAX_SEND_PDU:
            send_pdu = MAX_SEND_PDU
        if send_pdu < 8:
            raise ValueError(f"peer's maximum PDU length {send_pdu} is unusable")
        self.send_pdu = send_pdu
        self._chunk = send_pdu - 6  # data bytes per PDV: item length (4), context, control
        self._sock = sock
        self._timeout = timeout
        sock.settimeout(timeout)
        self._buf = bytearray(max(SEND_BYTES, _HEAD + self._chunk))
        self._view = memoryview(self._buf)
        self._fill = 0
        self.alive = True

    # -- C-STORE ---------------------------------------------------------------------------
    def store(
        self,
        context_id: int,
        sop_class: str,
        sop_instance: str,
        message_id: int,
        data: FileSlice | bytes,
    ) -> int:
        """Send one C-STORE-RQ and its data set; the status of the peer's C-STORE-RSP.

        Raises :class:`LinkLostError` when the association ends before the response (the link is
        closed then); ``OSError`` when the file cannot be opened (the link is still usable).
        """
        if not self.alive:
            raise LinkLostError("association already closed")
        fh: FileIO | None = None
        if isinstance(data, FileSlice):
            fh = FileIO(data.path, "rb")
            try:
                length = fh.seek(0, 2) - data.offset
                if length < 0:
                    raise OSError("file shorter than its meta information")
                fh.seek(data.offset)
            except OSError:
                fh.close()
                raise
            source = _Source(fh)
        else:
            length, source = len(data), _Source(None, data)
        try:
            command = encode_store_rq(sop_class, sop_instance, message_id)
            self._fill = 0
            self._frame(context_id, COMMAND_PDV, _Source(None, command).fill, len(command))
            self._frame(context_id, 0, source.fill, length)
            self._flush()
        except _SourceShortError:
            self.abort()
            raise LinkLostError("file cut short while being sent") from None
        finally:
            if fh is not None:
                fh.close()
        fields, _ = self._message(message_id, C_STORE_RSP)
        return fields[0x0900]

    # -- C-FIND ----------------------------------------------------------------------------
    def find(
        self, context_id: int, sop_class: str, identifier: bytes, message_id: int
    ) -> tuple[int, list[bytes]]:
        """Send one C-FIND-RQ with ``identifier``; ``(final status, identifiers of the pending
        answers)`` once the peer gave its final C-FIND-RSP.

        Raises :class:`LinkLostError` when the association ends before the final answer, or the
        peer sends more than :data:`MAX_FIND_ANSWERS` answers (the link is closed then).
        """
        if not self.alive:
            raise LinkLostError("association already closed")
        command = encode_find_rq(sop_class, message_id)
        self._fill = 0
        self._frame(context_id, COMMAND_PDV, _Source(None, command).fill, len(command))
        self._frame(context_id, 0, _Source(None, identifier).fill, len(identifier))
        self._flush()
        found: list[bytes] = []
        while True:
            fields, data = self._message(message_id, C_FIND_RSP)
            status = fields[0x0900]
            if status not in FIND_PENDING:
                return status, found
            if data is not None:
                if len(found) >= MAX_FIND_ANSWERS:
                    self.abort()
                    raise LinkLostError("too many C-FIND answers")
                found.append(data)

    def _frame(
        self, context_id: int, control: int, fill: Callable[[memoryview], None], length: int
    ) -> None:
        """Append a message (command or data set) as P-DATA-TF PDUs of one PDV each."""
        buf, view, chunk, pack = self._buf, self._view, self._chunk, PDATA_HEADER.pack_into
        size = len(buf)
        left = length
        while True:
            n = chunk if left > chunk else left
            if self._fill + _HEAD + n > size:
                self._flush()
            pos = self._fill
            left -= n
            flags = control | (LAST_PDV if left == 0 else 0)
            pack(buf, pos, P_DATA_TF, n + 6, n + 2, context_id, flags)
            fill(view[pos + _HEAD : pos + _HEAD + n])
            self._fill = pos + _HEAD + n
            if left == 0:
                return

    def _flush(self) -> None:
        if not self._fill:
            return
        try:
            self._sock.sendall(self._view[: self._fill])
        except TimeoutError:
            self.abort()
            raise LinkLostError("the peer stopped reading (timeout)") from None
        except OSError as exc:
            raise self._lost_while_sending(exc) from None
        self._fill = 0

    def _lost_while_sending(self, exc: OSError) -> LinkLostError:
        """Why a send failed: an A-ABORT the peer sent before closing, when it is still there."""
        reason = f"connection lost: {type(exc).__name__}"
        with contextlib.suppress(LinkLostError, OSError):
            self._sock.settimeout(0.2)
            kind, _ = self._read_pdu()
            if kind == A_ABORT:
                reason = "association aborted by the peer"
        self._close()
        return LinkLostError(reason)

    def _message(self, message_id: int, field: int) -> tuple[dict[int, int], bytes | None]:
        """Read the peer's next message, which must be the ``field`` response to ``message_id``:
        its command's US fields and its data set (None when it has none)."""
        command = bytearray()
        data = bytearray()
        fields: dict[int, int] | None = None
        while True:
            kind, body = self._read_pdu()
            if kind != P_DATA_TF:
                self._other_pdu(kind)
            for control, fragment in self._pdvs(body):
                if fields is None:
                    if not control & COMMAND_PDV:
                        continue  # a data set before its command: not for us
                    command += fragment
                    if not control & LAST_PDV:
                        continue
                    fields = _command_fields(command)
                    if (
                        fields.get(0x0100) != field
                        or fields.get(0x0120) != message_id
                        or 0x0900 not in fields
                    ):
                        self.abort()
                        name = "C-STORE-RSP" if field == C_STORE_RSP else "C-FIND-RSP"
                        raise LinkLostError(f"unexpected message instead of the {name}")
                    if fields.get(0x0800, NO_DATA_SET) == NO_DATA_SET:
                        return fields, None
                elif control & COMMAND_PDV:
                    self.abort()
                    raise LinkLostError("a command where its data set was expected")
                else:
                    data += fragment
                    if control & LAST_PDV:
                        return fields, bytes(data)

    def _pdvs(self, body: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        pos, end = 0, len(body)
        while pos < end:
            if pos + 6 > end:
                break
            length, _context, control = PDV_HEADER.unpack_from(body, pos)
            if length < 2 or pos + 4 + length > end:
                break
            out.append((control, body[pos + 6 : pos + 4 + length]))
            pos += 4 + length
        else:
            return out
        self.abort()
        raise LinkLostError("malformed P-DATA-TF PDU from the peer")

    def _other_pdu(self, kind: int) -> None:
        """A PDU other than P-DATA-TF during the data transfer phase: the association ends."""
        if kind == A_ABORT:
            self._close()
            raise LinkLostError("association aborted by the peer")
        if kind == A_RELEASE_RQ:
            with contextlib.suppress(OSError):
                self._sock.sendall(RELEASE_RP_PDU)
            self._close()
            raise LinkLostError("association released by the peer")
        self.abort()
        raise LinkLostError(f"unexpected PDU type 0x{kind:02X} from the peer")

    # -- reading -----------------------------------------------------------------------------
    def _read_pdu(self) -> tuple[int, bytes]:
        kind, length = PDU_HEADER.unpack(self._recv_exact(6))
        if length > MAX_RECV_PDU:
            self.abort()
            raise LinkLostError(f"PDU of {length} bytes from the peer")
        return kind, self._recv_exact(length)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:])
            except TimeoutError:
                self.abort()
                raise LinkLostError("no answer from the peer (timeout)") from None
            except OSError as exc:
                self._close()
                raise LinkLostError(f"connection lost: {type(exc).__name__}") from None
            if not k:
                self._close()
                raise LinkLostError("connection closed by the peer")
            got += k
        return bytes(buf)

    # -- life cycle --------------------------------------------------------------------------
    def usable(self) -> bool:
        """False when the peer has closed, aborted or released the idle association (the link is
        closed then); checked before reusing it."""
        if not self.alive:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0
        except (OSError, ValueError):
            self._close()
            return False
        if not readable and not pending:
            return True
        # An idle association gets nothing but its end (an A-ABORT, an A-RELEASE-RQ, a close).
        try:
            kind, _ = self._read_pdu()
            self._other_pdu(kind if kind != P_DATA_TF else 0)
        except LinkLostError:
            pass
        self._close()
        return False

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (``timeout``) for the A-RELEASE-RP; the connection is closed."""
        if not self.alive:
            return
        try:
            self._sock.sendall(RELEASE_RQ_PDU)
            while self.alive:
                kind, _ = self._read_pdu()
                if kind in (A_RELEASE_RP, A_ABORT, A_RELEASE_RQ):
                    break  # released; aborted; or both sides asked at once (a collision)
        except (LinkLostError, OSError):
            pass
        self._close()

    def abort(self) -> None:
        """Send an A-ABORT (best effort, without waiting long) and close the connection."""
        if self.alive:
            with contextlib.suppress(OSError):
                self._sock.settimeout(min(1.0, self._timeout))
                self._sock.sendall(ABORT_PDU)
        self._close()

    def _close(self) -> None:
        self.alive = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
