"""Clean Descriptors on text in ISO 2022 character sets (PS3.5 Annexes H and I examples)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.dataset import Dataset

from gateway_agent.deid import Deidentifier
from gateway_agent.deid.iso2022 import iso2022_for
from gateway_agent.synthetic import make_ct_slice, write_series
from tests.conftest import require

SECRET = b"charsets-secret-0123456789abcdef"

# (Specific Character Set, Patient's Name, name parts that must never come out, the description
# with the name in it, what the cleaned description reads, a description without any name)
CASES = {
    # PS3.5 H.3.1: Japanese, JIS X 0208 (kanji, hiragana) after the default repertoire.
    "H.3.1": (
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ["Yamada", "Tarou", "山田", "太郎", "やまだ", "たろう"],
        "胸部CT 山田太郎 様 Yamada",
        "胸部CT *** 様 ***",
        "胸部 造影 あり",
    ),
    # PS3.5 H.3.2: JIS X 0201 katakana as value 1, then JIS X 0208.
    "H.3.2": (
        ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        ["ﾔﾏﾀﾞ", "ﾀﾛｳ", "山田", "太郎", "やまだ", "たろう"],
        "ﾔﾏﾀﾞ ﾀﾛｳ 胸部CT",
        "*** *** 胸部CT",
        "ｷｮｳﾌﾞ 胸部",
    ),
    # PS3.5 I.2: Korean, KS X 1001 (hanja, hangul) after the default repertoire.
    "I.2": (
        ["", "ISO 2022 IR 149"],
        "Hong^Gildong=洪^吉洞=홍^길동",
        ["Hong", "Gildong", "洪吉洞", "홍길동", "길동"],
        "흉부 CT 홍길동 Gildong",
        "흉부 CT *** ***",
        "흉부 CT 조영",
    ),
    # JIS X 0212 (supplementary kanji) beside JIS X 0208.
    "IR 159": (
        ["", "ISO 2022 IR 87", "ISO 2022 IR 159"],
        "Mori^Ougai=森^鷗外",
        ["Mori", "Ougai", "森", "鷗外"],
        "頭部MRI 鷗外 Mori",
        "頭部MRI *** ***",
        "頭部MRI",
    ),
}


def _write(tmp_path: Path, charset: list[str], name: str, **text: str) -> Path:
    ds = make_ct_slice(rows=8, cols=8, plant_phi=False)
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.PatientID = "CHARSET01"
    for keyword, value in text.items():
        setattr(ds, keyword, value)
    (path,) = write_series([ds], tmp_path / "in")
    return path


def _raw(path: Path, keyword: str) -> bytes:
    raw = pydicom.dcmread(path).get_item(keyword).value  # before anything decodes it
    assert isinstance(raw, bytes), keyword
    return raw.rstrip(b" ")


def _deid(src: Path, tmp_path: Path) -> Path:
    return Deidentifier(SECRET).deidentify_file(src, tmp_path / "out").path


@pytest.mark.parametrize("case", sorted(CASES))
def test_names_are_scrubbed_and_text_kept(tmp_path: Path, case: str) -> None:
    charset, name, parts, described, cleaned, plain = CASES[case]
    src = _write(
        tmp_path,
        charset,
        name,
        StudyDescription=described,
        SeriesDescription=plain,
        ImageComments=f"{plain} {described}",
    )
    out = _deid(src, tmp_path)
    ds = pydicom.dcmread(out)
    encodings = convert_encodings(charset)
    assert ds.StudyDescription == cleaned
    assert ds.ImageComments == f"{plain} {cleaned}"
    for keyword in ("StudyDescription", "ImageComments", "SeriesDescription"):
        text = str(ds[keyword].value)
        assert not [p for p in parts if p in text], (keyword, text)
        # The bytes decode with pydicom, and are what pydicom itself would write for the text.
        raw = _raw(out, keyword)
        assert decode_bytes(raw, encodings, {0x0D, 0x0A, 0x09, 0x0C}) == text
        assert encode_string(text, encodings) == raw
    # A value with nothing to clean keeps its bytes.
    assert _raw(out, "SeriesDescription") == _raw(src, "SeriesDescription")
    assert ds.SpecificCharacterSet == pydicom.dcmread(src).SpecificCharacterSet
    assert "ANONYMIZED" not in ds.StudyDescription
    everything = " ".join(str(el.value) for el in ds.iterall() if el.VR not in ("OB", "OW"))
    assert not [p for p in parts if p in everything]


def test_multi_line_text(tmp_path: Path) -> None:
    """IR 87 text keeps its lines; IR 149 text of several lines stays dummied (see iso2022)."""
    src = _write(
        tmp_path / "jp",
        ["", "ISO 2022 IR 87"],
        CASES["H.3.1"][1],
        ImageComments="山田 太郎\r\n胸部CT",
    )
    assert pydicom.dcmread(_deid(src, tmp_path / "jp")).ImageComments == "*** ***\r\n胸部CT"
    src = _write(
        tmp_path / "ko",
        ["", "ISO 2022 IR 149"],
        CASES["I.2"][1],
        ImageComments="홍길동\r\n흉부 CT",
        StudyDescription="흉부 CT 홍길동",
    )
    out = pydicom.dcmread(_deid(src, tmp_path / "ko"))
    assert out.ImageComments == "ANONYMIZED"
    assert out.StudyDescription == "흉부 CT ***"


def test_gb2312_and_undecodable_text_stay_dummied(tmp_path: Path) -> None:
    assert iso2022_for(b"\\ISO 2022 IR 58") is None
    assert iso2022_for(b"ISO_IR 192\\ISO 2022 IR 87") is None
    assert iso2022_for(b"\\ISO 2022 IR 999 ") is None
    ds = make_ct_slice(rows=8, cols=8, plant_phi=False)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = CASES["H.3.1"][1]
    ds.StudyDescription = "頭部CT"
    ds.SeriesDescription = "胸部"
    (src,) = write_series([ds], tmp_path / "in")
    # An escape to a character set the value does not declare (KS X 1001), in a description
    # that holds a name.
    encoded = encode_string("胸部", convert_encodings(ds.SpecificCharacterSet))
    assert len(encoded) == 10
    blob = src.read_bytes().replace(encoded, b"\x1b$)C\xc8\xab\xc8\xab  ")
    src.write_bytes(blob)
    out = pydicom.dcmread(_deid(src, tmp_path))
    assert out.SeriesDescription == "ANONYMIZED"
    assert out.StudyDescription == "頭部CT"


def test_person_names_round_trip() -> None:
    """Encoding decoded person names gives back the PS3.5 bytes, component by component."""
    for case in ("H.3.1", "H.3.2", "I.2"):
        charset, name = CASES[case][0], CASES[case][1]
        encodings = convert_encodings(charset)
        raw = pydicom.valuerep.PersonName(name, encodings).encode()
        iso = iso2022_for("\\".join(charset).encode())
        assert iso is not None
        assert iso.decode(raw, "PN") == name
        assert iso.encode(name, "PN") == raw
        assert iso.encode("***^" + name.split("^", 1)[1], "PN") is not None


def test_sequence_items_use_the_character_set(tmp_path: Path) -> None:
    src_ds = make_ct_slice(rows=8, cols=8, plant_phi=False)
    src_ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    src_ds.PatientName = CASES["H.3.1"][1]
    src_ds.PatientID = "CHARSET01"
    item = Dataset()
    item.RequestedProcedureDescription = "胸部CT 山田太郎"
    src_ds.RequestAttributesSequence = pydicom.sequence.Sequence([item])
    src_ds.StudyDescription = "胸部CT 山田太郎"
    (src,) = write_series([src_ds], tmp_path / "in")
    out = pydicom.dcmread(_deid(src, tmp_path))
    assert out.StudyDescription == "胸部CT ***"


def test_dciodvfy_accepts_the_cleaned_text(tmp_path: Path) -> None:
    require(shutil.which("dciodvfy") is not None, "dciodvfy")
    charset, name, _, described, _, plain = CASES["H.3.1"]
    src = _write(tmp_path, charset, name, StudyDescription=described, SeriesDescription=plain)
    out = _deid(src, tmp_path)

    def errors(path: Path) -> set[str]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return {ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")}

    assert errors(out) <= errors(src)


def test_names_written_together_are_tokens() -> None:
    """A one-syllable family name is no token alone, but the name as written in text is."""
    from gateway_agent.deid.text import identifier_tokens

    tokens = set(identifier_tokens("Kim^Heejung=金^熙中=김^희중", person_name=True))
    assert {"김희중", "金熙中", "희중", "Heejung"} <= tokens
    assert "김" not in tokens and "KimHeejung" not in tokens


def test_what_is_encoded_reads_back_with_pydicom() -> None:
    """Seeded random text: whatever encodes decodes to it, in this module and in pydicom."""
    import random

    rng = random.Random(7)
    charsets = [CASES[c][0] for c in sorted(CASES)] + [["ISO 2022 IR 100", "ISO 2022 IR 144"]]
    pool = list("abcXYZ *^=") + list("山田太郎やまだたろうﾔﾏﾀﾞ홍길동洪吉洞鷗外éЖ\u3000")
    encoded_count = 0
    for _ in range(3000):
        charset = rng.choice(charsets)
        iso = iso2022_for("\\".join(charset).encode())
        assert iso is not None
        vr = rng.choice(["PN", "LO", "SH", "ST", "LT", "UT", "CS"])
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))
        encoded = iso.encode(text, vr)
        if encoded is None:
            continue
        encoded_count += 1
        assert iso.decode(encoded, vr) == text.rstrip(" ")
        if vr in ("LO", "SH", "ST", "LT", "UT"):
            decoded = decode_bytes(encoded, convert_encodings(charset), {0x0D, 0x0A, 0x09, 0x0C})
            assert decoded.rstrip(" ") == text.rstrip(" ")
    assert encoded_count > 800


@pytest.mark.parametrize(
    ("charset", "raw_name"),
    [
        # Latin-1 bytes where value 1 is the default repertoire (ASCII): "PHIDOEÃ" is no name.
        (["", "ISO 2022 IR 87"], b"PHIDOE\xc3(^PHIJANE"),
        (["ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"], b"\xed\xa0\x80PHIDOE^X"),
        # A Shift JIS lead byte under JIS X 0201 would swallow the "^" into one kanji token.
        (["ISO 2022 IR 13", "ISO 2022 IR 87"], b"PHIDOE\x89^PHIJANE"),
    ],
)
def test_a_mis_encoded_name_makes_text_dummy(
    tmp_path: Path, charset: list[str], raw_name: bytes
) -> None:
    """Cleaning needs the declared identity: a name the character set cannot read exactly
    means every cleaned text falls back to the dummy value (never a name left in it)."""
    ds = make_ct_slice(rows=8, cols=8)  # StudyDescription names PHIDOE PHIJANE
    ds.SpecificCharacterSet = charset
    (src,) = write_series([ds], tmp_path / "in")
    name = ds.get_item("PatientName").value
    encoded = name if isinstance(name, bytes) else str(name).encode()
    data = src.read_bytes()
    at = data.index(b"\x10\x00\x10\x00PN")  # (0010,0010) PN, explicit VR little endian
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    assert data[at + 8 : at + 8 + length].rstrip(b" ") == encoded.rstrip(b" ")
    value = raw_name + b" " * (len(raw_name) % 2)
    src.write_bytes(
        data[: at + 6] + len(value).to_bytes(2, "little") + value + data[at + 8 + length :]
    )
    out = _deid(src, tmp_path)
    assert b"PHIDOE" not in out.read_bytes() and b"PHIJANE" not in out.read_bytes()
    assert pydicom.dcmread(out).StudyDescription == "ANONYMIZED"


@pytest.mark.parametrize(
    ("case", "described", "cleaned"),
    [
        ("H.3.2", "ヤマダ タロウ 胸部CT", "*** *** 胸部CT"),  # half-width in the name
        ("H.3.1", "ヤマダ様 タロウ", "***様 ***"),  # hiragana in the name
        ("H.3.1", "\uff39\uff21\uff2d\uff21\uff24\uff21 胸部", "*** 胸部"),  # full-width YAMADA
    ],
)
def test_names_in_another_kana(tmp_path: Path, case: str, described: str, cleaned: str) -> None:
    """A Japanese name is found in hiragana, katakana, half-width katakana and full-width Latin."""
    charset, name = CASES[case][0], CASES[case][1]
    src = _write(tmp_path, charset, name, StudyDescription=described)
    assert pydicom.dcmread(_deid(src, tmp_path)).StudyDescription == cleaned
