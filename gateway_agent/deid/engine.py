"""The de-identification engine: applies a resolved Annex E profile to raw elements, every depth."""

from __future__ import annotations

from collections import Counter
from operator import attrgetter
from typing import Any

from .._exceptions import DeidError
from ..dicom.codec import Element, decode_text, parse_items, text_codec
from ..dicom.dictionary import is_known, vr_of
from ..dicom.scanner import SCANNER_PRIVATE_CREATOR, SCANNER_PRIVATE_GROUP
from . import conditions
from .iso2022 import Iso2022, iso2022_for
from .keys import Keys, shift_da, shift_dt
from .pixels.policy import HEADER_TAGS, header_risk
from .profile import (
    BASIC_PROFILE_CODE,
    CID_7050,
    CLEAN_PIXEL_DATA_CODE,
    DUMMY,
    EDITION,
    EMPTY,
    KEEP,
    OP_LETTER,
    OPTION_COLUMNS,
    PSEUDONYM,
    REMOVE,
    SCRUB,
    SEQ,
    SEQ_CLEAN,
    SEQ_DUMMY,
    SEQ_EMPTY,
    SHIFT,
    UID,
    Profile,
)
from .safeprivate import SAFE_PRIVATE_PIXEL_DATA, safe_private_table, vr_matches
from .text import Scrubber, date_forms, identifier_tokens

__all__ = ["METHOD", "Engine", "Outcome"]

METHOD = f"PS3.15 E.1-1 {EDITION}"

# Walk modes: inside a D sequence free text becomes a dummy; inside a C sequence it is scrubbed.
NORMAL, DUMMY_MODE, STRICT_MODE, CLEAN_MODE = 0, 1, 2, 3
PRIVATE_KEEP = 100
#: Dispatch-table operation of an unlisted private attribute (removed unless safe-private).
_PRIVATE_DROP = 101
#: Dispatch-table key bit for an element parsed as a sequence (its operation may differ).
_SQ_KEY = 1 << 32
#: Entries per memo (values repeat across the files of a series); cleared when exceeded.
_MEMO_MAX = 4096
#: Longer values are not memoised (bounded memory: at most ~_MEMO_MAX x this per memo).
_MEMO_VALUE_MAX = 256


def _remember(memo: dict[Any, Any], key: object, value: object) -> None:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value


#: D sequences whose codes themselves identify a person or an institution.
_STRICT_SEQUENCES = frozenset({0x00401101, 0x00080082, 0x00081072})
#: Coded-entry attributes kept inside dummy / cleaned sequences (they carry concepts, not people).
_CODE_TAGS = frozenset(
    {
        0x00080100,  # CodeValue
        0x00080102,  # CodingSchemeDesignator
        0x00080103,  # CodingSchemeVersion
        0x00080104,  # CodeMeaning
        0x00080105,  # MappingResource
        0x00080106,  # ContextGroupVersion
        0x00080107,  # ContextGroupLocalVersion
        0x0008010B,  # ContextGroupExtensionFlag
        0x0008010F,  # ContextIdentifier
        0x00080117,  # ContextUID
        0x00080118,  # MappingResourceUID
        0x00080119,  # LongCodeValue
        0x00080120,  # URNCodeValue
        0x00080122,  # MappingResourceName
        0x0040A040,  # ValueType
        0x0040A010,  # RelationshipType
    }
)
_FREE_TEXT = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
_SOURCE_VRS = frozenset({"PN", "LO", "SH", "AE", "UC"})
_IDENTITY_TAGS = (0x00100010, 0x00100020)  # PatientName, PatientID
_BINARY_ZERO = {
    "US": b"\0\0",
    "SS": b"\0\0",
    "UL": b"\0" * 4,
    "SL": b"\0" * 4,
    "FL": b"\0" * 4,
    "FD": b"\0" * 8,
    "SV": b"\0" * 8,
    "UV": b"\0" * 8,
}
_DUMMY = {
    "AE": b"ANONYMOUS ",
    "AS": b"000Y",
    "CS": b"ANONYMIZED",
    "DA": b"19000101",
    "DT": b"19000101000000",
    "TM": b"000000",
    "DS": b"0 ",
    "IS": b"0 ",
    "LO": b"ANONYMIZED",
    "LT": b"ANONYMIZED",
    "PN": b"ANONYMIZED",
    "SH": b"ANONYMIZED",
    "ST": b"ANONYMIZED",
    "UC": b"ANONYMIZED",
    "UT": b"ANONYMIZED",
    **_BINARY_ZERO,
}


