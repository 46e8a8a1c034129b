"""The keyed scanner pseudonym: from the original device attributes, carried in the output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from gateway_agent.deid import Deidentifier, DeidOptions
from gateway_agent.deid.engine import _private_scanner
from gateway_agent.deid.keys import Keys
from gateway_agent.dicom.codec import Element
from gateway_agent.dicom.scanner import SCANNER_PRIVATE_CREATOR, is_scanner_pseudonym
from gateway_agent.qc import features_from_file, scanner_of
from gateway_agent.synthetic import make_ct_slice, write_series
from tests.conftest import require

SECRET = b"scanner-test-secret-0123456789ab"
DEVICE = {
    "manufacturer": "ACME Medical",
    "model": "Scanner 3000",
    "station_name": "CTROOM1",
    "device_serial": "SN-000123",
}


def _file(tmp_path: Path, name: str, **kwargs: object) -> Path:
    params = {**DEVICE, **kwargs}
    ds = make_ct_slice(rows=16, cols=16, study_seed=name, **params)  # type: ignore[arg-type]
    return write_series([ds], tmp_path / "in" / name)[0]


def _deid(station: str | None = "EDGE01", secret: bytes = SECRET, **options: bool) -> Deidentifier:
    return Deidentifier(secret, DeidOptions(**options), station_name=station)  # type: ignore[arg-type]


def test_pseudonym_replaces_the_serial_number(tmp_path: Path) -> None:
    result = _deid().deidentify_file(_file(tmp_path, "a"), tmp_path / "out")
    assert is_scanner_pseudonym(result.scanner), result.scanner
    out = pydicom.dcmread(result.path)
    assert out.DeviceSerialNumber == result.scanner
    assert out.StationName == "EDGE01"  # the edge box's unit name, as configured
    raw = result.path.read_bytes()
    for original in (b"SN-000123", b"CTROOM1"):
        assert original not in raw
    assert scanner_of(out) == result.scanner
    assert features_from_file(result.path).scanner == result.scanner


def test_same_scanner_same_pseudonym_on_every_edge_box_another_secret_unlinkable(
    tmp_path: Path,
) -> None:
    src = _file(tmp_path, "a")
    later = _file(tmp_path, "b")  # another study on the same scanner
    box1 = _deid("EDGE01").deidentify_file(src, tmp_path / "1").scanner
    box2 = _deid("EDGE02").deidentify_file(later, tmp_path / "2").scanner
    unnamed = _deid(None).deidentify_file(later, tmp_path / "3").scanner
    assert box1 == box2 == unnamed
    other = _deid(secret=b"another-site-secret-0123456789ab").deidentify_file(src, tmp_path / "4")
    assert other.scanner != box1 and is_scanner_pseudonym(other.scanner)


@pytest.mark.parametrize(
    "change",
    [
        {"device_serial": "SN-000124"},
        {"station_name": "CTROOM2"},
        {"model": "Scanner 4000"},
        {"manufacturer": "Other Corp"},
    ],
)
def test_each_device_attribute_tells_scanners_apart(tmp_path: Path, change: dict[str, str]) -> None:
    base = _deid().deidentify_file(_file(tmp_path, "a"), tmp_path / "o").scanner
    other = _deid().deidentify_file(_file(tmp_path, "b", **change), tmp_path / "o").scanner
    assert other != base


def test_padding_case_and_spaces_do_not_rename_a_scanner() -> None:
    keys = Keys(SECRET)
    a = keys.scanner_pseudonym(b"ACME Medical", b"Scanner 3000 ", b"SN-000123", b"CTROOM1\0")
    b = keys.scanner_pseudonym(b"acme  medical", b"SCANNER 3000", b" SN-000123", b"ctroom1")
    assert a == b
    assert a != keys.scanner_pseudonym(b"ACME Medical", b"Scanner 3000", b"SN-000123", b"")


def test_missing_serial_number_is_added(tmp_path: Path) -> None:
    ds = make_ct_slice(rows=16, cols=16)
    del ds.DeviceSerialNumber
    src = write_series([ds], tmp_path / "in")[0]
    result = _deid().deidentify_file(src, tmp_path / "out")
    assert pydicom.dcmread(result.path).DeviceSerialNumber == result.scanner


def test_retain_device_identity_keeps_the_serial_and_adds_a_private_element(
    tmp_path: Path,
) -> None:
    src = _file(tmp_path, "a")
    basic = _deid().deidentify_file(src, tmp_path / "basic").scanner
    result = _deid(retain_device_identity=True).deidentify_file(src, tmp_path / "kept")
    assert result.scanner == basic  # from the originals either way
    out = pydicom.dcmread(result.path)
    assert out.DeviceSerialNumber == "SN-000123"  # the option keeps it, as Annex E says
    block = out.private_block(0x0009, SCANNER_PRIVATE_CREATOR)
    assert block[0x01].value == result.scanner and block[0x01].VR == "LO"
    assert scanner_of(out) == result.scanner


def test_private_block_takes_a_free_slot() -> None:
    # A block of group 0009 kept in the output (a safe private attribute) holds slot 0x10.
    kept = [Element(0x00090010, "LO", b"OTHER CREATOR "), Element(0x00091005, "LO", b"1 ")]
    creator, value = _private_scanner(kept, "SCN-0123456789AB")
    assert (creator.tag, value.tag) == (0x00090011, 0x00091101)
    assert creator.raw.strip() == SCANNER_PRIVATE_CREATOR.encode()
    # Every block of the group taken (240 creators): no private element rather than a failure.
    full = [Element(0x00090000 | slot, "LO", b"X ") for slot in range(0x10, 0x100)]
    assert _private_scanner(full, "SCN-0123456789AB") == []


def test_dataset_path_gives_the_same_pseudonym(tmp_path: Path) -> None:
    src = _file(tmp_path, "a")
    via_file = _deid().deidentify_file(src, tmp_path / "out").scanner
    ds = pydicom.dcmread(src)
    _deid().deidentify_dataset(ds)
    assert ds.DeviceSerialNumber == via_file


def test_pseudonym_form() -> None:
    assert is_scanner_pseudonym("SCN-0123456789AB")
    for bad in ("SCN-0123456789ab", "SCN-0123456789A", "SN-000123", "ANONYMIZED", ""):
        assert not is_scanner_pseudonym(bad)


def test_dciodvfy_accepts_both_carriers(tmp_path: Path) -> None:
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    src = _file(tmp_path, "a")
    for options in ({}, {"retain_device_identity": True}):
        out = _deid(**options).deidentify_file(src, tmp_path / str(len(options))).path
        run = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, check=False)
        errors = [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors
