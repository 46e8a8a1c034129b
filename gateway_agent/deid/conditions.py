"""IOD rules the profile alone would break: dependents of removed attributes, animals' Type 2C.

Table E.1-1 acts on each attribute alone; PS3.3 ties some attributes together. Three kinds of
tie are broken by the Basic Profile (with its supplement) and its options, found by running
dciodvfy on objects that carry every standard attribute, once per Storage SOP Class, before and
after de-identification (the list is in ``docs/deidentification.md``):

* a Type 1C attribute "required if" another one is present (with a value), and not allowed
  otherwise: when the profile removes or empties that other attribute, the dependent goes too;
* a Type 2C attribute "required if the patient is an animal" that the profile removes (X): for
  an animal it is emptied instead (Z), which keeps the object valid and holds no value;
* Referenced Study Sequence (X/Z): Type 3 with one or more items at the top level (General
  Study Module), Type 2 only inside Referenced Request Sequence items. Emptied (Z) it is invalid
  at the top level, so there it is removed (X), as the table's X/Z intends for a Type 3.
"""

from __future__ import annotations

from ..dicom.codec import Element

__all__ = [
    "ANIMAL_TYPE_2C",
    "DEPENDENTS",
    "LOOKUP_TAGS",
    "SPECIES_TAGS",
    "TYPE_3_SEQUENCES",
    "apply",
]

#: dependent -> (the attribute its condition names, whether that attribute needs a value)
DEPENDENTS: dict[int, tuple[int, bool]] = {
    # Patient Module: Responsible Person Role (0010,2298) 1C "Required if Responsible Person is
    # present and has a value."; Responsible Person (0010,2297) is X.
    0x00102298: (0x00102297, True),
    # Clinical Trial Subject Module: Clinical Trial Protocol Ethics Committee Name (0012,0081)
    # 1C "Required if Clinical Trial Protocol Ethics Committee Approval Number (0012,0082) is
    # present."; the Approval Number is X, the Name D (K with Retain Institution Identity).
    0x00120081: (0x00120082, False),
    # Patient Module: Patient's Alternative Calendar (0010,0035) 1C "Required if either Patient's
    # Birth Date in Alternative Calendar (0010,0033) or Patient's Death Date in Alternative
    # Calendar (0010,0034) is present."; the supplement removes the birth date under every
    # option, and keeps the death date and the calendar only with Full Dates.
    0x00100035: (0x00100034, False),
}

#: Patient Module attributes that are Type 2C "Required if the patient is an animal" and X in
#: Table E.1-1 (Patient's Sex Neutered is X/Z there, so already emptied): tag -> VR.
ANIMAL_TYPE_2C: dict[int, str] = {
    0x00102297: "PN",  # Responsible Person
    0x00102299: "LO",  # Responsible Organization
}

#: Attributes that only an animal carries (species, breed, strain): the patient is an animal.
SPECIES_TAGS = frozenset(
    {
        0x00100212,  # Strain Description
        0x00100213,  # Strain Nomenclature
        0x00100216,  # Strain Stock Sequence
        0x00100218,  # Strain Additional Information
        0x00100219,  # Strain Code Sequence
        0x00102201,  # Patient Species Description
        0x00102202,  # Patient Species Code Sequence
        0x00102292,  # Patient Breed Description
        0x00102293,  # Patient Breed Code Sequence
        0x00102294,  # Breed Registration Sequence
    }
)

#: Sequences that are Type 3 with one or more items at the top level: removed when emptied.
TYPE_3_SEQUENCES = frozenset({0x00081110})  # Referenced Study Sequence

#: Top-level attributes whose presence in the input means :func:`apply` has work to do.
LOOKUP_TAGS = frozenset(DEPENDENTS) | frozenset(ANIMAL_TYPE_2C) | TYPE_3_SEQUENCES
#: Output attributes :func:`apply` looks at: those above and the ones the conditions name.
_FOUND_TAGS = LOOKUP_TAGS | {condition for condition, _ in DEPENDENTS.values()}


def apply(out: list[Element], top: dict[int, Element]) -> list[Element]:
    """Restore the conditions on the de-identified top-level elements ``out``.

    ``top`` holds the input's top-level elements of :data:`LOOKUP_TAGS` and
    :data:`SPECIES_TAGS` (at least); call only when it has one of :data:`LOOKUP_TAGS`.
    """
    found = {el.tag: el for el in out if el.tag in _FOUND_TAGS}
    if not SPECIES_TAGS.isdisjoint(top):
        for tag, vr in ANIMAL_TYPE_2C.items():
            if tag in top and tag not in found:
                found[tag] = Element(tag, vr, b"")
                out.append(found[tag])
    drop = {tag for tag in TYPE_3_SEQUENCES if tag in found and not found[tag].items}
    for dependent, (condition, needs_value) in DEPENDENTS.items():
        if dependent not in found:
            continue
        el = found.get(condition)
        if el is None or (needs_value and not el.raw.strip(b"\0 ")):
            drop.add(dependent)
    return [el for el in out if el.tag not in drop] if drop else out
