"""StoreSCP with real senders on 127.0.0.1 (storescu, pynetdicom): durability and refusals."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway_agent.dicom import network
from gateway_agent.dicom import scp as scp_module
from gateway_agent.dicom.link import encode_find_rq, encode_store_rq
from gateway_agent.dicom.network import Outcome, client_ssl_context, server_ssl_context
from gateway_agent.dicom.scp import INCOMING_DIR, ListenerEvent, StoreSCP, received_files, source_of
from gateway_agent.dicom.scu import StoreItem, StoreSCU
from gateway_agent.synthetic import make_ct_series, write_series
from tests._dcmtk import Storescp, echoscu, send_ct, storescu
from tests._tls import self_signed
from tests.agent._uploadkit import wait_for
from tests.conftest import require

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(make_ct_series(8, rows=64, cols=64), tmp_path_factory.mktemp("s"))


class Listener:
    def __init__(self, spool: Path, **kwargs: object) -> None:
        self.events: list[ListenerEvent] = []
        self.stored: list[tuple[Path, str]] = []
        self.scp = StoreSCP(
            spool,
            ae_title="EDGE01",
            host="127.0.0.1",
            port=0,
            on_event=self.events.append,
            on_stored=lambda p, ae: self.stored.append((p, ae)),
            **kwargs,  # type: ignore[arg-type]
        )
        self.scp.start()

    def kinds(self) -> Counter[tuple[str, str]]:
        return Counter((e.kind, e.reason) for e in self.events)


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[type[Listener]]:
    made: list[Listener] = []

    def make(**kwargs: object) -> Listener:
        spool = kwargs.pop("spool", tmp_path / "spool")
        listener = Listener(spool, **kwargs)  # type: ignore[arg-type]
        made.append(listener)
        return listener

    yield make  # type: ignore[misc]
    for listener in made:
        listener.scp.stop()


def test_storescu_series_is_kept_durably_per_source(
    listen: type[Listener], storescp: type[Storescp], series: list[Path]
) -> None:
    lst = listen()
    done = storescu(lst.scp.port, series[0].parent, aet="CT 1/A")
    assert done.returncode == 0, done.stderr
    kept = list(received_files(lst.scp.spool))
    assert len(kept) == len(series) == len(lst.stored)
    assert {source_of(p) for p in kept} == {"CT 1/A"}
    assert all(ae == "CT 1/A" for _, ae in lst.stored)
    assert kept[0].parent.name == "ae-CT%201%2FA"  # one folder per calling AE, no PHI in names
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in series}
    for p in kept:
        got = pydicom.dcmread(p)
        assert got.PixelData == sent[got.SOPInstanceUID].PixelData
        assert got.PatientName == sent[got.SOPInstanceUID].PatientName  # bytes as sent
        assert oct(p.stat().st_mode & 0o777) in ("0o600", "0o644", "0o640")
    assert not list((lst.scp.spool / INCOMING_DIR).iterdir())
    assert lst.kinds()[("stored", "")] == len(series)
    assert echoscu(lst.scp.port, aet="CT 1/A") == 0


def test_calling_ae_not_allowed_is_rejected(
    listen: type[Listener], storescp: type[Storescp], series: list[Path]
) -> None:
    lst = listen(allowed_calling_aes=["CT1"])
    done = storescu(lst.scp.port, series[:1], aet="INTRUDER")
    assert done.returncode != 0 and "Calling AE Title Not Recognized" in done.stderr
    assert storescu(lst.scp.port, series[:1], aet="CT1").returncode == 0
    wrong = storescu(lst.scp.port, series[:1], aet="CT1", aec="NOTUS")
    assert "Called AE Title Not Recognized" in wrong.stderr
    assert lst.kinds()[("rejected", "calling AE title not recognised")] == 1
    assert lst.kinds()[("rejected", "called AE title not recognised")] == 1
    assert len(list(received_files(lst.scp.spool))) == 1


def test_closed_gate_answers_out_of_resources(listen: type[Listener], series: list[Path]) -> None:
    gate = {"open": False}
    lst = listen(accept=lambda: gate["open"])
    assert send_ct(lst.scp.port, series[:3], calling="SCANNER") == [0xA700] * 3
    assert list(received_files(lst.scp.spool)) == []
    assert not list((lst.scp.spool / INCOMING_DIR).iterdir())
    gate["open"] = True
    assert send_ct(lst.scp.port, series[:3], calling="SCANNER") == [0] * 3
    assert lst.kinds()[("refused", "intake_paused")] == 3


def test_write_failure_answers_out_of_resources_and_keeps_the_association(
    listen: type[Listener], tmp_path: Path, series: list[Path]
) -> None:
    spool = tmp_path / "small"
    spool.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)],
        capture_output=True,
        check=False,
    )
    require(mounted.returncode == 0, "mounting a tmpfs (root)")
    try:
        big = make_ct_series(1, rows=256, cols=256)[0]  # 128 KiB of pixels: does not fit
        big_path = tmp_path / "big.dcm"
        big.save_as(big_path, enforce_file_format=True)
        lst = listen(spool=spool)
        statuses = send_ct(lst.scp.port, [big_path, series[0]], calling="SCANNER")
        assert statuses == [0xA700, 0]  # the association went on after the failed write
        assert [p.parent.name for p in received_files(spool)] == ["ae-SCANNER"]
        assert lst.kinds()[("refused", "write_failed: ENOSPC")] == 1
        assert not list((spool / INCOMING_DIR).iterdir())
        lst.scp.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True, check=False)


def test_partial_receipts_are_cleaned(listen: type[Listener], tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / INCOMING_DIR).mkdir(parents=True)
    leftover = spool / INCOMING_DIR / ".recv-old.dcm"
    leftover.write_bytes(b"partial")
    lst = listen(spool=spool)  # start-up removes what an earlier run left
    assert not leftover.exists()
    fresh = spool / INCOMING_DIR / ".recv-new.dcm"
    fresh.write_bytes(b"in progress")
    old = spool / INCOMING_DIR / ".recv-stale.dcm"
    old.write_bytes(b"aborted long ago")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert lst.scp.clean_incoming(max_age=600) == 1
    assert fresh.exists() and not old.exists()


def test_source_of_round_trips_odd_titles(tmp_path: Path) -> None:
    for title in ("CT1", "A B", "x/y", "..", "%41", "."):
        folder = tmp_path / ("ae-" + quote(title, safe=""))
        assert source_of(folder / "1.dcm") == title
    assert source_of(tmp_path / "inbox" / "x.dcm") == ""


# -- the listener's own data transfer phase ----------------------------------------------------
def test_requests_pynetdicom_read_before_it_stopped_are_served(
    listen: type[Listener], series: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender starts as soon as it has the A-ASSOCIATE-AC; pynetdicom's DUL thread reads
    those PDUs before it is stopped. They must reach the listener, not pynetdicom's DIMSE."""
    unread: list[int] = []

    def late(assoc: object, timeout: float = 5.0) -> tuple[object, bytes]:
        time.sleep(0.3)  # the sender's first PDUs arrive meanwhile
        sock, data = network.detach_accepted(assoc, timeout)
        unread.append(len(data))
        return sock, data

    monkeypatch.setattr(scp_module, "detach_accepted", late)
    lst = listen()
    assert send_ct(lst.scp.port, series, calling="SCANNER") == [0] * len(series)
    done = storescu(lst.scp.port, series[0].parent, aet="CT1")
    assert done.returncode == 0, done.stderr
    assert len(unread) == 2 and all(n > 0 for n in unread), unread
    kept = {pydicom.dcmread(p).SOPInstanceUID for p in received_files(lst.scp.spool)}
    assert kept == {pydicom.dcmread(p).SOPInstanceUID for p in series}
    assert lst.kinds()[("stored", "")] == 2 * len(series)


