"""The PS3.15 Table E.1-1 (2024e) profile and its supplement: per-tag actions for given options."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..dicom.dictionary import vr_of

if TYPE_CHECKING:
    from ..config import DeidSettings

__all__ = [
    "BASIC_PROFILE_CODE",
    "BURNED_IN_POLICIES",
    "CID_7050",
    "CLEAN_PIXEL_DATA_CODE",
    "EDITION",
    "OPTION_COLUMNS",
    "DeidOptions",
    "Profile",
    "Row",
    "load_rows",
    "load_supplement",
    "profile_for",
    "resolve_compound",
]

EDITION = "2024e"

#: The burned-in pixel policies: clean (Clean Pixel Data, quarantine what cannot be verified),
#: quarantine (every object at risk), allow (deliver as it is, flagged in the audit).
BURNED_IN_POLICIES = ("clean", "quarantine", "allow")

#: PS3.16 CID 7050 "De-identification Method" (version 20170914): code value (DCM) -> meaning.
#: The profile, the ten options of Table E.1-1 and the two pixel options, in code order.
CID_7050: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113102": "Clean Recognizable Visual Features Option",
    "113103": "Clean Graphics Option",
    "113104": "Clean Structured Content Option",
    "113105": "Clean Descriptors Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
    "113109": "Retain Device Identity Option",
    "113110": "Retain UIDs Option",
    "113111": "Retain Safe Private Option",
    "113112": "Retain Institution Identity Option",
}
BASIC_PROFILE_CODE = "113100"
#: Recorded only when the caller cleaned the pixels (see ``Engine.run``).
CLEAN_PIXEL_DATA_CODE = "113101"

#: option field -> (table column, CID 7050 code value, code meaning)
OPTION_COLUMNS: dict[str, tuple[str, str, str]] = {
    "retain_safe_private": ("rtnSafePrivOpt", "113111", "Retain Safe Private Option"),
    "retain_uids": ("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    "retain_device_identity": ("rtnDevIdOpt", "113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("rtnInstIdOpt", "113112", "Retain Institution Identity Option"),
    "retain_patient_characteristics": (
        "rtnPatCharsOpt",
        "113108",
        "Retain Patient Characteristics Option",
    ),
    "retain_long_full_dates": (
        "rtnLongFullDatesOpt",
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_long_modified_dates": (
        "rtnLongModifDatesOpt",
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "clean_descriptors": ("cleanDescOpt", "113105", "Clean Descriptors Option"),
    "clean_structured_content": ("cleanStructContOpt", "113104", "Clean Structured Content Option"),
    "clean_graphics": ("cleanGraphOpt", "113103", "Clean Graphics Option"),
}

#: When several enabled options name the same row, the first in this order wins (see the docs):
#: the date options decide every date; then the retain options (the user asked to keep that
#: category); then the clean options.
PRECEDENCE: tuple[str, ...] = (
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeidOptions:
    """The ten PS3.15 Annex E options plus the burned-in pixel policy (immutable, hashable).

    Field names are those of :class:`gateway_agent.config.DeidSettings`; the defaults are the
    Basic Profile with Retain Longitudinal Temporal Information Modified Dates and Clean
    Descriptors, objects that may carry burned-in text cleaned (Clean Pixel Data).

    Parameters
    ----------
    retain_safe_private, retain_uids, retain_device_identity, retain_institution_identity, \
