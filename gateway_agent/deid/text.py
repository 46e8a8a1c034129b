"""Clean Descriptors: keep free text, scrub identifiers found in the same object and look-alikes."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["MAX_CHARS", "Scrubber", "date_forms", "identifier_tokens", "kana_forms"]

#: Maximum characters per value of text VRs (PS3.5 Table 6.2-1); cleaned values are cut to fit.
MAX_CHARS = {
    "AE": 16,
    "CS": 16,
    "LO": 64,
    "LT": 10240,
    "PN": 64,
    "SH": 16,
    "ST": 1024,
    "UC": 1 << 30,
    "UT": 1 << 30,
}

REPLACEMENT = "***"

# Look-alike patterns scrubbed whatever the object holds: dates, long digit runs (IDs, phone
# numbers), e-mail addresses.
_GENERIC = (
    r"\d{4}[-./]\d{1,2}[-./]\d{1,2}",
    r"\d{1,2}[-./]\d{1,2}[-./]\d{2,4}",
    r"\d{5,}",
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
)
# Separators: everything but [0-9A-Za-z\u00C0-\uFFFF], spelt out as the complement because the
# negated class compiles 10x slower (~1.7 ms of every process start).
_TOKEN_SPLIT = re.compile(r"[\x00-/:-@\[-`{-\xbf\U00010000-\U0010FFFF]+")


def identifier_tokens(value: str, *, person_name: bool = False) -> Iterable[str]:
    """Words of an identifying value worth scrubbing elsewhere (names: 2+ chars, else 3+).

    Names in Japanese kana also yield their other kana spellings (see :func:`kana_forms`).
    """
    minimum = 2 if person_name else 3
    tokens = [token for token in _TOKEN_SPLIT.split(value) if len(token) >= minimum]
    if person_name:
        # Chinese, Japanese and Korean names run together in free text, family name first
        # ("홍길동" for 홍^길동): the whole name is a token even when its parts are too short.
        for name in value.split("\\"):
            for group in name.split("="):
                family, _, rest = group.partition("^")
                given = rest.partition("^")[0]
                if family and given and not (family + given).isascii():
                    tokens.append(family.strip() + given.strip())
        tokens += [form for token in tokens if not token.isascii() for form in kana_forms(token)]
        if not value.isascii():  # a name in a CJK set: its Latin parts may come full-width
            tokens += [token.translate(_FULL_WIDTH) for token in tokens if token.isascii()]
    yield from dict.fromkeys(tokens)


_FULL_WIDTH = {code: code + 0xFEE0 for code in range(0x21, 0x7F)}
_HIRAGANA = "".join(chr(c) for c in range(0x3041, 0x3097))
_KATAKANA = "".join(chr(c) for c in range(0x30A1, 0x30F7))
_TO_KATAKANA = str.maketrans(_HIRAGANA, _KATAKANA)
_TO_HIRAGANA = str.maketrans(_KATAKANA, _HIRAGANA)


def kana_forms(token: str) -> set[str]:
    """Other spellings of a word in Japanese kana: hiragana, katakana, half-width katakana.

    A name written ``ﾔﾏﾀﾞ`` in Patient's Name is ``ヤマダ`` or ``やまだ`` in a description. Also the
    compatibility form (NFKC) of any non-ASCII word: full-width Latin letters become ASCII.
    """
    full = unicodedata.normalize("NFKC", token)
    forms = {full}
    if any("\u3041" <= c <= "\u30fa" for c in full):
        katakana = full.translate(_TO_KATAKANA)
        forms |= {full.translate(_TO_HIRAGANA), katakana}
        half = _half_width()
        forms.add("".join(half.get(c, c) for c in katakana))
    forms.discard(token)
    return forms


@lru_cache(maxsize=1)
def _half_width() -> dict[str, str]:
    """Full-width katakana (and the sound marks) -> half-width, from Unicode's own mapping."""
    table = {}
    for code in range(0xFF61, 0xFFA0):
        half = chr(code)
        full = unicodedata.normalize("NFKC", half)
        if len(full) == 1:
            table[full] = half
    for code in range(0x30A1, 0x30FB):  # voiced and semi-voiced: base + sound mark
        parts = unicodedata.normalize("NFD", chr(code))
        if len(parts) == 2 and parts[0] in table and parts[1] in ("\u3099", "\u309a"):
            table[chr(code)] = table[parts[0]] + ("\uff9e" if parts[1] == "\u3099" else "\uff9f")
    return table


def date_forms(da: str) -> Iterable[str]:
    """Spellings of a DA value (birth date) as people type it."""
    if len(da) != 8 or not da.isdigit():
        return
    y, m, d = da[:4], da[4:6], da[6:]
    yield from (da, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{y}/{m}/{d}")


@lru_cache(maxsize=256)
def _compile(words: frozenset[str], literals: frozenset[str]) -> re.Pattern[str]:
    parts = []
    if words:
        alt = "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))
        parts.append(rf"(?<![0-9A-Za-z])(?:{alt})(?![0-9A-Za-z])")
    parts.extend(re.escape(w) for w in sorted(literals, key=lambda w: (-len(w), w)))
    parts.extend(_GENERIC)
    return re.compile("|".join(parts), re.IGNORECASE)


class Scrubber:
    """Replaces known identifiers (whole words) and look-alike patterns with ``***``."""

    def __init__(self, words: Iterable[str] = (), literals: Iterable[str] = ()) -> None:
        self._pattern = _compile(frozenset(words), frozenset(literals))

    @property
    def pattern(self) -> re.Pattern[str]:
        """The compiled pattern (shared by scrubbers of equal words and literals)."""
        return self._pattern

    def __call__(self, text: str, vr: str = "LT") -> str:
        cleaned = self._pattern.sub(REPLACEMENT, text)
        limit = MAX_CHARS.get(vr)
        if limit is not None and vr != "PN":
            cleaned = (
                "\\".join(v[:limit] for v in cleaned.split("\\"))
                if vr
                in (
                    "AE",
                    "CS",
                    "LO",
                    "SH",
                    "UC",
                )
                else cleaned[:limit]
            )
        if vr == "CS":
            cleaned = re.sub(r"[^A-Z0-9 _\\]", "_", cleaned.upper())
        return cleaned
