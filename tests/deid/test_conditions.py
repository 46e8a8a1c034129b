"""Conditional attributes follow their condition: paediatric, veterinary and clinical-trial CTs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from gateway_agent.deid import Deidentifier, DeidOptions
from gateway_agent.deid.conditions import SPECIES_TAGS
from gateway_agent.synthetic import PHI_MARKERS, make_ct_slice, write_series
from tests.conftest import require

SECRET = b"conditions-secret-0123456789abcd"
CASES = [
    ("paediatric", False),
    ("veterinary", False),
    ("adult", True),
    ("veterinary", True),
]
OPTIONS = {
    "basic": DeidOptions(),
    "institution": DeidOptions(retain_institution_identity=True),
    "characteristics": DeidOptions(retain_patient_characteristics=True),
}


def _errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return {re.sub(r"\s+", " ", ln.strip()) for ln in lines if ln.startswith("Error")}


def _deidentify(
    tmp_path: Path, subject: str, trial: bool, options: DeidOptions
) -> tuple[Path, Path]:
    ds = make_ct_slice(rows=16, cols=16, subject=subject, clinical_trial=trial)
    (src,) = write_series([ds], tmp_path / "in")
    out = Deidentifier(SECRET, options).deidentify_file(src, tmp_path / "out").path
    return src, out


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize(("subject", "trial"), CASES)
def test_dependents_go_with_their_condition(
    tmp_path: Path, subject: str, trial: bool, option: str
) -> None:
    src, out = _deidentify(tmp_path, subject, trial, OPTIONS[option])
    before, after = pydicom.dcmread(src), pydicom.dcmread(out)
    assert "ResponsiblePersonRole" not in after
    assert "ClinicalTrialProtocolEthicsCommitteeName" not in after
    assert "ClinicalTrialProtocolEthicsCommitteeApprovalNumber" not in after
    if subject == "veterinary":  # Type 2C for an animal: kept, empty
        assert after.ResponsiblePerson == "" and after.ResponsibleOrganization == ""
        assert after.PatientSpeciesDescription == before.PatientSpeciesDescription
    else:
        assert "ResponsiblePerson" not in after and "ResponsibleOrganization" not in after
    if trial:
        assert after.ClinicalTrialSubjectID and after.ClinicalTrialSponsorName
    # Retain Institution Identity keeps the institution's name and address, by definition.
    kept = {"PHIINSTITUTE", "PHISTREET"} if option == "institution" else set()
    data = out.read_bytes()
    assert not [m for m in PHI_MARKERS if m not in kept and m.encode() in data]


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize(("subject", "trial"), CASES)
def test_dciodvfy_finds_no_new_error(
    tmp_path: Path, subject: str, trial: bool, option: str
) -> None:
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    src, out = _deidentify(tmp_path, subject, trial, OPTIONS[option])
    assert _errors(src) == set()  # the synthetic objects are valid
    assert _errors(out) == set()


def test_a_human_keeps_no_empty_responsible_person(tmp_path: Path) -> None:
    """Only an animal needs the emptied Type 2C attributes; for a child they are removed (X)."""
    ds = make_ct_slice(rows=16, cols=16, subject="paediatric")
    ds.ResponsibleOrganization = "PHIINSTITUTE Children's Services"
    (src,) = write_series([ds], tmp_path / "in")
    out = pydicom.dcmread(Deidentifier(SECRET).deidentify_file(src, tmp_path / "out").path)
    assert not {"ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization"} & set(
        out.dir()
    )


def test_subject_is_checked() -> None:
    with pytest.raises(ValueError, match="subject"):
        make_ct_slice(rows=8, cols=8, subject="martian")


@pytest.mark.parametrize("retain_uids", [False, True])
def test_an_emptied_referenced_study_sequence_goes(tmp_path: Path, retain_uids: bool) -> None:
    """Referenced Study Sequence (X/Z) is Type 3 with one or more items at the top level."""
    ds = make_ct_slice(rows=16, cols=16)
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    ds.ReferencedStudySequence = Sequence([ref])
    (src,) = write_series([ds], tmp_path / "in")
    options = DeidOptions(retain_uids=retain_uids)
    out = Deidentifier(SECRET, options).deidentify_file(src, tmp_path / "out").path
    after = pydicom.dcmread(out)
    if retain_uids:  # K: kept as it is
        assert after.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ds.StudyInstanceUID
    else:
        assert "ReferencedStudySequence" not in after
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    assert _errors(out) <= _errors(src)


#: The attributes with which dciodvfy takes the patient for an animal (each alone makes it
#: require Responsible Person): species, breed and strain.
ANIMAL = [
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
]


@pytest.mark.parametrize("keyword", ANIMAL)
def test_any_species_breed_or_strain_attribute_makes_an_animal(
    tmp_path: Path, keyword: str
) -> None:
    """dciodvfy takes any of them for an animal, so the Type 2C attributes must stay."""
    assert {Tag(k) for k in ANIMAL} == SPECIES_TAGS
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    ds = make_ct_slice(rows=16, cols=16, subject="paediatric")
    ds.ResponsibleOrganization = "PHIINSTITUTE Kennel"
    vr = dictionary_VR(keyword)
    ds.add_new(keyword, vr, Sequence([Dataset()]) if vr == "SQ" else "X")
    (src,) = write_series([ds], tmp_path / "in")
    out = Deidentifier(SECRET).deidentify_file(src, tmp_path / "out").path
    after = pydicom.dcmread(out)
    assert after.ResponsiblePerson == "" and after.ResponsibleOrganization == ""
    assert _errors(out) <= _errors(src)
