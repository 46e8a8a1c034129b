"""The recorded method (PS3.15 E.1.1): CID 7050 codes and text for exactly the options applied."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes as sr_codes

from gateway_agent.deid import DeidOptions
from gateway_agent.deid.engine import Engine
from gateway_agent.deid.keys import Keys
from gateway_agent.deid.profile import CID_7050, OPTION_COLUMNS, profile_for
from gateway_agent.dicom.codec import Element, decode_text

SECRET = b"method-codes-secret-0123456789ab"


def test_cid_7050_is_the_standards() -> None:
    """13 codes (113112 included), as pydicom's copy of PS3.16 has them."""
    cid = sr_codes.cid7050
    reference = {getattr(cid, k).value: getattr(cid, k).meaning for k in cid.dir()}
    assert all(getattr(cid, k).scheme_designator == "DCM" for k in cid.dir())
    assert reference == CID_7050
    assert len(CID_7050) == 13 and CID_7050["113112"] == "Retain Institution Identity Option"
    for _, code, meaning in OPTION_COLUMNS.values():
        assert CID_7050[code] == meaning


def _method(options: DeidOptions, **kw: bool) -> tuple[list[tuple[str, str, str]], list[str]]:
    engine = Engine(Keys(SECRET), profile_for(options), None)
    out = {e.tag: e for e in engine.run([Element(0x00080018, "UI", b"1.2.3\0")], **kw).elements}
    items = [tuple(decode_text(el.raw, "latin-1") for el in item) for item in out[0x00120064].items]
    text = decode_text(out[0x00120063].raw, "latin-1").split("\\")
    assert decode_text(out[0x00120062].raw, "latin-1") == "YES"
    return items, text  # type: ignore[return-value]


CONFIGS = [[], *([name] for name in OPTION_COLUMNS), list(OPTION_COLUMNS)]


@pytest.mark.parametrize("enabled", CONFIGS, ids=lambda c: "+".join(c) or "basic")
@pytest.mark.parametrize("pixels", [False, True])
def test_codes_name_exactly_the_options_applied(enabled: list[str], pixels: bool) -> None:
    flags = {name: name in enabled for name in OPTION_COLUMNS}
    options = DeidOptions(**flags)
    items, text = _method(options, pixels_cleaned=pixels)
    expected = {"113100"} | {OPTION_COLUMNS[n][1] for n in options.enabled()}
    if pixels:
        expected.add("113101")
    assert {value for value, _, _ in items} == expected
    assert "113102" not in expected  # Clean Recognizable Visual Features is never applied
    for value, scheme, meaning in items:
        assert scheme == "DCM" and meaning == CID_7050[value]
        assert len(meaning) <= 64  # LO
    assert text[0] == "PS3.15 E.1-1 2024e Basic Profile"
    assert sorted(text[1:]) == sorted(CID_7050[v] for v in expected - {"113100"})
