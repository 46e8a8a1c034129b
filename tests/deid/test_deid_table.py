"""Every row of PS3.15 Table E.1-1 (2024e) and its supplement: plant, check (basic + options)."""

from __future__ import annotations

import struct
from datetime import date

import pytest

from gateway_agent.deid.conditions import (
    ANIMAL_TYPE_2C,
    DEPENDENTS,
    SPECIES_TAGS,
    TYPE_3_SEQUENCES,
)
from gateway_agent.deid.engine import Engine
from gateway_agent.deid.keys import Keys
from gateway_agent.deid.profile import (
    OPTION_COLUMNS,
    DeidOptions,
    load_rows,
    load_supplement,
    profile_for,
    resolve_compound,
)
from gateway_agent.dicom.codec import Element, decode_text
from gateway_agent.dicom.dictionary import vr_of

SECRET = b"table-test-secret-0123456789"
ID = "PHIMRN4711"
# Attributes the engine itself writes after the walk.
WRITTEN = {0x00120062, 0x00120063, 0x00120064, 0x00280303}


def _even(raw: bytes, pad: bytes = b" ") -> bytes:
    return raw + pad if len(raw) % 2 else raw


def planted(tag: int, vr: str, idx: int) -> bytes | list[list[Element]]:
    text = {
        "AE": f"AE{idx}",
        "AS": "042Y",
        "CS": f"CS{idx}",
        "DA": "20200102",
        "DT": "20200102030405",
        "TM": "030405",
        "DS": "1.5",
        "IS": "7",
        "PN": f"DOC{idx}^{ID}",
        "UR": f"http://x/{idx}",
    }
    if tag == 0x00100020:
        return _even(ID.encode())
    if tag == 0x00100010:
        return _even(b"PHIDOE^PHIJANE")
    if vr == "UI":
        return _even(f"1.2.3.{idx}".encode(), b"\0")
    if vr in text:
        return _even(text[vr].encode())
    if vr in ("LO", "LT", "SH", "ST", "UT", "UC"):
        return _even(f"W{idx} {ID}".encode())
    if vr == "SQ":
        return [[Element(0x00080100, "SH", _even(f"CV{idx}".encode()))]]
    sizes = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "AT": 4, "FD": 8, "SV": 8, "UV": 8}
    if vr in sizes:
        return b"\x07" + b"\0" * (sizes[vr] - 1)
    return b"\x01\x02"  # OB, OW, OD, OF, OL, OV, UN


def _rows() -> list[tuple[int, str, object]]:
    """Every exact row of the table, then of its supplement (same checks for both)."""
    out = []
    for row in (*load_rows(), *load_supplement()):
        tag = row.exact_tag
        if tag is None or tag in WRITTEN:
            continue
        out.append((tag, vr_of(tag), row))
    return out


CONFIGS = ["basic", *OPTION_COLUMNS]


def _options(config: str) -> DeidOptions:
    flags = {name: False for name in OPTION_COLUMNS}
    if config != "basic":
        flags[config] = True
    return DeidOptions(**flags, burned_in="allow")


def _expected(row: object, options: DeidOptions) -> tuple[str, str | None]:
    from gateway_agent.deid.profile import _decide

    action, column = _decide(row, options)  # type: ignore[arg-type]
    return resolve_compound(action), column


def _is_date(s: str) -> bool:
    try:
        date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("config", CONFIGS)
def test_every_row(config: str) -> None:
    options = _options(config)
    keys = Keys(SECRET)
    engine = Engine(keys, profile_for(options), None)
    rows = _rows()
    elements = [Element(tag, vr, planted(tag, vr, i)) for i, (tag, vr, _) in enumerate(rows)]
    if not any(e.tag == 0x00080018 for e in elements):  # pragma: no cover - it is a row
        elements.append(Element(0x00080018, "UI", b"1.2.3.4\0"))
    elements.sort(key=lambda e: e.tag)
    planted_by_tag = {e.tag: e.value for e in elements}
    out = {e.tag: e for e in engine.run(elements).elements}
    issuer = planted_by_tag[0x00100021]
    assert isinstance(issuer, bytes)
    offset = keys.day_offset(b"id|" + ID.encode() + b"|" + issuer.strip(b"\0 "))

    failures = []
    for tag, vr, row in rows:
        letter, column = _expected(row, options)
        if tag in DEPENDENTS and DEPENDENTS[tag][0] not in out:
            letter = "X"  # a Type 1C attribute goes with the attribute its condition names
        if tag in ANIMAL_TYPE_2C and letter == "X" and SPECIES_TAGS & planted_by_tag.keys():
            letter = "Z"  # Type 2C for an animal (breed attributes are planted): emptied
        if tag in TYPE_3_SEQUENCES and letter == "Z":
            letter = "X"  # X/Z: an empty Type 3 sequence is invalid at the top level
        before = planted_by_tag[tag]
        got = out.get(tag)
        where = f"{row.tag} {row.name} [{row.basic} -> {letter}]"  # type: ignore[attr-defined]
        if letter == "X":
            if got is not None:
                failures.append(f"{where}: still present")
            continue
        if got is None:
            failures.append(f"{where}: removed")
            continue
        if vr == "SQ":
            n = len(got.items)
            if (letter == "Z" and n != 0) or (letter != "Z" and n != 1):
                failures.append(f"{where}: {n} items")
            continue
        value = got.raw
        text = value.decode("latin-1").strip("\0 ")
        if letter == "K" and value != before:
            failures.append(f"{where}: changed")
        elif letter == "Z" and value and tag not in (0x00100010, 0x00100020):
            failures.append(f"{where}: not empty")
        elif letter in ("Z", "D") and tag in (0x00100010, 0x00100020):
            if ID in text or "PHIDOE" in text or not text:
                failures.append(f"{where}: no pseudonym")
        elif letter == "D":
            if value == before:
                failures.append(f"{where}: dummy equals planted value")
        elif letter == "U":
            if vr == "UI" and text != keys.uid(before.decode().strip("\0")):  # type: ignore[union-attr]
                failures.append(f"{where}: UID not keyed")
        elif letter == "C":
            if column == "rtnLongModifDatesOpt" and vr in ("DA", "DT"):
                old = date(2020, 1, 2)
                if not _is_date(text[:8]):
                    failures.append(f"{where}: shifted value invalid")
                elif (date(int(text[:4]), int(text[4:6]), int(text[6:8])) - old).days != offset:
                    failures.append(f"{where}: not shifted by the patient offset")
                elif vr == "DT" and text[8:] != "030405":
                    failures.append(f"{where}: time changed")
            elif column == "rtnLongModifDatesOpt" and vr in ("TM", "SH"):
                if value != before:
                    failures.append(f"{where}: time changed")
            elif vr in ("LO", "LT", "SH", "ST", "UT", "UC", "AE"):
                cleaned = decode_text(value, "latin-1")
                if ID in cleaned or (vr != "AE" and not cleaned.startswith("W")):
                    failures.append(f"{where}: not cleaned ({cleaned!r})")
            elif vr in ("OB", "OW", "UN") and value:
                failures.append(f"{where}: binary value kept")
    assert not failures, "\n".join(failures)
    assert 0 < abs(offset) <= 365