retain_patient_characteristics, retain_long_full_dates, retain_long_modified_dates, \
clean_descriptors, clean_structured_content, clean_graphics
        The Annex E options (Table E.1-1 columns). When both date options are set, Full Dates
        wins (as in the settings).
    burned_in
        ``"clean"`` (Clean Pixel Data on objects that may carry burned-in text; quarantine what
        cannot be verified), ``"quarantine"`` (refuse them) or ``"allow"``.

    Raises
    ------
    ValueError
        ``burned_in`` is not one of ``"clean"``, ``"quarantine"``, ``"allow"``.
    """

    #: The field names, in order.
    FIELDS: ClassVar[tuple[str, ...]] = (
        "retain_safe_private",
        "retain_uids",
        "retain_device_identity",
        "retain_institution_identity",
        "retain_patient_characteristics",
        "retain_long_full_dates",
        "retain_long_modified_dates",
        "clean_descriptors",
        "clean_structured_content",
        "clean_graphics",
        "burned_in",
    )

    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = False
    retain_long_full_dates: bool = False
    retain_long_modified_dates: bool = True
    clean_descriptors: bool = True
    clean_structured_content: bool = False
    clean_graphics: bool = False
    burned_in: str = "clean"  # "clean", "quarantine" or "allow"

    def __post_init__(self) -> None:
        if self.burned_in not in BURNED_IN_POLICIES:
            raise ValueError('Argument "burned_in" must be "clean", "quarantine" or "allow".')
        if self.retain_long_full_dates and self.retain_long_modified_dates:
            object.__setattr__(self, "retain_long_modified_dates", False)

    @classmethod
    def from_settings(cls, s: DeidSettings) -> DeidOptions:
        """Options from the ``[deid]`` settings section."""
        return cls(**{name: getattr(s, name) for name in cls.FIELDS})

    @classmethod
    def from_kwargs(cls, **options: Any) -> DeidOptions:
        """Options from keyword arguments; unknown names are a ``TypeError``."""
        unknown = sorted(set(options) - set(cls.FIELDS))
        if unknown:
            raise TypeError(f"unknown de-identification option(s): {', '.join(unknown)}")
        return cls(**options)

    def enabled(self) -> list[str]:
        """Names of the enabled Annex E options, in table order."""
        return [name for name in OPTION_COLUMNS if getattr(self, name)]


class Row:
    """One row of Table E.1-1."""

    __slots__ = ("basic", "id", "name", "options", "tag")

    def __init__(self, tag: str, id: str, name: str, basic: str, options: dict[str, str]) -> None:
        self.tag = tag  # as printed, e.g. "(0008,0050)" or "(50XX,XXXX)"
        self.id = id  # 8 hex digits (upper case) or the pattern for repeating / private rows
        self.name = name
        self.basic = basic
        self.options = options  # column -> action

    def __repr__(self) -> str:
        return f"Row({self.tag}, {self.name!r}, basic={self.basic!r})"

    @property
    def exact_tag(self) -> int | None:
        """The tag as an int, or None for repeating groups and the private row."""
        try:
            return int(self.id, 16)
        except ValueError:
            return None


_DATA = Path(__file__).resolve().parent.parent / "data"
_TABLE = _DATA / "annex_e_2024e.json"
_SUPPLEMENT = _DATA / "annex_e_supplement.json"

_RawRow = tuple[str, str, str, str, dict[str, str]]


def _parse_table() -> tuple[_RawRow, ...]:
    text = _TABLE.read_text(encoding="utf-8")
    rows: list[_RawRow] = []
    for raw in json.loads(text):
        opts = {k: v for k, v in raw.items() if k.endswith("Opt") and v}
        tag = raw["tag"]
        if tag.startswith("(50XX"):
            rid = "50XXXXXX"
        elif tag.startswith("(60XX"):
            rid = "60XX" + tag[6:10].upper()
        elif tag.startswith("(GGGG"):
            rid = "PRIVATE"
        else:
            rid = raw["id"].upper()
        rows.append((tag, rid, raw["name"].split("\n")[0].strip(), raw["basicProfile"], opts))
    return tuple(rows)


@cache
def load_rows() -> tuple[Row, ...]:
    """The 621 rows of the packaged table."""
    return tuple(Row(*r) for r in _parse_table())


@cache
def load_supplement() -> tuple[Row, ...]:
    """Rows for standard attributes the table does not list but that can carry identity.

    ``data/annex_e_supplement.json`` gives each one an action in the table's columns, with the
    reason (see "Attributes beyond the table" in ``docs/deidentification.md``).
    """
    rows = json.loads(_SUPPLEMENT.read_text(encoding="utf-8"))["rows"]
    return tuple(
        Row(
            raw["tag"],
            raw["tag"][1:5] + raw["tag"][6:10],
            raw["name"],
            raw["basicProfile"],
            {k: v for k, v in raw.items() if k.endswith("Opt") and v},
        )
        for raw in rows
    )


def resolve_compound(action: str) -> str:
    """One action for a compound one: the least destructive that keeps the object valid.

    ``X/Z`` -> Z, ``X/D``, ``Z/D``, ``X/Z/D`` -> D, ``X/Z/U*`` -> U (UIDs inside replaced).
    The table lists compounds where the IOD type decides (X for Type 3, Z for Type 2, D for
    Type 1); without modelling every IOD we keep the attribute with the strongest treatment
    that is still valid for any type, so no Type 1/2 attribute disappears.
    """
    if "/" not in action:
        return action
    parts = action.replace("*", "").split("/")
    for choice in ("D", "U", "Z"):
        if choice in parts:
            return choice
    return "X"  # pragma: no cover - no such compound in the table


# Resolved per-tag "operations" (what the engine does), derived from letter + VR + origin.
KEEP = 0
REMOVE = 1
EMPTY = 2
DUMMY = 3
UID = 4
SHIFT = 5  # C from a date column: shift DA/DT, keep TM
SCRUB = 6  # C on text: remove identifiers, keep the rest
SEQ = 7  # K / U on a sequence: keep, process items
SEQ_DUMMY = 8  # D on a sequence: keep structure, dummy free text inside
SEQ_CLEAN = 9  # C on a sequence: keep structure, scrub free text inside
SEQ_EMPTY = 10  # Z on a sequence
PSEUDONYM = 11  # PatientName / PatientID: keyed pseudonym (a Z/D dummy)

OP_LETTER = {
    KEEP: "K",
    REMOVE: "X",
    EMPTY: "Z",
    DUMMY: "D",
    UID: "U",
    SHIFT: "C",
    SCRUB: "C",
    SEQ: "K",
    SEQ_DUMMY: "D",
    SEQ_CLEAN: "C",
    SEQ_EMPTY: "Z",
    PSEUDONYM: "D",
}

_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_DATE_VRS = frozenset({"DA", "DT"})
_PSEUDONYM_TAGS = frozenset({0x00100010, 0x00100020})


def operation(letter: str, vr: str, column: str | None, tag: int = 0) -> int:
    """The engine operation for a resolved action letter on an attribute of ``vr``."""
    if tag in _PSEUDONYM_TAGS and letter in ("Z", "D"):
        return PSEUDONYM
    if vr == "SQ":
        return {"K": SEQ, "U": SEQ, "X": REMOVE, "Z": SEQ_EMPTY, "D": SEQ_DUMMY, "C": SEQ_CLEAN}[
            letter
        ]
    if letter == "C":
        if column in ("rtnLongModifDatesOpt",):
            if vr in _DATE_VRS:
                return SHIFT
            # Times and UTC offsets stay when only the days move; binary timestamps cannot move.
            return KEEP if vr in ("TM", "SH") else EMPTY
        if vr in _TEXT_VRS:
            return SCRUB
        return EMPTY  # binary values we cannot clean without decoding
    if letter == "U":
        return UID if vr == "UI" else DUMMY
    return {"K": KEEP, "X": REMOVE, "Z": EMPTY, "D": DUMMY}[letter]


class Profile:
    """Actions resolved for one set of options.

    ``ops`` maps exact tags to operations; ``curve_op`` / ``overlay_op`` / ``overlay_comment_op``
    cover the repeating groups; ``letters`` keeps the resolved letter per exact tag.
    """

    __slots__ = (
        "curve_op",
        "keep_safe_private",
        "letters",
        "ops",
        "options",
        "overlay_comment_op",
        "overlay_op",
    )

    def __init__(
        self,
        options: DeidOptions,
        ops: dict[int, int],
        letters: dict[int, str],
        curve_op: int,
        overlay_op: int,
        overlay_comment_op: int,
        keep_safe_private: bool,
    ) -> None:
        self.options = options
        self.ops = ops
        self.letters = letters
        self.curve_op = curve_op
        self.overlay_op = overlay_op
        self.overlay_comment_op = overlay_comment_op
        self.keep_safe_private = keep_safe_private


def _decide(row: Row, options: DeidOptions) -> tuple[str, str | None]:
    for name in PRECEDENCE:
        if not getattr(options, name):
            continue
        column = OPTION_COLUMNS[name][0]
        action = row.options.get(column)
        if action:
            return action, column
    return row.basic, None


@cache
def profile_for(options: DeidOptions) -> Profile:
    """Resolve every row of the table and its supplement for ``options`` (cached per value).

    The supplement comes first, so that a row of the table wins where both name a tag.
    """
    ops: dict[int, int] = {}
    letters: dict[int, str] = {}
    curve_op = overlay_op = overlay_comment_op = REMOVE
    keep_private = False
    for row in (*load_supplement(), *load_rows()):
        action, column = _decide(row, options)
        letter = resolve_compound(action)
        tag = row.exact_tag
        if tag is not None:
            letters[tag] = letter
            ops[tag] = operation(letter, vr_of(tag), column, tag)
        elif row.id == "50XXXXXX":
            curve_op = SEQ_CLEAN if letter == "C" else REMOVE
        elif row.id == "60XX3000":
            # Overlay bitmaps cannot be cleaned without looking at them: "C" keeps them only
            # when the operator accepted pixel content (burned_in = "allow").
            overlay_op = KEEP if letter == "C" and options.burned_in == "allow" else REMOVE
        elif row.id == "60XX4000":
            overlay_comment_op = SCRUB if letter == "C" else REMOVE
        elif row.id == "PRIVATE":
            keep_private = letter == "C"
    return Profile(options, ops, letters, curve_op, overlay_op, overlay_comment_op, keep_private)
