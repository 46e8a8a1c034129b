"""StoreSCU against real peers on 127.0.0.1: Orthanc, dcmtk storescp with faults, pynetdicom."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pydicom
import pynetdicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE, AllStoragePresentationContexts, evt

from gateway_agent.dicom.network import (
    Outcome,
    Rejection,
    classify_store_status,
    client_ssl_context,
    status_meaning,
)
from gateway_agent.dicom.scu import AssociationError, StoreItem, StoreResult, StoreSCU
from gateway_agent.synthetic import make_ct_series, write_series
from tests._dcmtk import Storescp, write_profile
from tests._orthanc import OrthancServer, free_port
from tests._tls import self_signed

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _items(paths: list[Path]) -> list[StoreItem]:
    return [StoreItem(i, p, CT) for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(make_ct_series(12, rows=64, cols=64), tmp_path_factory.mktemp("s"))


# -- statuses ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (0x0000, Outcome.SUCCESS),
        (0xB000, Outcome.WARNING),
        (0xB006, Outcome.WARNING),
        (0xB007, Outcome.WARNING),
        (0xA700, Outcome.RETRY),
        (0xA7FF, Outcome.RETRY),
        (0xA900, Outcome.FAILURE),
        (0xC000, Outcome.FAILURE),
        (0xC123, Outcome.FAILURE),
        (0x0122, Outcome.FAILURE),
        (0x0110, Outcome.FAILURE),
    ],
)
def test_store_status_classes(status: int, outcome: Outcome) -> None:
    got, reason = classify_store_status(status)
    assert got is outcome
    assert reason.startswith(f"0x{status:04X} ")
    assert status_meaning(status) in reason


def test_rejection_meanings() -> None:
    called = Rejection(1, 1, 7)
    assert called.permanent and called.misconfigured
    assert "called AE title not recognised" in called.describe()
    assert Rejection(1, 1, 3).misconfigured
    busy = Rejection(2, 3, 2)
    assert not busy.permanent and not busy.misconfigured
    assert "local limit exceeded" in busy.describe()


def _send_retrying(scu: StoreSCU, items: list[StoreItem]) -> list[StoreResult]:
    """``send``, once more after a lost association: on a loaded machine Orthanc now and then
    drops one, and the agent's uploader would simply try again (sending twice is harmless)."""
    try:
        return scu.send(items)
    except AssociationError:
        time.sleep(0.5)
        return scu.send(items)


# -- Orthanc ----------------------------------------------------------------------------------
@pytest.mark.orthanc
def test_series_arrives_once_over_a_reused_association(
    pacs: OrthancServer, series: list[Path]
) -> None:
    scu = StoreSCU("127.0.0.1", pacs.dicom_port, "ORTHANC", "EDGE01", idle_release=30)
    try:
        items = _items(series)
        first = _send_retrying(scu, items[:6])
        assert scu.idle_associations() == 1
        second = _send_retrying(scu, items[6:])
        assert scu.idle_associations() == 1  # the same association served both batches
        assert [r.outcome for r in first + second] == [Outcome.SUCCESS] * len(series)
        assert all(r.status == 0 for r in first + second)
    finally:
        scu.close()
    uids = pacs.sop_uids()
    assert sorted(uids) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in series)


@pytest.mark.orthanc
def test_wrong_called_ae_is_a_misconfiguration(pacs: OrthancServer, series: list[Path]) -> None:
    scu = StoreSCU("127.0.0.1", pacs.dicom_port, "NOTORTHANC", "EDGE01")
    with pytest.raises(AssociationError) as info:
        scu.send(_items(series[:1]))
    assert info.value.misconfigured
    assert info.value.rejection is not None and info.value.rejection.diagnostic == 7
    assert "called AE title not recognised" in str(info.value)
    assert pacs.count_instances() == 0


@pytest.mark.orthanc
def test_peer_stopped_then_started_again(pacs: OrthancServer, series: list[Path]) -> None:
    scu = StoreSCU("127.0.0.1", pacs.dicom_port, "ORTHANC", "EDGE01", idle_release=30)
    try:
        assert scu.send(_items(series[:2]))[0].outcome is Outcome.SUCCESS
        pacs.stop()
        with pytest.raises(AssociationError) as info:
            scu.send(_items(series[2:4]))
        assert not info.value.misconfigured
        assert info.value.results == []
        pacs.start()
        # The idle association died with the old process: a fresh one is opened transparently.
        results = scu.send(_items(series[2:4]))
        assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2
    finally:
        scu.close()
    assert pacs.count_instances() == 4


# -- dcmtk storescp faults ----------------------------------------------------------------------
def test_refused_association(storescp: type[Storescp], tmp_path: Path, series: list[Path]) -> None:
    with storescp(tmp_path / "out", args=["--refuse"]) as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01")
        with pytest.raises(AssociationError) as info:
            scu.send(_items(series[:2]))
    assert info.value.rejection is not None and not info.value.misconfigured


def test_peer_aborts_mid_association(
    storescp: type[Storescp], tmp_path: Path, series: list[Path]
) -> None:
    with storescp(tmp_path / "out", args=["--abort-after"]) as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01")
        with pytest.raises(AssociationError) as info:
            scu.send(_items(series[:3]))
        scu.close()
    assert info.value.results == []  # nothing was acknowledged: nothing may count as sent