def test_compound_resolution() -> None:
    assert resolve_compound("X/Z") == "Z"
    assert resolve_compound("X/D") == "D"
    assert resolve_compound("Z/D") == "D"
    assert resolve_compound("X/Z/D") == "D"
    assert resolve_compound("X/Z/U*") == "U"
    assert resolve_compound("K") == "K"


def test_table_is_complete() -> None:
    rows = load_rows()
    assert len(rows) == 621
    assert sum(1 for r in rows if r.exact_tag is None) == 4  # 50xx, 60xx3000, 60xx4000, private


def _repeating(config: str) -> dict[int, Element]:
    options = _options(config)
    engine = Engine(Keys(SECRET), profile_for(options), None)
    els = [
        Element(0x00080018, "UI", b"1.2.3.4\0"),
        Element(0x00090010, "LO", b"ACME"),
        Element(0x00091001, "LO", b"PHIPRIVATE "),
        Element(0x00100020, "LO", _even(ID.encode())),
        Element(0x00430010, "LO", b"GEMS_PARM_01"),
        Element(0x00431027, "SH", b"1.375:1 "),
        Element(0x50000010, "US", struct.pack("<H", 3)),
        Element(0x50000022, "LO", _even(f"curve {ID}".encode())),
        Element(0x60000010, "US", struct.pack("<H", 2)),
        Element(0x60003000, "OW", b"\xff\xff"),
        Element(0x60004000, "LT", _even(f"overlay {ID}".encode())),
    ]
    return {e.tag: e for e in engine.run(els).elements}


def test_repeating_groups_and_private_basic() -> None:
    out = _repeating("basic")
    assert not [t for t in out if t >> 16 in (0x5000, 0x6000)]
    assert not [t for t in out if (t >> 16) & 1]


def test_clean_graphics_keeps_curves_and_scrubs_their_text() -> None:
    out = _repeating("clean_graphics")
    assert out[0x50000010].raw == struct.pack("<H", 3)
    assert ID not in out[0x50000022].raw.decode()
    assert ID not in out[0x60004000].raw.decode()
    assert 0x60003000 in out  # overlay bitmaps kept only because burned_in == "allow"
    strict = Engine(Keys(SECRET), profile_for(DeidOptions(clean_graphics=True)), None)
    els = [Element(0x00080018, "UI", b"1.2.3.4\0"), Element(0x60003000, "OW", b"\xff\xff")]
    assert all(e.tag >> 16 != 0x6000 for e in strict.run(els).elements)


def test_retain_safe_private_keeps_only_the_safe_list() -> None:
    out = _repeating("retain_safe_private")
    assert out[0x00431027].raw == b"1.375:1 "
    assert 0x00430010 in out
    assert 0x00091001 not in out and 0x00090010 not in out


def test_options_are_an_immutable_hashable_value() -> None:
    """DeidOptions is a value: equal options are one profile, and nothing can change it later."""
    import pickle

    a = DeidOptions(retain_uids=True, burned_in="allow")
    b = DeidOptions.from_kwargs(retain_uids=True, burned_in="allow")
    assert a == b and hash(a) == hash(b) and a != DeidOptions()
    assert profile_for(a) is profile_for(b)  # cached per value
    assert pickle.loads(pickle.dumps(a)) == a  # noqa: S301 - our own bytes
    with pytest.raises(AttributeError):
        a.retain_uids = False
    with pytest.raises(AttributeError):
        del a.burned_in
    assert "retain_uids=True" in repr(a) and "burned_in='allow'" in repr(a)
    # Full Dates wins over Modified Dates (as in the settings); bad values are refused early.
    both = DeidOptions(retain_long_full_dates=True, retain_long_modified_dates=True)
    assert both.enabled().count("retain_long_full_dates") == 1
    assert not both.retain_long_modified_dates
    with pytest.raises(ValueError, match="burned_in"):
        DeidOptions(burned_in="yes")
    with pytest.raises(TypeError, match="unknown de-identification option"):
        DeidOptions.from_kwargs(retain_everything=True)
    with pytest.raises(TypeError):
        DeidOptions(True)  # type: ignore[call-arg]  # keyword-only: eleven booleans in a row misread
