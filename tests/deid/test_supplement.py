"""Identifying attributes Table E.1-1 does not list: the packaged supplement, leak by leak."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import (
    dictionary_description,
    dictionary_is_retired,
    dictionary_VR,
    keyword_for_tag,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway_agent.deid import Deidentifier, DeidOptions
from gateway_agent.deid.profile import (
    OPTION_COLUMNS,
    load_rows,
    load_supplement,
    profile_for,
    resolve_compound,
)
from gateway_agent.synthetic import PHI_MARKERS, make_ct_slice, write_series
from tests.conftest import require

SECRET = b"supplement-test-secret-0123456789"
SUPPLEMENT = Path(__file__).parents[2] / "gateway_agent" / "data" / "annex_e_supplement.json"
#: Identity the synthetic CT declares (name, ID, birth date, institution): Clean Descriptors
#: scrubs exactly these words, so free text made of them leaves nothing under any default.
DECLARED = "PHIDOE PHIJANE PHIMRN4711 19450317 PHIINSTITUTE"
ALL_OFF = DeidOptions(**dict.fromkeys(OPTION_COLUMNS, False))


def _raw() -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads(SUPPLEMENT.read_text(encoding="utf-8"))["rows"]
    return rows


def _tag(text: str) -> int:
    return int(text[1:5] + text[6:10], 16)


def test_supplement_and_table_do_not_overlap() -> None:
    table = {row.exact_tag for row in load_rows()}
    tags = [row.exact_tag for row in load_supplement()]
    assert None not in tags and len(tags) == len(set(tags)) == len(_raw())
    assert not table & set(tags)


def test_supplement_rows_are_standard_attributes_with_valid_actions() -> None:
    columns = {column for column, _, _ in OPTION_COLUMNS.values()}
    for raw in _raw():
        tag = _tag(raw["tag"])
        assert keyword_for_tag(tag) == raw["keyword"], raw
        assert dictionary_description(tag) == raw["name"], raw
        assert not dictionary_is_retired(tag), raw
        assert raw["reason"].strip(), raw
        assert raw["basicProfile"] in ("X", "Z", "D", "U"), raw
        options = {k: v for k, v in raw.items() if k.endswith("Opt")}
        assert set(options) <= columns and set(options.values()) <= {"K", "C", "X"}, raw
        if raw["basicProfile"] == "U":
            assert dictionary_VR(tag) == "UI", raw


def test_every_option_resolves_every_supplement_row() -> None:
    """The profile resolves each row for each option alone, as it does the table's rows."""
    for name in ("basic", *OPTION_COLUMNS):
        flags = dict.fromkeys(OPTION_COLUMNS, False)
        if name != "basic":
            flags[name] = True
        profile = profile_for(DeidOptions(**flags))
        for row in load_supplement():
            column = OPTION_COLUMNS[name][0] if name != "basic" else None
            expected = row.options.get(column, row.basic) if column else row.basic
            assert profile.letters[row.exact_tag] == resolve_compound(expected), (name, row)


def _text(vr: str, marker: str) -> str:
    if vr == "SH":
        return marker[:16]
    if vr == "CS":
        return marker.upper()[:16]
    if vr == "UR":
        return f"https://{marker.lower()}.example/wado?patient={marker}"
    return f"{marker} {DECLARED}"


def _person_item(marker: str) -> Dataset:
    """A Person Identification Macro item, as identification sequences carry it."""
    code = Dataset()
    code.CodeValue = marker[:16]
    code.CodingSchemeDesignator = "L"
    code.CodeMeaning = f"{marker} {DECLARED}"
    item = Dataset()
    item.PersonIdentificationCodeSequence = Sequence([code])
    item.InstitutionName = "PHIINSTITUTE General Hospital"
    item.add_new(0x00400031, "UT", marker)  # Local Namespace Entity ID: in the supplement
    return item


def _planted(*, nested: bool = True) -> Dataset:
    """The synthetic CT with every supplement attribute, each carrying a PHI marker."""
    ds = make_ct_slice(rows=16, cols=16)
    markers = [m for m in PHI_MARKERS if m != "PHIPREAMBLE"]
    for i, raw in enumerate(_raw()):
        tag, marker = _tag(raw["tag"]), markers[i % len(markers)]
        vr = dictionary_VR(tag)
        if vr == "SQ":
            item = _person_item(marker) if nested else Dataset()
            if not nested:
                item.ObserverType = "PSN"  # a code string: kept, and counted by no action
            ds.add_new(tag, vr, Sequence([item]))
        elif vr == "UI":
            ds.add_new(tag, vr, f"1.2.826.0.1.19450317.{i}")
        else:
            ds.add_new(tag, vr, _text(vr, marker))
    # One HD macro deep in a sequence the table does not list (Referenced Request Sequence).
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "PHIINSTITUTE"
    issuer.UniversalEntityID = "PHIINSTITUTE.example.org"
    issuer.UniversalEntityIDType = "DNS"
    request = Dataset()
    request.StudyInstanceUID = ds.StudyInstanceUID
    request.IssuerOfAccessionNumberSequence = Sequence([issuer])
    request.OrderPlacerIdentifierSequence = Sequence([issuer])
    ds.ReferencedRequestSequence = Sequence([request])
    return ds


