"""Text under ISO 2022 code extensions (PS3.5 6.1.2.5): strict decoding and re-encoding.

Specific Character Set values with code extensions (``\\ISO 2022 IR 87``, ``ISO 2022 IR 13\\ISO
2022 IR 87``, ``\\ISO 2022 IR 149``, ``\\ISO 2022 IR 159``...) switch character sets inside a
value with escape sequences. This module decodes such values and encodes cleaned text again with
pydicom's codecs and escape tables, the way pydicom itself does, with two differences: nothing
is ever replaced by ``?`` or U+FFFD (a value that does not decode or encode exactly is reported
as such, and the caller replaces it by a dummy value), and every encoded value is decoded again
and must give back the text. Person names are encoded component by component, text values value
by value, so each starts and ends in the character set of value 1.

Not supported (text stays dummied): ISO 2022 IR 58 (GB 2312), which pydicom does not decode
correctly; multi-line text (ST, LT, UT) under ISO 2022 IR 149, where pydicom writes one escape
sequence for the whole value and a reader loses the character set at the first line break.

pydicom is imported on first use only: it is not needed on the de-identification path of
objects in single-byte character sets.
"""

from __future__ import annotations

from functools import lru_cache

__all__ = ["Iso2022", "iso2022_for"]

_ESC = b"\x1b"
#: Bytes that return a value to the character set of value 1 (PS3.5 6.1.2.5.3).
_TEXT_DELIMITERS = frozenset({0x0D, 0x0A, 0x09, 0x0C})
_VALUE_DELIMITERS = _TEXT_DELIMITERS | {0x5C}  # and the value delimiter of multi-valued VRs
_PN_DELIMITERS = _VALUE_DELIMITERS | {0x5E, 0x3D}  # and the component and group delimiters
_LINE_BREAKS = frozenset("\r\n\t\f")
#: Defined Terms pydicom cannot round-trip (see the module docstring).
_UNSUPPORTED = frozenset({"ISO 2022 IR 58", "ISO 2022 58", "ISO 2022 GBK"})
#: Character sets that do not allow code extensions.
_STAND_ALONE = frozenset({"ISO_IR 192", "GB18030", "GBK"})
#: How a Defined Term begins (checked before pydicom is imported for an unknown value).
_TERM_PREFIXES = ("ISO 2022 ", "ISO_IR ", "GB")
#: Value 1 of Specific Character Set meaning the default repertoire.
_DEFAULT_REPERTOIRE = frozenset({"", "ISO 2022 IR 6", "ISO_IR 6"})
#: Text VRs: the others (AE, CS, AS, DA...) use the default repertoire only.
_CHARSET_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UC", "UT"})
_MULTI_LINE_VRS = frozenset({"ST", "LT", "UT"})