def _text(s: str) -> bytes:
    raw = s.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _uid_bytes(s: str) -> bytes:
    raw = s.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _ascii(raw: bytes) -> str:
    return raw.decode("latin-1").strip("\0 ")


class Outcome:
    """What one run produced: the new elements and the audit facts (no PHI)."""

    __slots__ = (
        "burned_in_allowed",
        "clean_pixels",
        "codec",
        "counts",
        "elements",
        "modality",
        "private_removed",
        "scanner",
        "uids",
    )

    def __init__(self) -> None:
        self.elements: list[Element] = []
        self.counts: Counter[str] = Counter()
        self.private_removed = 0
        self.uids: dict[str, str] = {}
        self.burned_in_allowed = False
        #: the pixels are at risk and the policy is "clean": the caller must clean them
        self.clean_pixels = False
        #: the input's text codec (for the identity the pixel verifier looks for)
        self.codec: str | None = None
        #: the output Modality value ("" when absent)
        self.modality = ""
        #: the keyed scanner pseudonym (``SCN-...``) from the original device attributes
        self.scanner = ""


class _Run:
    """State of one data set: keyed values, deferred scrubbing, counters."""

    def __init__(
        self,
        engine: Engine,
        codec: str | None,
        keep_private_pixels: bool,
        iso: Iso2022 | None = None,
    ) -> None:
        self.engine = engine
        #: Retain Safe Private may keep private pixel data (Clean Pixel Data cleaned it)
        self.keep_private_pixels = keep_private_pixels
        self.profile = engine.profile
        self.keys = engine.keys
        #: Python codec of a single-byte or stand-alone character set, else None
        self.codec = codec
        #: text under ISO 2022 code extensions (``codec`` is None then), else None
        self.iso = iso
        #: identifies the character set in memo keys
        self.codec_key = codec if iso is None else iso.key
        self.counts: Counter[str] = Counter()
        #: action letters in walk order, counted into ``counts`` after the walk
        self.letters: list[str] = []
        self.private_removed = 0
        self.days = 0
        self.pseudonyms: tuple[str, str] | None = None
        self.words: set[str] = set()
        self.literals: set[str] = set()
        #: PatientName / PatientID seen with a value that decoded cleanly (see finish_scrubbing).
        self.identity: dict[int, bool] = {}
        #: The object declares only the default repertoire (ASCII): bytes >= 0x80 are invalid.
        self.ascii_only = False
        self.jobs: list[tuple[Element, str]] = []

    # -- sources of identifiers for Clean Descriptors ---------------------------------------
    def collect(self, el: Element) -> None:
        value = el.value
        if isinstance(value, list):
            for item in value:
                for sub in item:
                    if sub.tag not in _CODE_TAGS:
                        self.collect(sub)
            return
        if not value:
            return
        memo = self.engine.memo_collect
        key = (el.tag, el.vr, value, self.codec_key, self.ascii_only)
        found = memo.get(key) if len(value) <= _MEMO_VALUE_MAX else None
        if found is None:
            found = self._collect_value(el.tag, el.vr, value)
            if len(value) <= _MEMO_VALUE_MAX:
                _remember(memo, key, found)
        tokens, identity, literals = found
        if tokens:
            self.words.update(tokens)
        if identity is not None:
            self.identity[el.tag] = identity
        if literals:
            self.literals.update(literals)

    def _collect_value(
        self, tag: int, vr: str, value: bytes
    ) -> tuple[tuple[str, ...], bool | None, tuple[str, ...]]:
        """(words, identity flag or None, literals) that one non-empty value contributes."""
        if vr == "UN":
            vr = vr_of(tag)
        if vr in _SOURCE_VRS:
            if self.iso is None:
                text = decode_text(value, self.codec)
            else:  # undecodable: no tokens, and not a clean identity
                text = self.iso.decode(value, vr) or "\ufffd"
            tokens = tuple(identifier_tokens(text, person_name=vr == "PN"))
            identity = None
            if tag in _IDENTITY_TAGS:
                # U+FFFD: bytes the declared character set cannot decode (a mis-encoded name);
                # high bytes under the default repertoire: a name we would tokenise wrongly.
                identity = (
                    bool(tokens)
                    and "\ufffd" not in text
                    and not (self.ascii_only and max(bytes(value)) >= 0x80)
                )
            return tokens, identity, ()
        if tag == 0x00100030:
            return (), None, tuple(date_forms(_ascii(value)))
        return (), None, ()

    # -- the walk ---------------------------------------------------------------------------
    def walk(self, elements: list[Element], mode: int) -> list[Element]:
        engine = self.engine
        table = engine.dispatch[mode]
        letters = self.letters
        out: list[Element] = []
        append = out.append
        keep_private: dict[int, Element] | None = None
        for el in elements:
            tag = el.tag
            entry = table.get(tag if el.vr != "SQ" else tag | _SQ_KEY)
            if entry is None:
                entry = engine.entry(tag, el.vr, mode)
            op, letter = entry
            if op == KEEP:
                if letter is not None:
                    letters.append(letter)
                append(el)
                continue
            if op == _PRIVATE_DROP:
                if self.profile.keep_safe_private:
                    if keep_private is None:
                        keep_private = _safe_private(elements, self.codec, self.keep_private_pixels)
                    kept = keep_private.get(tag)
                    if kept is not None:
                        if kept.vr == "SQ":  # its items are processed like any other
                            kept = Element(tag, "SQ", [self.walk(i, mode) for i in kept.items])
                        append(kept)
                        letters.append("C")
                        continue
                self.private_removed += 1
                continue
            if letter is not None:
                letters.append(letter)
            if op == REMOVE:
                self.collect(el)
            elif op == UID:
                append(self.map_uids(el))
            elif op == SHIFT:
                append(self.shift(el))
            elif op in (SEQ, SEQ_DUMMY, SEQ_CLEAN):
                if op == SEQ_DUMMY:
                    sub_mode = STRICT_MODE if tag in _STRICT_SEQUENCES else max(mode, DUMMY_MODE)
                elif op == SEQ_CLEAN:
                    sub_mode = mode if mode in (DUMMY_MODE, STRICT_MODE) else CLEAN_MODE
                else:
                    sub_mode = mode
                items = [self.walk(item, sub_mode) for item in el.items]
                append(Element(tag, "SQ", items))
            elif op == SCRUB:
                if self.codec is None and self.iso is None:
                    append(self.dummy(el))
                else:
                    new = Element(tag, self.vr(el), el.value)
                    self.jobs.append((new, new.vr))
                    append(new)
            elif op == EMPTY:
                self.collect(el)
                append(Element(tag, self.vr(el), b""))
            elif op == SEQ_EMPTY:
                self.collect(el)
                append(Element(tag, "SQ", []))
            elif op == DUMMY:
                self.collect(el)
                append(self.dummy(el))
            elif op == PSEUDONYM:
                self.collect(el)
                if self.pseudonyms is None:
                    append(Element(tag, self.vr(el), b""))
                else:
                    name, pid = self.pseudonyms
                    append(Element(tag, self.vr(el), _text(name if tag == 0x00100010 else pid)))
        return out

    @staticmethod
    def vr(el: Element) -> str:
        return vr_of(el.tag) if el.vr == "UN" else el.vr

    def dummy(self, el: Element) -> Element:
        vr = self.vr(el)
        if vr == "UI":
            return self.map_uids(el)
        if vr == "SQ":
            return Element(el.tag, "SQ", [])
        return Element(el.tag, vr, _DUMMY.get(vr, b""))

    def map_uids(self, el: Element) -> Element:
        raw = el.raw
        if not raw:
            return Element(el.tag, "UI", b"")
        memo = self.engine.memo_uids
        new = memo.get(raw)
        if new is None:
            uid = self.keys.uid
            values = [
                uid(v) if v else v
                for v in (s.strip("\0 ") for s in raw.decode("latin-1").split("\\"))
            ]
            new = _uid_bytes("\\".join(values))
            if len(raw) <= _MEMO_VALUE_MAX:
                _remember(memo, raw, new)
        return Element(el.tag, "UI", new)

    def shift(self, el: Element) -> Element:
        vr = self.vr(el)
        raw = el.raw
        if not raw:
            return Element(el.tag, vr, b"")
        if len(raw) > _MEMO_VALUE_MAX:
            return Element(el.tag, vr, self._shifted(raw, vr))
        memo = self.engine.memo_shift
        key = (raw, vr, self.days)
        new = memo.get(key)
        if new is None:
            new = self._shifted(raw, vr)
            _remember(memo, key, new)
        return Element(el.tag, vr, new)

    def _shifted(self, raw: bytes, vr: str) -> bytes:
        fn = shift_da if vr == "DA" else shift_dt
        out = []
        for part in _ascii(raw).split("\\"):
            part = part.strip()
            shifted = fn(part, self.days) if part else ""
            if shifted is None:
                return b""
            out.append(shifted)
        return _text("\\".join(out))

    def finish_scrubbing(self) -> None:
        if not self.jobs:
            return
        if not all(self.identity.get(tag, False) for tag in _IDENTITY_TAGS):
            # Cleaning scrubs the identity this object declares. Without a cleanly decoded
            # PatientName and PatientID (absent, cut off, mis-encoded) it cannot know what to
            # scrub, so free text falls back to the basic profile's dummy value.
            for el, vr in self.jobs:
                el.value = _DUMMY.get(vr, b"")
            self.counts["C_fallback"] += len(self.jobs)
            return
        codec = self.codec or "latin-1"
        scrub = Scrubber(self.words, self.literals)
        if self.iso is not None:
            self._scrub_iso2022(self.iso, scrub)
            return
        # Results hold for one pattern (one patient's identifiers): the memo keeps only the
        # latest pattern's, so it keeps no old pattern alive. Read once: threads sharing an
        # engine at worst replace each other's memo, never read another pattern's results.
        pattern, memo = self.engine.memo_scrub
        if pattern is not scrub.pattern:
            memo = {}
            self.engine.memo_scrub = (scrub.pattern, memo)
        for el, vr in self.jobs:
            raw = el.raw
            key = (raw, vr, codec)
            new = memo.get(key)
            if new is None:
                text = decode_text(raw, codec)
                if not text:
                    new = raw
                else:
                    cleaned = scrub(text, vr).encode(codec, "replace")
                    new = cleaned + b" " if len(cleaned) % 2 else cleaned
                if len(raw) <= _MEMO_VALUE_MAX:
                    _remember(memo, key, new)
            el.value = new

    def _scrub_iso2022(self, iso: Iso2022, scrub: Scrubber) -> None:
        """Clean text under ISO 2022 code extensions; values that do not decode, or whose
        cleaned text cannot be encoded and read back exactly, get the dummy value."""
        for el, vr in self.jobs:
            text = iso.decode(el.raw, vr)
            encoded = None
            if text is not None:
                cleaned = scrub(text, vr)
                if cleaned == text:
                    continue  # nothing to clean: the bytes stay as they are
                encoded = iso.encode(cleaned, vr)
            if encoded is None:
                el.value = _DUMMY.get(vr, b"")
                self.counts["C_fallback"] += 1
            else:
                el.value = encoded + b" " if len(encoded) % 2 else encoded