def _raw_association(port: int) -> socket.socket:
    """An association from pynetdicom whose socket the test then writes by hand."""
    ae = AE(ae_title="RAW")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="EDGE01")
    assert assoc.is_established
    return network.detach_socket(assoc)


def _pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    n = len(fragment)
    return struct.pack(">BxIIBB", 0x04, n + 6, n + 2, context_id, control) + fragment


def test_abort_in_the_middle_of_a_data_set_leaves_nothing(
    listen: type[Listener], series: list[Path]
) -> None:
    lst = listen()
    sock = _raw_association(lst.scp.port)
    command = encode_store_rq(CT, "1.2.3.4", 1)
    sock.sendall(_pdata(1, 0x03, command) + _pdata(1, 0x00, b"\x08\x00" * 500))
    assert wait_for(lambda: list((lst.scp.spool / INCOMING_DIR).iterdir()), 10)  # partial
    sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT
    sock.close()
    assert wait_for(lambda: not list((lst.scp.spool / INCOMING_DIR).iterdir()), 10)
    assert list(received_files(lst.scp.spool)) == []
    assert send_ct(lst.scp.port, series[:1], calling="SCANNER") == [0]  # the listener goes on


def test_a_service_we_do_not_offer_aborts_the_association(
    listen: type[Listener], series: list[Path]
) -> None:
    lst = listen()
    sock = _raw_association(lst.scp.port)
    sock.settimeout(10)
    sock.sendall(_pdata(1, 0x03, encode_find_rq(CT, 7)) + _pdata(1, 0x02, b""))
    assert sock.recv(10)[:1] == b"\x07"  # A-ABORT
    sock.close()
    assert send_ct(lst.scp.port, series[:1], calling="SCANNER") == [0]


@pytest.mark.slow
def test_large_instance_is_received_in_bounded_memory(listen: type[Listener], big_ct: Path) -> None:
    lst = listen()
    tracemalloc.start()
    try:
        done = storescu(lst.scp.port, [big_ct], aet="CT1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done.returncode == 0, done.stderr
    [kept] = received_files(lst.scp.spool)
    assert kept.stat().st_size >= big_ct.stat().st_size - 1024
    # One read buffer and one write buffer of 256 KiB for the association.
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB instance"


def test_tls_listener_receives_from_a_verifying_sender(
    listen: type[Listener], tmp_path: Path, series: list[Path]
) -> None:
    cert, key = self_signed(tmp_path)
    lst = listen(ssl_context=server_ssl_context(cert, key))
    scu = StoreSCU(
        "127.0.0.1", lst.scp.port, "EDGE01", "CT1", ssl_context=client_ssl_context(ca_file=cert)
    )
    try:
        results = scu.send([StoreItem(i, p, CT) for i, p in enumerate(series)])
    finally:
        scu.close()
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * len(series)
    kept = {pydicom.dcmread(p).SOPInstanceUID for p in received_files(lst.scp.spool)}
    assert kept == {pydicom.dcmread(p).SOPInstanceUID for p in series}