def _send_to_profile(
    storescp: type[Storescp],
    tmp_path: Path,
    sop_classes: list[str],
    syntaxes: list[str],
    paths: list[Path],
) -> tuple[list[StoreResult], list[Path]]:
    """Send ``paths`` (CT) to a storescp that accepts only ``sop_classes`` in ``syntaxes``: the
    results, and the files the receiver wrote."""
    profile = write_profile(tmp_path / "only.cfg", sop_classes, syntaxes)
    with storescp(tmp_path / "out", args=["-xf", str(profile), "Only"]) as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01")
        results = scu.send(_items(paths))
        scu.close()
        return results, scp.files()


def test_refused_sop_class_fails_per_instance(
    storescp: type[Storescp], tmp_path: Path, series: list[Path]
) -> None:
    results, got = _send_to_profile(storescp, tmp_path, [MR], [ExplicitVRLittleEndian], series[:2])
    assert got == []
    assert [r.outcome for r in results] == [Outcome.FAILURE] * 2
    assert all("presentation context refused" in r.reason and CT in r.reason for r in results)


def test_explicit_converted_to_implicit_when_only_that_is_accepted(
    storescp: type[Storescp], tmp_path: Path, series: list[Path]
) -> None:
    results, got = _send_to_profile(storescp, tmp_path, [CT], [ImplicitVRLittleEndian], series[:2])
    assert [r.outcome for r in results] == [Outcome.SUCCESS] * 2
    assert len(got) == 2
    ds = pydicom.dcmread(got[0])
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    original = pydicom.dcmread(series[0])
    assert ds.SOPInstanceUID in {pydicom.dcmread(p).SOPInstanceUID for p in series[:2]}
    assert ds.PixelData == original.PixelData or ds.SOPInstanceUID != original.SOPInstanceUID


def test_compressed_syntax_not_accepted_is_not_decompressed(
    storescp: type[Storescp], tmp_path: Path
) -> None:
    ds = make_ct_series(1, rows=32, cols=32)[0]
    ds.compress(RLELossless, encoding_plugin="pydicom")
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    profile = write_profile(tmp_path / "explicit.cfg", [CT], [ExplicitVRLittleEndian])
    with storescp(tmp_path / "out", args=["-xf", str(profile), "Only"]) as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01")
        [result] = scu.send([StoreItem("rle", path, CT)])
        scu.close()
    assert result.outcome is Outcome.FAILURE
    assert RLELossless in result.reason and "compressed" in result.reason


def test_missing_file_fails_alone(
    storescp: type[Storescp], tmp_path: Path, series: list[Path]
) -> None:
    with storescp(tmp_path / "out") as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01")
        items = [*_items(series[:1]), StoreItem("gone", tmp_path / "gone.dcm", CT)]
        ok, gone = scu.send(items)
        scu.close()
    assert ok.outcome is Outcome.SUCCESS
    assert gone.outcome is Outcome.FAILURE and gone.reason == "file missing"


def test_idle_association_is_released(
    storescp: type[Storescp], tmp_path: Path, series: list[Path]
) -> None:
    with storescp(tmp_path / "out") as scp:
        scu = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01", idle_release=0.2)
        scu.send(_items(series[:1]))
        assert scu.idle_associations() == 1
        end = time.monotonic() + 5
        while scu.idle_associations() and time.monotonic() < end:
            time.sleep(0.05)
        assert scu.idle_associations() == 0
        scu.close()


# -- memory: a large instance to a peer that accepts PDUs of any length -----------------------
@pytest.mark.slow
def test_large_instance_is_streamed_in_bounded_memory(
    big_ct: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = big_ct
    size = path.stat().st_size

    received: list[int] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset_path.stat().st_size)
        return 0

    ae = AE(ae_title="BIG")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = 0  # "any length": a careless sender would send one 32 MiB PDU
    # pynetdicom writes the data set to a temporary file as its PDUs arrive.
    monkeypatch.setattr(pynetdicom._config, "STORE_RECV_CHUNKED_DATASET", True)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        scu = StoreSCU("127.0.0.1", port, "BIG", "EDGE01")
        tracemalloc.start()
        try:
            [result] = scu.send([StoreItem("big", path, CT)])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            scu.close()
    finally:
        server.shutdown()
    assert result.outcome is Outcome.SUCCESS
    assert received and received[0] >= size - 1024
    # Both sides in this process: the sender's one buffer of PDUs of at most 1 MiB, the
    # receiver's PDUs written to disk as they arrive (about 5 MiB whatever the size; a
    # whole-file read would be 64 MiB at least).
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB file"


# -- DICOM TLS ----------------------------------------------------------------------------------
def test_tls_peer_verified_with_its_ca(
    storescp: type[Storescp], tmp_path: Path, series: list[Path]
) -> None:
    cert, key = self_signed(tmp_path)
    with storescp(tmp_path / "out", args=["+tls", str(key), str(cert), "-ic"]) as scp:
        ok = StoreSCU(
            "127.0.0.1",
            scp.port,
            scp.aet,
            "EDGE01",
            ssl_context=client_ssl_context(ca_file=cert),
        )
        [result] = ok.send(_items(series[:1]))
        ok.close()
        # Verification is on by default: a certificate no CA vouches for is refused.
        strict = StoreSCU(
            "127.0.0.1", scp.port, scp.aet, "EDGE01", ssl_context=client_ssl_context()
        )
        with pytest.raises(AssociationError) as info:
            strict.send(_items(series[1:2]))
        # ... and plain TCP to a TLS port is no association either.
        plain = StoreSCU("127.0.0.1", scp.port, scp.aet, "EDGE01", timeout=3)
        with pytest.raises(AssociationError):
            plain.send(_items(series[1:2]))
        assert len(scp.files()) == 1
    assert result.outcome is Outcome.SUCCESS
    assert str(info.value) == "TLS handshake failed: self-signed certificate"