def _safe_private(
    elements: list[Element], codec: str | None, keep_pixels: bool
) -> dict[int, Element]:
    """Private elements of one data set (or item) that Retain Safe Private keeps, by tag.

    An element is kept when its block's Private Creator, its group and its element byte are a
    row of Table E.3.10-1 and its VR fits the row's (see :func:`vr_matches`); its Private
    Creator element is kept with it. Private pixel data (:data:`SAFE_PRIVATE_PIXEL_DATA`) is
    kept only when ``keep_pixels``. A sequence the table lists that arrives as bytes (``UN``)
    is parsed into items, or not kept if it does not parse.
    """
    creators: dict[tuple[int, int], Element] = {}
    for el in elements:
        group, elem = el.tag >> 16, el.tag & 0xFFFF
        if group & 1 and 0x10 <= elem <= 0xFF:
            creators[(group, elem)] = el
    if not creators:
        return {}
    table = safe_private_table()
    keep: dict[int, Element] = {}
    for el in elements:
        group, elem = el.tag >> 16, el.tag & 0xFFFF
        if not group & 1 or elem < 0x1000:
            continue
        creator_el = creators.get((group, elem >> 8))
        if creator_el is None:
            continue
        key = (decode_text(creator_el.raw, codec).strip(), group, elem & 0xFF)
        row = table.get(key)
        if row is None or not vr_matches(row.vr, el.vr):
            continue
        if not keep_pixels and key in SAFE_PRIVATE_PIXEL_DATA:
            continue
        if row.vr == "SQ" and el.vr != "SQ":
            try:
                el = Element(el.tag, "SQ", parse_items(el.raw))
            except DeidError:
                continue
        keep[el.tag] = el
        keep[creator_el.tag] = creator_el
    return keep