class Iso2022:
    """Decodes and encodes the text values of one Specific Character Set with code extensions.

    Parameters
    ----------
    terms
        The Defined Terms of Specific Character Set (value 1 may be empty).
    encodings
        The Python codec of each term, as pydicom maps them.
    """

    def __init__(self, terms: tuple[str, ...], encodings: tuple[str, ...]) -> None:
        # Start-up shortcut: importing pydicom takes about 0.45 s (numpy, pixel handlers), paid
        # only by processes that meet code extensions.
        from pydicom import charset

        self.terms = terms
        self.encodings = encodings
        # pydicom reads the default repertoire (ISO IR 6) as Latin-1; bytes >= 0x80 outside an
        # escape sequence are invalid there, and a name mis-read that way is mis-tokenised.
        self._first = "ascii" if terms[0] in _DEFAULT_REPERTOIRE else encodings[0]
        #: Identifies the character set in memo keys.
        self.key = "iso2022:" + "\\".join(terms)
        self._charset = charset
        #: IR 149 text cannot span lines (see the module docstring).
        self._single_line = "euc_kr" in encodings

    def __repr__(self) -> str:
        return f"Iso2022({self.key!r})"

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, raw: bytes, vr: str) -> str | None:
        """The text of a value (padding removed), or None if it does not decode exactly."""
        value = raw.rstrip(b"\0 ")
        if vr not in _CHARSET_VRS:
            try:
                return value.decode("ascii")
            except UnicodeDecodeError:
                return None
        delimiters = (
            _PN_DELIMITERS
            if vr == "PN"
            else _TEXT_DELIMITERS
            if vr in _MULTI_LINE_VRS
            else _VALUE_DELIMITERS
        )
        try:
            return self._decode(value, delimiters)
        except (UnicodeError, LookupError, ValueError):
            return None

    def _decode(self, value: bytes, delimiters: frozenset[int]) -> str:
        # Each escape sequence starts a fragment in another character set (PS3.5 6.1.2.5).
        head, *escaped = value.split(_ESC)
        text = _strict(head, self._first)
        return text + "".join(self._fragment(_ESC + part, delimiters) for part in escaped)

    def _fragment(self, part: bytes, delimiters: frozenset[int]) -> str:
        charset = self._charset
        size = 4 if part.startswith((b"\x1b$(", b"\x1b$)")) else 3
        encoding = charset.CODES_TO_ENCODINGS.get(part[:size])
        if encoding is None or (
            encoding not in self.encodings and encoding != charset.default_encoding
        ):
            raise ValueError("escape sequence of a character set the value does not declare")
        if encoding in charset.handled_encodings:
            return part.decode(encoding)  # Python's codec reads the escape sequences itself
        if encoding == charset.default_encoding:
            encoding = "ascii"  # ESC ( B: back to ISO IR 6
        part = part[size:]
        # A delimiter returns to the character set of value 1 (PS3.5 6.1.2.5.3).
        end = next((i for i, byte in enumerate(part) if byte in delimiters), len(part))
        return _strict(part[:end], encoding) + _strict(part[end:], self._first)

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, text: str, vr: str) -> bytes | None:
        """Encoded ``text`` (unpadded), or None if it cannot be encoded and read back exactly."""
        if vr in _MULTI_LINE_VRS and self._single_line and not _LINE_BREAKS.isdisjoint(text):
            return None
        try:
            if vr not in _CHARSET_VRS:
                encoded = text.encode("ascii")
            elif vr == "PN":
                encoded = b"\\".join(
                    b"=".join(
                        b"^".join(self._encode(part) for part in group.split("^"))
                        for group in name.split("=")
                    )
                    for name in text.split("\\")
                )
            elif vr in _MULTI_LINE_VRS:
                encoded = self._encode(text)
            else:
                encoded = b"\\".join(self._encode(value) for value in text.split("\\"))
        except (UnicodeError, LookupError, ValueError):
            return None
        # Trailing spaces are padding: they do not come back, and need not.
        return encoded if self.decode(encoded, vr) == text.rstrip("\0 ") else None

    def _encode(self, text: str) -> bytes:
        """pydicom's ``encode_string`` without its fallback to replacement characters."""
        if not text:
            return b""
        charset = self._charset
        encodings = self.encodings
        for i, encoding in enumerate(encodings):
            try:
                encoded: bytes = charset._encode_string_impl(text, encoding)
            except UnicodeError:
                continue
            if i > 0 and encoding not in charset.handled_encodings:
                escape = charset._get_escape_sequence_for_encoding(encoding, encoded=encoded)
                encoded = escape + encoded
            if encoding in charset.need_tail_escape_sequence_encodings:
                encoded += charset._get_escape_sequence_for_encoding(encodings[0])
            return encoded
        if len(encodings) > 1:
            parts: bytes = charset._encode_string_parts(text, encodings)  # or ValueError
            return parts
        raise ValueError("no declared character set encodes the text")


def _strict(raw: bytes, encoding: str) -> str:
    """``raw.decode(encoding)``; JIS X 0201 (pydicom's ``shift_jis``) is one byte a character,
    so a Shift JIS double-byte character there is an error, not a kanji."""
    text = raw.decode(encoding)
    if encoding == "shift_jis" and len(text) != len(raw):
        raise ValueError("not JIS X 0201")
    return text


@lru_cache(maxsize=64)
def iso2022_for(specific_character_set: bytes) -> Iso2022 | None:
    """The codec of a Specific Character Set value, or None when it cannot be supported.

    None for unknown Defined Terms, ISO 2022 IR 58 and GB 2312/GBK with code extensions, and
    code extensions of a character set that does not allow them.
    """
    terms = tuple(t.strip() for t in specific_character_set.decode("latin-1").split("\\"))
    terms = tuple(t for t in terms[:1]) + tuple(t for t in terms[1:] if t)
    if _UNSUPPORTED.intersection(terms) or not all(
        not term or (term.startswith(_TERM_PREFIXES) and len(term) <= 16) for term in terms
    ):
        return None
    if len(terms) > 1 and _STAND_ALONE.intersection(terms):
        return None
    from pydicom.charset import python_encoding  # see Iso2022.__init__

    encodings = []
    for term in terms:
        encoding = python_encoding.get(term or "ISO_IR 6")
        if encoding is None:
            return None
        encodings.append(encoding)
    return Iso2022(terms, tuple(encodings))