@pytest.mark.parametrize("options", [DeidOptions(), ALL_OFF], ids=["defaults", "basic"])
def test_no_marker_survives_in_attributes_beyond_the_table(
    tmp_path: Path, options: DeidOptions
) -> None:
    (src,) = write_series([_planted()], tmp_path / "in")
    data = src.read_bytes()
    assert all(m.encode() in data for m in PHI_MARKERS)
    out = Deidentifier(SECRET, options).deidentify_file(src, tmp_path / "out").path
    data = out.read_bytes()
    assert [m for m in PHI_MARKERS if m.encode() in data] == []
    after = pydicom.dcmread(out)
    for raw in _raw():
        tag, letter = _tag(raw["tag"]), profile_for(options).letters[_tag(raw["tag"])]
        assert (tag in after) == (letter != "X"), raw["keyword"]


@pytest.mark.parametrize("options", [DeidOptions(), ALL_OFF], ids=["defaults", "basic"])
def test_dciodvfy_finds_no_new_error(tmp_path: Path, options: DeidOptions) -> None:
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    (src,) = write_series([_planted()], tmp_path / "in")
    out = Deidentifier(SECRET, options).deidentify_file(src, tmp_path / "out").path

    def errors(path: Path) -> set[str]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        return {re.sub(r"\s+", " ", ln.strip()) for ln in lines if ln.startswith("Error")}

    assert errors(out) <= errors(src)


@pytest.mark.parametrize("options", [DeidOptions(), ALL_OFF], ids=["defaults", "basic"])
def test_the_audit_counts_them(tmp_path: Path, options: DeidOptions) -> None:
    """Each supplement attribute adds its action to the audit's counts, like a table row."""
    deid = Deidentifier(SECRET, options)

    def counts(ds: Dataset, name: str) -> Counter[str]:
        (src,) = write_series([ds], tmp_path / name)
        return Counter(deid.deidentify_file(src, tmp_path / f"{name}-out").audit["actions"])

    planted = _planted(nested=False)
    del planted.ReferencedRequestSequence
    letters = profile_for(options).letters
    expected = Counter(letters[_tag(raw["tag"])] for raw in _raw())
    got = counts(planted, "planted")
    got.subtract(counts(make_ct_slice(rows=16, cols=16), "base"))
    assert +got == expected


def test_an_animal_keeps_its_registration_sequence_empty(tmp_path: Path) -> None:
    """Breed Registration Sequence is Type 2C for an animal: emptied, its number gone."""
    ds = make_ct_slice(rows=16, cols=16, subject="veterinary")
    assert ds.BreedRegistrationSequence[0].BreedRegistrationNumber.startswith("PHIOTHERID")
    (src,) = write_series([ds], tmp_path / "in")
    for options in (DeidOptions(), ALL_OFF, DeidOptions(retain_patient_characteristics=True)):
        out = Deidentifier(SECRET, options).deidentify_file(src, tmp_path / "out").path
        after = pydicom.dcmread(out)
        assert "BreedRegistrationSequence" in after and len(after.BreedRegistrationSequence) == 0
        assert b"PHIOTHERID" not in out.read_bytes()
        # A breed is a patient characteristic: kept with the option, scrubbed text by default.
        breed = after.PatientBreedDescription
        assert breed == ("" if options == ALL_OFF else "Beagle")
        out.unlink()


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        (DeidOptions(), set()),
        (DeidOptions(retain_long_full_dates=True), {"PatientDeathDateInAlternativeCalendar"}),
    ],
    ids=["defaults", "full-dates"],
)
def test_alternative_calendar_dates_follow_the_date_options(
    tmp_path: Path, options: DeidOptions, kept: set[str]
) -> None:
    """The birth date goes under every option (as Patient's Birth Date); the death date stays
    only with Full Dates (it cannot be shifted), and the calendar with whatever date stays."""
    for birth, death in ((True, True), (True, False), (False, True)):
        ds = make_ct_slice(rows=16, cols=16)
        if birth:
            ds.PatientBirthDateInAlternativeCalendar = "13640503"
        if death:
            ds.PatientDeathDateInAlternativeCalendar = "14400101"
        ds.PatientAlternativeCalendar = "I"
        (src,) = write_series([ds], tmp_path / "in")
        out = Deidentifier(SECRET, options).deidentify_file(src, tmp_path / "out").path
        after = pydicom.dcmread(out)
        expected = kept if death else set()
        dates = {"PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar"}
        assert {k for k in dates if k in after} == expected
        assert ("PatientAlternativeCalendar" in after) == bool(expected)
        out.unlink()