def _top(elements: list[Element], tag: int) -> Element | None:
    for el in elements:
        if el.tag == tag:
            return el
        if el.tag > tag:
            return None
    return None


#: Top-level attributes :meth:`Engine.run` looks at before the walk.
_LOOKUPS = frozenset(
    {
        0x00080005,  # SpecificCharacterSet
        0x00080016,  # SOPClassUID
        0x00080018,  # SOPInstanceUID
        0x00080060,  # Modality
        0x00080070,  # Manufacturer
        0x00081010,  # StationName
        0x00081090,  # ManufacturerModelName
        0x00100010,  # PatientName
        0x00100020,  # PatientID
        0x00100021,  # IssuerOfPatientID
        0x00100030,  # PatientBirthDate
        0x00181000,  # DeviceSerialNumber
        0x00280301,  # BurnedInAnnotation
        0x00280302,  # RecognizableVisualFeatures
    }
    | HEADER_TAGS  # the burned-in policy's (ImageType, Rows, the device signatures' tests)
    | conditions.LOOKUP_TAGS
    | conditions.SPECIES_TAGS
)


def _tops(elements: list[Element], tags: frozenset[int]) -> dict[int, Element]:
    """``{tag: _top(elements, tag)}`` for every tag of ``tags`` found, in one pass.

    ``_top`` finds the first element with the tag unless an element with a greater tag comes
    before it (the list is meant to be sorted); so does this, by tracking the largest tag seen.
    """
    found: dict[int, Element] = {}
    highest = -1
    last = max(tags)
    for el in elements:
        tag = el.tag
        if tag in tags and tag >= highest and tag not in found:
            found[tag] = el
        if tag > highest:
            if tag > last:
                break  # nothing after this can be found
            highest = tag
    return found


