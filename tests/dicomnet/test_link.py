"""StoreLink, the sender's own data transfer phase (C-STORE, C-FIND): framing, answers, ends, peers.

The first tests play the peer on the other end of a real socket pair (a misbehaving peer cannot
be had from a real server); the others send to dcmtk's storescp, Orthanc and a pynetdicom
acceptor on 127.0.0.1 and compare the bytes they received with the files.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_FIND_RQ, C_FIND_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from gateway_agent.dicom.files import parse_file_meta, read_file_meta
from gateway_agent.dicom.link import (
    A_ABORT,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
    FileSlice,
    LinkLostError,
    StoreLink,
    encode_find_rq,
    encode_store_rq,
)
from gateway_agent.dicom.network import Outcome
from gateway_agent.dicom.query import STUDY_ROOT_FIND, identifier, listed_uid
from gateway_agent.dicom.scu import AssociationError, StoreItem, StoreSCU
from gateway_agent.synthetic import make_ct_series, write_series
from tests._dcmtk import Storescp
from tests._orthanc import OrthancServer, free_port, start_orthanc

CT = "1.2.840.10008.5.1.4.1.1.2"
_PDU = struct.Struct(">BxI")


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two 512 x 512 slices (about 525 kB: several sends of PDUs), explicit and implicit VR."""
    d = tmp_path_factory.mktemp("slices")
    explicit = write_series(make_ct_series(1, rows=512, cols=512, study_seed="link-e"), d / "e")
    ds = make_ct_series(1, rows=512, cols=512, study_seed="link-i")[0]
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = d / "implicit.dcm"
    ds.save_as(implicit, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return [*explicit, implicit]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("small")
    return write_series(make_ct_series(1, rows=32, cols=32, study_seed="link-s"), d)[0]


def data_set(path: Path) -> bytes:
    """The bytes after a part-10 file's meta group: what goes over the wire."""
    return path.read_bytes()[read_file_meta(path).data_offset :]


def pynetdicom_command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 0
    req.DataSet = BytesIO(b"\0\0")
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return bytes(encode(msg.command_set, True, True) or b"")


def find_command(message_id: int) -> bytes:
    req = C_FIND()
    req.MessageID = message_id
    req.AffectedSOPClassUID = STUDY_ROOT_FIND
    req.Priority = 0
    req.Identifier = BytesIO(b"\0\0")
    msg = C_FIND_RQ()
    msg.primitive_to_message(req)
    return bytes(encode(msg.command_set, True, True) or b"")


def find_response(message_id: int, status: int, with_identifier: bool) -> bytes:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = STUDY_ROOT_FIND
    rsp.Status = status
    if with_identifier:
        rsp.Identifier = BytesIO(b"\0\0")
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    return bytes(encode(msg.command_set, True, True) or b"")


def response_command(message_id: int, status: int) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = "1.2.3"
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    return bytes(encode(msg.command_set, True, True) or b"")


# -- the command set ----------------------------------------------------------------------------
@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths (padding)
def test_command_set_is_the_one_pynetdicom_encodes(instance: str) -> None:
    assert encode_store_rq(CT, instance, 7) == pynetdicom_command(CT, instance, 7)


def test_c_find_command_and_identifier_are_the_ones_pynetdicom_reads() -> None:
    assert encode_find_rq(STUDY_ROOT_FIND, 9) == find_command(9)
    raw = identifier("1.2.3", "1.2.3.4", ["1.2.3.4.5", "1.2.3.4.66"])
    ds = pydicom.dcmread(BytesIO(raw), force=True)  # implicit VR little endian, no meta
    assert ds.QueryRetrieveLevel == "IMAGE"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")
    assert list(ds.SOPInstanceUID) == ["1.2.3.4.5", "1.2.3.4.66"]
    assert listed_uid(identifier("1.2.3", "1.2.3.4", ["1.2.3.4.5"])) == "1.2.3.4.5"
    assert listed_uid(b"\x08\x00") == ""  # cut short: no UID rather than an error


# -- a peer played on the other end of a socket pair ---------------------------------------------
class Peer:
    """The far end of a socket pair: reads the PDUs a link sends, answers what a test says."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._exact(6)
        kind, length = _PDU.unpack(head)
        return kind, self._exact(length)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def read_request(self) -> tuple[list[int], bytes, bytes]:
        """(PDU lengths, command, data set) of one C-STORE-RQ, checking the PDV framing."""
        lengths: list[int] = []
        parts: dict[bool, bytearray] = {True: bytearray(), False: bytearray()}
        done: set[bool] = set()
        while len(done) < 2:
            kind, body = self.read_pdu()
            assert kind == P_DATA_TF
            lengths.append(len(body))
            item, context, control = struct.unpack_from(">IBB", body)
            assert item == len(body) - 4  # one PDV per PDU
            assert context == 1
            is_command = bool(control & 1)
            assert is_command not in done
            assert is_command or True in done  # the command set comes first
            parts[is_command] += body[6:]
            if control & 2:
                done.add(is_command)
        return lengths, bytes(parts[True]), bytes(parts[False])

    def send_pdu(self, kind: int, body: bytes) -> None:
        self.sock.sendall(_PDU.pack(kind, len(body)) + body)

    def send_command(self, command: bytes, fragments: int = 1) -> None:
        step = -(-len(command) // fragments)
        pieces = [command[i : i + step] for i in range(0, len(command), step)]
        for i, piece in enumerate(pieces):
            control = 0x03 if i == len(pieces) - 1 else 0x01
            self.send_pdu(P_DATA_TF, struct.pack(">IBB", len(piece) + 2, 1, control) + piece)


@pytest.fixture
def pair() -> Iterator[Callable[..., tuple[StoreLink, Peer]]]:
    socks: list[socket.socket] = []

    def make(*, send_pdu: int = 16384, timeout: float = 10.0) -> tuple[StoreLink, Peer]:
        ours, theirs = socket.socketpair()
        socks.extend((ours, theirs))
        return StoreLink(ours, send_pdu=send_pdu, timeout=timeout), Peer(theirs)

    yield make
    for s in socks:
        s.close()


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_request_framed_in_the_peers_pdu_length_and_response_read(
    pair: Callable[..., tuple[StoreLink, Peer]], small: Path
) -> None:
    link, peer = pair(send_pdu=100)  # the command set itself takes two PDUs
    meta = read_file_meta(small)
    seen: list[tuple[list[int], bytes, bytes]] = []

    def serve() -> None:
        for message_id, status in ((1, 0xB000), (2, 0x0000)):
            seen.append(peer.read_request())
            peer.send_command(response_command(message_id, status), fragments=3)

    t = in_thread(serve)
    data = FileSlice(small, meta.data_offset)
    assert link.store(1, CT, meta.sop_instance_uid, 1, data) == 0xB000
    assert link.store(1, CT, meta.sop_instance_uid, 2, data) == 0x0000
    t.join(10)
    lengths, command, body = seen[0]
    assert max(lengths) == 100 and len(lengths) > 20
    assert command == pynetdicom_command(CT, meta.sop_instance_uid, 1)
    assert body == data_set(small)
    assert seen[1][2] == body
    assert link.alive


def test_a_data_set_in_memory_goes_the_same_way(
    pair: Callable[..., tuple[StoreLink, Peer]],
) -> None:
    link, peer = pair(send_pdu=0)  # "no limit": PDUs of at most 1 MiB
    payload = bytes(range(256)) * 9000  # 2.3 MB: three PDUs
    got: list[tuple[list[int], bytes, bytes]] = []

    def serve() -> None:
        got.append(peer.read_request())
        peer.send_command(response_command(5, 0))

    t = in_thread(serve)
    assert link.store(1, CT, "1.2.3", 5, payload) == 0
    t.join(10)
    lengths, _, body = got[0]
    assert body == payload
    assert lengths[1:] == [1 << 20, 1 << 20, len(payload) - 2 * ((1 << 20) - 6) + 6]


def test_c_find_reads_pending_answers_until_the_final_status(
    pair: Callable[..., tuple[StoreLink, Peer]],
) -> None:
    link, peer = pair(send_pdu=64)  # the identifier itself takes several PDUs
    query = identifier("1.2.3", "1.2.3.4", [f"1.2.3.4.{i}" for i in range(10)])
    seen: list[tuple[list[int], bytes, bytes]] = []

    def serve() -> None:
        seen.append(peer.read_request())
        for uid in ("1.2.3.4.1", "1.2.3.4.7"):
            peer.send_command(find_response(3, 0xFF00, True), fragments=2)
            answer = identifier("1.2.3", "1.2.3.4", [uid])
            for i, piece in enumerate((answer[:10], answer[10:])):  # a data set in two PDVs
                control = 0x02 if i else 0x00
                peer.send_pdu(P_DATA_TF, struct.pack(">IBB", len(piece) + 2, 1, control) + piece)
        peer.send_command(find_response(3, 0x0000, False))

    t = in_thread(serve)
    status, answers = link.find(1, STUDY_ROOT_FIND, query, 3)
    t.join(10)
    assert status == 0 and [listed_uid(a) for a in answers] == ["1.2.3.4.1", "1.2.3.4.7"]
    lengths, command, body = seen[0]
    assert command == find_command(3) and body == query and max(lengths) == 64
    assert link.alive


def test_a_c_find_answer_to_another_message_aborts(
    pair: Callable[..., tuple[StoreLink, Peer]],
) -> None:
    link, peer = pair()
    after: list[int] = []

    def serve() -> None:
        peer.read_request()
        peer.send_command(find_response(4, 0x0000, False))
        after.append(peer.read_pdu()[0])

    t = in_thread(serve)
    with pytest.raises(LinkLostError, match="instead of the C-FIND-RSP"):
        link.find(1, STUDY_ROOT_FIND, identifier("1.2", "1.2.3", ["1.2.3.4"]), 3)
    t.join(10)
    assert after == [A_ABORT] and not link.alive


def test_a_response_to_another_message_aborts(
    pair: Callable[..., tuple[StoreLink, Peer]], small: Path
) -> None:
    link, peer = pair()
    after: list[int] = []

    def serve() -> None:
        peer.read_request()
        peer.send_command(response_command(99, 0))
        after.append(peer.read_pdu()[0])

    t = in_thread(serve)
    with pytest.raises(LinkLostError, match="instead of the C-STORE-RSP"):
        link.store(1, CT, "1.2.3", 1, FileSlice(small, read_file_meta(small).data_offset))
    t.join(10)
    assert after == [A_ABORT]
    assert not link.alive


@pytest.mark.parametrize(
    ("answer", "reason", "reply"),
    [
        ((A_ABORT, b"\0\0\0\0"), "association aborted by the peer", None),
        ((A_RELEASE_RQ, b"\0\0\0\0"), "association released by the peer", A_RELEASE_RP),
        (None, "connection closed by the peer", None),
        ((0x02, b"\0" * 10), "unexpected PDU type 0x02 from the peer", A_ABORT),
    ],
)
def test_the_association_ends_when_the_peer_says_so(
    pair: Callable[..., tuple[StoreLink, Peer]],
    answer: tuple[int, bytes] | None,
    reason: str,
    reply: int | None,
) -> None:
    link, peer = pair()
    replies: list[int] = []

    def serve() -> None:
        peer.read_request()
        if answer is None:
            peer.sock.shutdown(socket.SHUT_RDWR)
            return
        peer.send_pdu(*answer)
        with contextlib.suppress(EOFError, OSError):
            replies.append(peer.read_pdu()[0])

    t = in_thread(serve)
    with pytest.raises(LinkLostError) as info:
        link.store(1, CT, "1.2.3", 1, b"\0" * 1000)
    t.join(10)
    assert info.value.reason == reason
    assert replies == ([reply] if reply is not None else [])
    assert not link.alive


def test_a_silent_peer_times_out_and_gets_an_abort(
    pair: Callable[..., tuple[StoreLink, Peer]],
) -> None:
    link, peer = pair(timeout=0.3)
    after: list[int] = []

    def serve() -> None:
        peer.read_request()
        after.append(peer.read_pdu()[0])

    t = in_thread(serve)
    with pytest.raises(LinkLostError, match="timeout"):
        link.store(1, CT, "1.2.3", 1, b"\0" * 100)
    t.join(10)
    assert after == [A_ABORT]


def test_an_idle_link_notices_that_the_peer_dropped_it(
    pair: Callable[..., tuple[StoreLink, Peer]],
) -> None:
    link, peer = pair()
    assert link.usable()
    peer.send_pdu(A_ABORT, b"\0\0\0\0")
    assert not link.usable()
    assert not link.alive
    with pytest.raises(LinkLostError):
        link.store(1, CT, "1.2.3", 1, b"")


def test_release_waits_for_the_peers_answer(pair: Callable[..., tuple[StoreLink, Peer]]) -> None:
    link, peer = pair()
    got: list[int] = []

    def serve() -> None:
        got.append(peer.read_pdu()[0])
        peer.send_pdu(A_RELEASE_RP, b"\0\0\0\0")

    t = in_thread(serve)
    link.release()
    t.join(10)
    assert got == [A_RELEASE_RQ]
    assert not link.alive


# -- real peers ---------------------------------------------------------------------------------
def _pynetdicom_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("RequestorThread") or "run_reactor" in t.name
    }


def test_byte_exact_at_storescp_in_its_smallest_pdus(
    storescp: type[Storescp], tmp_path: Path, slices: list[Path]
) -> None:
    """dcmtk writes what it received as it is (``+B``); PDUs of 4 kB (its minimum)."""
    with storescp(tmp_path / "out", args=["+B", "-pdu", "4096"]) as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01", idle_release=30)
        before = _pynetdicom_threads()
        try:
            results = scu.send([StoreItem(i, p, CT) for i, p in enumerate(slices)])
            [idle] = scu._idle
            assert idle.link.send_pdu == 4096
            # Negotiated, then pynetdicom's threads are gone: nothing polls while idle.
            assert _pynetdicom_threads() <= before
        finally:
            scu.close()
        got = scp.files()
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * len(slices)
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in got}
    for path in slices:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert data_set(received[uid]) == data_set(path)
    syntaxes = {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in got}
    assert syntaxes == {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@pytest.mark.orthanc
def test_byte_exact_at_orthanc(slices: list[Path]) -> None:
    pacs: OrthancServer = start_orthanc(dicom=True, dicom_peers={"EDGE01": ("127.0.0.1", 11112)})
    try:
        scu = StoreSCU("127.0.0.1", pacs.dicom_port, pacs.dicom_aet, "EDGE01")
        try:
            results = scu.send([StoreItem(i, p, CT) for i, p in enumerate(slices)])
        finally:
            scu.close()
        assert [r.status for r in results] == [0] * len(slices)
        for path in slices:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            stored = pacs.instance_file(uid)
            assert stored[parse_file_meta(stored).data_offset :] == data_set(path)
    finally:
        pacs.close()


def test_a_peer_with_a_tiny_maximum_pdu(
    tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pynetdicom acceptor that takes PDUs of 64 bytes: the command set too is fragmented."""
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    received: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.DataSet.getvalue())
        return 0

    ae = AE(ae_title="TINY")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.maximum_pdu_size = 64
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        scu = StoreSCU("127.0.0.1", port, "TINY", "EDGE01")
        try:
            [result] = scu.send([StoreItem("s", small, CT)])
        finally:
            scu.close()
    finally:
        server.shutdown()
    assert result.status == 0
    assert received == [data_set(small)]


