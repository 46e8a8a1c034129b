"""The identity a cleaned image must not show: header values in the spellings a reader sees."""

from __future__ import annotations

from ...dicom.codec import Element, decode_text
from ..profile import DeidOptions
from .verify import IdentityTokens

__all__ = ["identity_tokens"]

#: Person names (PN): patient, relatives, physicians, operators.
_NAMES = (
    0x00100010,  # PatientName
    0x00101001,  # OtherPatientNames
    0x00101005,  # PatientBirthName
    0x00101060,  # PatientMotherBirthName
    0x00080090,  # ReferringPhysicianName
    0x00081048,  # PhysiciansOfRecord
    0x00081050,  # PerformingPhysicianName
    0x00081060,  # NameOfPhysiciansReadingStudy
    0x00081070,  # OperatorsName
    0x00321032,  # RequestingPhysician
)
_IDS = (
    0x00100020,  # PatientID
    0x00101000,  # OtherPatientIDs
    0x00080050,  # AccessionNumber
    0x00200010,  # StudyID
)
_BIRTH = (0x00100030,)  # PatientBirthDate
_DATES = (
    0x00080020,  # StudyDate
    0x00080021,  # SeriesDate
    0x00080022,  # AcquisitionDate
    0x00080023,  # ContentDate
)
_INSTITUTION = (
    0x00080080,  # InstitutionName
    0x00080081,  # InstitutionAddress
    0x00081040,  # InstitutionalDepartmentName
)


def identity_tokens(
    elements: list[Element], codec: str | None, options: DeidOptions
) -> IdentityTokens:
    """Tokens from the input's top-level attributes that the profile removes or replaces.

    Dates other than the birth date are left out when the profile keeps them unmodified;
    institution values when it retains institution identity (E.3.1: only information the
    profile removes must be removed from the pixels).
    """
    top = {e.tag: e for e in elements if isinstance(e.value, bytes)}

    def values(tags: tuple[int, ...]) -> list[str]:
        out: list[str] = []
        for tag in tags:
            el = top.get(tag)
            if el is not None and el.raw:
                out.extend(v.strip(" \0") for v in decode_text(el.raw, codec).split("\\"))
        return [v for v in out if v]

    dates = values(_BIRTH)
    if not options.retain_long_full_dates:
        dates += values(_DATES)
    institutions = [] if options.retain_institution_identity else values(_INSTITUTION)
    return IdentityTokens.from_values(
        names=values(_NAMES), ids=values(_IDS), dates=dates, institutions=institutions
    )