#: Output attributes :meth:`Engine.run` reports (UIDs for the audit, and the modality).
_OUTPUT_UIDS = (
    ("sop_instance_uid", 0x00080018),
    ("sop_class_uid", 0x00080016),
    ("study_instance_uid", 0x0020000D),
    ("series_instance_uid", 0x0020000E),
)
_OUTPUT_LOOKUPS = frozenset({tag for _, tag in _OUTPUT_UIDS} | {0x00080060})


class Engine:
    """Applies one profile with one key; cheap to keep per worker process."""

    def __init__(self, keys: Keys, profile: Profile, station_name: str | None) -> None:
        self.keys = keys
        self.profile = profile
        self.station_name = station_name
        self._unlisted: dict[tuple[int, str, int], int] = {}
        #: per walk mode: tag (| _SQ_KEY for sequences) -> (operation, audit letter or None)
        self.dispatch: tuple[dict[int, tuple[int, str | None]], ...] = ({}, {}, {}, {})
        # Memos of pure functions of a value (per-series values repeat in every file).
        self.memo_collect: dict[
            tuple[int, str, bytes, str | None, bool],
            tuple[tuple[str, ...], bool | None, tuple[str, ...]],
        ] = {}
        self.memo_uids: dict[bytes, bytes] = {}
        self.memo_shift: dict[tuple[bytes, str, int], bytes] = {}
        self.memo_scrub: tuple[object, dict[tuple[bytes, str, str], bytes]] = (None, {})
        self.memo_patient: dict[bytes, tuple[int, tuple[str, str]]] = {}
        self.memo_scanner: dict[tuple[bytes, ...], str] = {}
        self._method = self._method_elements(pixels_cleaned=False)
        self._method_pixels = self._method_elements(pixels_cleaned=True)
        self._station = (
            Element(0x00081010, "SH", _text(station_name)) if station_name is not None else None
        )
        # The scanner pseudonym replaces DeviceSerialNumber (the profile's dummy value) unless
        # Retain Device Identity keeps the original; then it goes into a private element.
        self._serial_kept = profile.ops.get(0x00181000) == KEEP
        drop = set(_ADDED)
        if station_name is not None:
            drop.add(0x00081010)
        if not self._serial_kept:
            drop.add(0x00181000)
        self._drop = frozenset(drop)

    def entry(self, tag: int, vr: str, mode: int) -> tuple[int, str | None]:
        """Operation and audit letter of ``tag`` in ``mode`` (cached in ``dispatch``)."""
        op = self.profile.ops.get(tag)
        if op is not None:
            found: tuple[int, str | None] = (op, OP_LETTER[op])
        else:
            op = self.unlisted_op(tag, vr, mode)
            if op == REMOVE and (tag >> 16) & 1:
                found = (_PRIVATE_DROP, None)
            else:
                found = (op, "X" if op == REMOVE else None)
        self.dispatch[mode][tag if vr != "SQ" else tag | _SQ_KEY] = found
        return found

    def unlisted_op(self, tag: int, vr: str, mode: int) -> int:
        """Operation for an attribute the table does not list (cached)."""
        key = (tag, vr, mode)
        op = self._unlisted.get(key)
        if op is None:
            op = self._decide_unlisted(tag, vr, mode)
            self._unlisted[key] = op
        return op

    def _decide_unlisted(self, tag: int, vr: str, mode: int) -> int:
        group, elem = tag >> 16, tag & 0xFFFF
        prof = self.profile
        if group & 1:
            return REMOVE  # private: removed (Retain Safe Private handled by the caller)
        if group in (0x0000, 0x0002, 0x0004) or elem == 0:
            return REMOVE  # command, file meta, DICOMDIR groups and group lengths
        if group & 0xFF00 == 0x5000:
            if prof.curve_op == REMOVE:
                return REMOVE
            return SCRUB if vr_of(tag) in _FREE_TEXT else KEEP
        if group & 0xFF00 == 0x6000:
            return prof.overlay_comment_op if elem == 0x4000 else prof.overlay_op
        if not is_known(tag):
            return REMOVE  # not a standard attribute: nobody can say it is safe
        dvr = vr_of(tag)
        if vr == "SQ" or dvr == "SQ":
            return SEQ
        if dvr == "PN":
            return REMOVE if mode == NORMAL else DUMMY
        if dvr in ("DA", "DT"):
            if tag in _CODE_TAGS:
                return KEEP
            opts = prof.options
            if opts.retain_long_full_dates:
                return KEEP
            return SHIFT if opts.retain_long_modified_dates else DUMMY
        if mode != NORMAL and dvr in _FREE_TEXT and (mode == STRICT_MODE or tag not in _CODE_TAGS):
            return DUMMY if mode in (DUMMY_MODE, STRICT_MODE) else SCRUB
        return KEEP

    def run(
        self,
        elements: list[Element],
        *,
        pixels_cleaned: bool = False,
        private_pixels_cleaned: bool = False,
    ) -> Outcome:
        """De-identify a top-level data set (raw elements); raises DeidError on refusal.

        ``pixels_cleaned``: the caller applied Clean Pixel Data (E.3.1) to the Pixel Data of
        ``elements``; the output then records code 113101 and the option's name.
        ``private_pixels_cleaned``: the caller also cleaned the private pixel data elements of
        :data:`~gateway_agent.deid.safeprivate.SAFE_PRIVATE_PIXEL_DATA` present in
        ``elements``; only then does Retain Safe Private keep them (E.3.1 Note 4).
        """
        top = _tops(elements, _LOOKUPS)
        sop = top.get(0x00080018)
        if sop is None or not _ascii(sop.raw):
            raise DeidError("no_sop_instance_uid")
        charset = top.get(0x00080005)
        codec = text_codec(charset.raw if charset else None)
        outcome = Outcome()
        outcome.codec = codec
        self._check_pixels(top, outcome)

        iso = iso2022_for(charset.raw) if codec is None and charset is not None else None
        run = _Run(self, codec, private_pixels_cleaned, iso)
        run.ascii_only = not (charset and _ascii(charset.raw).strip("\\ \0"))
        patient_key = self._patient_key(top)
        if patient_key:
            keyed = self.memo_patient.get(patient_key)
            if keyed is None:
                keyed = (
                    self.keys.day_offset(patient_key),
                    self.keys.patient_pseudonyms(patient_key),
                )
                _remember(self.memo_patient, patient_key, keyed)
            run.days, run.pseudonyms = keyed
        out = run.walk(elements, NORMAL)
        if not conditions.LOOKUP_TAGS.isdisjoint(top):
            out = conditions.apply(out, top)
        run.counts.update(run.letters)
        run.finish_scrubbing()
        outcome.scanner = scanner = self._scanner(top)
        drop = self._drop
        out = [e for e in out if e.tag not in drop]
        if self._station is not None:
            out.append(self._station)
        if self._serial_kept:
            out.extend(_private_scanner(out, scanner))  # nothing when group 0009 is full
        else:
            out.append(Element(0x00181000, "LO", _text(scanner)))
        # Clean Pixel Data: the caller says it cleaned the pixels, or the policy decided here
        # that the caller must (Deidentifier.deidentify_file does, or refuses the object).
        cleaned = pixels_cleaned or outcome.clean_pixels
        out.extend(self._method_pixels if cleaned else self._method)
        out.sort(key=_tag_of)  # attrgetter("tag"): the sort key in C
        outcome.elements = out
        outcome.counts = run.counts
        outcome.private_removed = run.private_removed
        found = _tops(out, _OUTPUT_LOOKUPS)
        for key, tag in _OUTPUT_UIDS:
            el = found.get(tag)
            outcome.uids[key] = _ascii(el.raw) if el is not None else ""
        modality = found.get(0x00080060)
        outcome.modality = _ascii(modality.raw) if modality is not None else ""
        return outcome

    def _check_pixels(self, top: dict[int, Element], outcome: Outcome) -> None:
        risk = header_risk(top, outcome.codec)
        if risk is None:
            return
        cleanable, detail = risk
        policy = self.profile.options.burned_in
        if policy == "allow":
            outcome.burned_in_allowed = True
        elif policy == "clean" and cleanable:
            outcome.clean_pixels = True
        else:
            raise DeidError("burned_in_annotation", detail)

    def _scanner(self, top: dict[int, Element]) -> str:
        """The scanner pseudonym from the original device attributes (memoised per scanner)."""
        key = tuple(el.raw if el is not None else b"" for el in map(top.get, _DEVICE_TAGS))
        found = self.memo_scanner.get(key)
        if found is None:
            found = self.keys.scanner_pseudonym(*key)
            _remember(self.memo_scanner, key, found)
        return found

    @staticmethod
    def _patient_key(top: dict[int, Element]) -> bytes:
        pid = top.get(0x00100020)
        issuer = top.get(0x00100021)
        pid_raw = pid.raw.strip(b"\0 ") if pid is not None else b""
        if pid_raw:
            return b"id|" + pid_raw + b"|" + (issuer.raw.strip(b"\0 ") if issuer else b"")
        name = top.get(0x00100010)
        birth = top.get(0x00100030)
        name_raw = name.raw.strip(b"\0 ") if name is not None else b""
        if name_raw:
            return b"name|" + name_raw + b"|" + (birth.raw.strip(b"\0 ") if birth else b"")
        return b""

    def _method_elements(self, *, pixels_cleaned: bool) -> list[Element]:
        """PatientIdentityRemoved, the method (text and CID 7050 codes), temporal flag."""
        opts = self.profile.options
        codes = [BASIC_PROFILE_CODE] + [OPTION_COLUMNS[n][1] for n in opts.enabled()]
        if pixels_cleaned:
            codes.append(CLEAN_PIXEL_DATA_CODE)
        method = [f"{METHOD} Basic Profile"] + [CID_7050[code] for code in codes[1:]]
        items = [
            [
                Element(0x00080100, "SH", _text(code)),
                Element(0x00080102, "SH", _text("DCM")),
                Element(0x00080104, "LO", _text(CID_7050[code])),
            ]
            for code in codes
        ]
        if opts.retain_long_full_dates:
            longitudinal = "UNMODIFIED"
        elif opts.retain_long_modified_dates:
            longitudinal = "MODIFIED"
        else:
            longitudinal = "REMOVED"
        return [
            Element(0x00120062, "CS", _text("YES")),
            Element(0x00120063, "LO", _text("\\".join(method))),
            Element(0x00120064, "SQ", items),
            Element(0x00280303, "CS", _text(longitudinal)),
        ]

    def audit(self, outcome: Outcome, transfer_syntax: str) -> dict[str, Any]:
        """The JSON-able audit record: counts, options, edition, output UIDs; never a value."""
        opts = self.profile.options
        return {
            "profile": METHOD,
            "edition": EDITION,
            "options": opts.enabled(),
            "burned_in_policy": opts.burned_in,
            "burned_in_allowed": outcome.burned_in_allowed,
            "pixels_cleaned": outcome.clean_pixels,
            "actions": dict(sorted(outcome.counts.items())),
            "private_removed": outcome.private_removed,
            "transfer_syntax": transfer_syntax,
            **outcome.uids,
        }


_ADDED = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})
#: Manufacturer, ManufacturerModelName, DeviceSerialNumber, StationName: the scanner's identity.
_DEVICE_TAGS = (0x00080070, 0x00081090, 0x00181000, 0x00081010)


def _private_scanner(out: list[Element], scanner: str) -> list[Element]:
    """Creator and value elements of the scanner pseudonym, in a free block of group 0009."""
    used = {
        e.tag & 0xFF
        for e in out
        if e.tag >> 16 == SCANNER_PRIVATE_GROUP and 0x10 <= e.tag & 0xFFFF <= 0xFF
    }
    slot = next((s for s in range(0x10, 0x100) if s not in used), None)
    if slot is None:
        return []
    base = SCANNER_PRIVATE_GROUP << 16
    return [
        Element(base | slot, "LO", _text(SCANNER_PRIVATE_CREATOR)),
        Element(base | slot << 8 | 0x01, "LO", _text(scanner)),
    ]


_tag_of = attrgetter("tag")