def test_peer_aborting_in_the_middle_of_a_data_set(
    storescp: type[Storescp], tmp_path: Path, slices: list[Path]
) -> None:
    with storescp(tmp_path / "out", args=["--abort-during", "-pdu", "4096"]) as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01", timeout=10)
        try:
            with pytest.raises(AssociationError) as info:
                scu.send([StoreItem(i, p, CT) for i, p in enumerate(slices)])
            assert scu.idle_associations() == 0
        finally:
            scu.close()
        assert scp.files() == []
    assert info.value.results == []  # nothing acknowledged: nothing may count as sent
    assert info.value.reason.startswith("C-STORE: ")


def test_a_file_shorter_than_its_meta_fails_alone_and_the_link_goes_on(
    pair: Callable[..., tuple[StoreLink, Peer]], small: Path, tmp_path: Path
) -> None:
    """Cut between reading its meta and sending it: nothing sent, the association still usable."""
    link, peer = pair()
    meta = read_file_meta(small)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(small.read_bytes()[: meta.data_offset - 10])
    with pytest.raises(OSError, match="shorter than its meta"):
        link.store(1, CT, meta.sop_instance_uid, 1, FileSlice(cut, meta.data_offset))
    assert link.alive and link.usable()
    got: list[tuple[list[int], bytes, bytes]] = []

    def serve() -> None:
        got.append(peer.read_request())
        peer.send_command(response_command(2, 0))

    t = in_thread(serve)
    assert link.store(1, CT, meta.sop_instance_uid, 2, FileSlice(small, meta.data_offset)) == 0
    t.join(10)
    assert got[0][2] == data_set(small)  # nothing of the cut file came first


def test_a_file_cut_short_while_being_sent_aborts(
    pair: Callable[..., tuple[StoreLink, Peer]], tmp_path: Path
) -> None:
    """The peer got part of a data set that will never be complete: only an A-ABORT ends it."""
    link, peer = pair()
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x5a" * (8 << 20))
    kinds: list[int] = []

    def serve() -> None:
        kinds.append(peer.read_pdu()[0])  # the command set; the link is sending the data set
        with big.open("r+b") as fh:
            fh.truncate(1000)
        with contextlib.suppress(EOFError, OSError):
            while True:
                kinds.append(peer.read_pdu()[0])
                if kinds[-1] != P_DATA_TF:
                    break

    t = in_thread(serve)
    with pytest.raises(LinkLostError, match="cut short"):
        link.store(1, CT, "1.2.3", 1, FileSlice(big, 0))
    t.join(10)
    assert kinds[0] == P_DATA_TF and kinds[-1] == A_ABORT
    assert not link.alive
