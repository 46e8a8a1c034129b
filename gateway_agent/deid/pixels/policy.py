"""Burned-in annotation policy: which objects may show identity in their pixels (at risk)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ...dicom.codec import Element, decode_text
from .signatures import SIGNATURE_TAGS, match_header

__all__ = [
    "CLEANABLE_MODALITIES",
    "CLEANABLE_SOP_CLASSES",
    "CONVERSION_TYPES",
    "HEADER_TAGS",
    "RISKY_MODALITIES",
    "RISKY_SOP_CLASSES",
    "SCREEN_IMAGE_TYPES",
    "SCREEN_SERIES_DESCRIPTIONS",
    "XRAY_SOP_CLASSES",
    "burned_in_risk",
    "header_risk",
    "pixel_risk",
    "screen_image_type",
    "screen_series_description",
]

#: Modalities whose images routinely carry burned-in text or faces.
RISKY_MODALITIES = frozenset(
    {
        "US",  # ultrasound: patient name and date on the screen capture
        "IVUS",
        "XC",  # external-camera photography
        "OP",  # ophthalmic photography
        "ES",  # endoscopy
        "GM",  # general microscopy
        "SM",  # slide microscopy (slide labels carry names and accession numbers)
        "DOC",  # scanned documents
        "OT",  # "other": mostly screenshots and scanned paper
    }
)

_P = "1.2.840.10008.5.1.4.1.1."
#: SOP classes that are screenshots, photos, video or documents.
RISKY_SOP_CLASSES = frozenset(
    {
        _P + "7",  # Secondary Capture
        _P + "7.1",  # Multi-frame Single Bit SC
        _P + "7.2",  # Multi-frame Grayscale Byte SC
        _P + "7.3",  # Multi-frame Grayscale Word SC
        _P + "7.4",  # Multi-frame True Color SC
        _P + "6",  # Ultrasound (retired)
        _P + "6.1",  # Ultrasound
        _P + "6.2",  # Enhanced US Volume
        _P + "3",  # US Multi-frame (retired)
        _P + "3.1",  # US Multi-frame
        _P + "77.1.1",  # VL Endoscopic
        _P + "77.1.1.1",  # Video Endoscopic
        _P + "77.1.2",  # VL Microscopic
        _P + "77.1.2.1",  # Video Microscopic
        _P + "77.1.3",  # VL Slide-Coordinates Microscopic
        _P + "77.1.4",  # VL Photographic
        _P + "77.1.4.1",  # Video Photographic
        _P + "77.1.5.1",  # Ophthalmic Photography 8 bit
        _P + "77.1.5.2",  # Ophthalmic Photography 16 bit
        _P + "77.1.5.5",  # Wide Field Ophthalmic Photography Stereographic
        _P + "77.1.5.6",  # Wide Field Ophthalmic Photography 3D
        _P + "77.1.6",  # VL Whole Slide Microscopy
        _P + "77.1.7",  # Dermoscopic Photography
        _P + "104.1",  # Encapsulated PDF
        _P + "104.2",  # Encapsulated CDA
    }
)
#: X-ray angiography and fluoroscopy SOP classes: their DERIVED or SECONDARY images are
#: reference frames and screen captures with the console's text on them.
XRAY_SOP_CLASSES: Mapping[str, str] = {
    _P + "12.1": "XA",  # X-Ray Angiographic
    _P + "12.1.1": "XA",  # Enhanced XA
    _P + "12.2": "RF",  # X-Ray Radiofluoroscopic
    _P + "12.2.1": "RF",  # Enhanced XRF
    _P + "12.3": "XA",  # X-Ray Angiographic Bi-Plane (retired)
}
#: ConversionType (0008,0064) defined terms (PS3.3 C.8.6.1), named in the detail; another
#: value is not (a malformed file may put anything there).
CONVERSION_TYPES = frozenset({"DV", "DI", "DF", "WSD", "SD", "SI", "DRW", "SYN"})
_DOCUMENTS = frozenset({_P + "104.1", _P + "104.2"})

#: ImageType values of screen captures and dose screens saved in an image class (CT, MR, PT,
#: XA...). PS3.3 defines no term for them (Value 3 is modality specific, C.7.6.1.1.2); these
#: are the vendors' own: GE's ``DERIVED\SECONDARY\SCREEN SAVE`` (any value containing
#: ``SAVE`` counts, as in CTP's BurnedInPixelsFilter), and the dose pages of Philips, Toshiba
#: and Canon (``DOSE_INFO``, ``DOSE``).
SCREEN_IMAGE_TYPES = frozenset(
    {"SCREEN SAVE", "DOSE", "DOSE INFO", "DOSE_INFO", "DOSE REPORT", "DOSE_REPORT"}
)


def screen_image_type(image_type: str) -> str | None:
    """The :data:`SCREEN_IMAGE_TYPES` term an ImageType value (``\\``-separated) shows, or None."""
    for value in image_type.upper().split("\\"):
        term = value.strip(" \0")
        if term in SCREEN_IMAGE_TYPES:
            return term
        if "SAVE" in term:
            return "SCREEN SAVE"
    return None


#: SeriesDescription phrases of screen captures and dose pages, as consoles name the series of
#: an ORIGINAL\PRIMARY image (Siemens' dose page is "Patient Protocol"), by the words they are
#: matched on (see :func:`screen_series_description`) and the name the detail gives.
SCREEN_SERIES_DESCRIPTIONS: Mapping[tuple[str, ...], str] = {
    ("SCREEN", "SAVE"): "SCREEN SAVE",
    ("SCREENSAVE",): "SCREEN SAVE",
    ("SCREEN", "CAPTURE"): "SCREEN CAPTURE",
    ("SCREENCAPTURE",): "SCREEN CAPTURE",
    ("DOSE", "REPORT"): "DOSE REPORT",
    ("DOSE", "INFO"): "DOSE INFO",
    ("PATIENT", "PROTOCOL"): "PATIENT PROTOCOL",
}
_WORD = re.compile(r"[A-Z0-9]+")


def screen_series_description(description: str) -> str | None:
    """The :data:`SCREEN_SERIES_DESCRIPTIONS` phrase a SeriesDescription shows, or None.

    Case is ignored and the description is cut into words at anything but a letter or a digit
    (spaces, underscores, punctuation); a phrase matches when its words appear in a row, as
    whole words: ``"Screen_Save 2"`` and ``"CT DOSE REPORT"`` match, ``"Low dose CT chest"``
    and ``"DoseReport"`` do not. The answer is the phrase, never the description.
    """
    words = _WORD.findall(description.upper())
    for phrase, name in SCREEN_SERIES_DESCRIPTIONS.items():
        size = len(phrase)
        if any(tuple(words[i : i + size]) == phrase for i in range(len(words) - size + 1)):
            return name
    return None


def _first_values(image_type: str) -> tuple[str, str]:
    """ImageType's Values 1 and 2 (pixel data characteristics, patient examination
    characteristics), upper case; empty when absent."""
    values = [v.strip(" \0").upper() for v in image_type.split("\\")[:2]]
    values += [""] * (2 - len(values))
    return values[0], values[1]


def _signature_name(label: str) -> str:
    """A signature's label without CTP's remarks (``"SIEMENS / CT Dose Series - This..."``)."""
    return label.split(" - ", 1)[0].strip()[:64]


def burned_in_risk(
    modality: str,
    sop_class_uid: str,
    burned_in_annotation: str,
    recognizable_features: str,
    *,
    image_type: str = "",
    signature: str | None = None,
    series_description: str = "",
    conversion_type: str = "",
) -> str | None:
    """Why an object may show identity in its pixels, or None.

    * BurnedInAnnotation = YES, or RecognizableVisualFeatures = YES: always a risk.
    * Documents (encapsulated PDF/CDA): always a risk (their content is free text).
    * A screen capture saved in an image class (``image_type`` shows a
      :data:`SCREEN_IMAGE_TYPES` term), an image a CTP device signature matches
      (``signature``, its label), or an image whose ``series_description`` names a screen
      capture or a dose page (:data:`SCREEN_SERIES_DESCRIPTIONS`): always a risk, whatever
      BurnedInAnnotation says. A dose screen exists to show text, and the signature list is
      field evidence that these devices burn identity in; devices write BurnedInAnnotation NO
      on such pages too.
    * Unless the device states BurnedInAnnotation = NO (the "proof otherwise" the policy
      accepts, see the docs): a risky modality or SOP class; an image with a ConversionType
      (the SC Equipment module: a secondary capture whatever its SOP class says); an X-ray
      angiography or fluoroscopy image (modality XA/RF or one of :data:`XRAY_SOP_CLASSES`)
      that is DERIVED (ImageType Value 1) or SECONDARY (Value 2): reference frames and
      screen captures with the console's text.

    ``image_type``, ``series_description`` and ``conversion_type`` are passed for images
    only (:func:`header_risk` does). The returned detail names the attribute, class,
    signature or fixed phrase, never a value from the patient.
    """
    burned = burned_in_annotation.strip().upper()
    if burned == "YES":
        return "BurnedInAnnotation is YES"
    if recognizable_features.strip().upper() == "YES":
        return "RecognizableVisualFeatures is YES"
    if sop_class_uid in _DOCUMENTS:
        return f"document SOP class {sop_class_uid}"
    term = screen_image_type(image_type) if image_type else None
    if term is not None:
        return f"ImageType {term}"
    if signature is not None:
        return f'device signature "{_signature_name(signature)}"'
    phrase = screen_series_description(series_description) if series_description else None
    if phrase is not None:
        return f'SeriesDescription "{phrase}"'
    if burned == "NO":
        return None
    if sop_class_uid in RISKY_SOP_CLASSES:
        return f"SOP class {sop_class_uid} without BurnedInAnnotation NO"
    mod = modality.strip().upper()
    if mod in RISKY_MODALITIES:
        return f"modality {mod[:8]} without BurnedInAnnotation NO"
    conversion = conversion_type.strip(" \0").upper()
    if conversion:
        named = conversion if conversion in CONVERSION_TYPES else "(not a defined term)"
        return f"ConversionType {named} without BurnedInAnnotation NO"
    xray = XRAY_SOP_CLASSES.get(sop_class_uid) or (mod if mod in ("XA", "RF") else None)
    if xray is not None:
        values = _first_values(image_type)
        shown = [v for v, want in zip(values, ("DERIVED", "SECONDARY"), strict=True) if v == want]
        if shown:
            which = "\\".join(shown)
            return f"{xray} ImageType {which} without BurnedInAnnotation NO"
    return None


#: Modalities whose risk is text on a screen capture: Clean Pixel Data removes it. The other
#: risky modalities are photographs, slides and documents (faces, labels, paper), which text
#: cleaning does not make safe; they stay quarantined.
CLEANABLE_MODALITIES = frozenset({"US", "IVUS", "OT"})
#: SOP classes whose risk is burned-in text: secondary captures and ultrasound.
CLEANABLE_SOP_CLASSES = frozenset(
    {
        _P + "7",
        _P + "7.1",
        _P + "7.2",
        _P + "7.3",
        _P + "7.4",
        _P + "6",
        _P + "6.1",
        _P + "3",
        _P + "3.1",
    }
)


def pixel_risk(
    modality: str,
    sop_class_uid: str,
    burned_in_annotation: str,
    recognizable_features: str,
    *,
    image_type: str = "",
    signature: str | None = None,
    series_description: str = "",
    conversion_type: str = "",
) -> tuple[bool, str] | None:
    """``(cleanable, detail)`` when the object is at risk (see :func:`burned_in_risk`), else None.

    Cleanable: the risk is burned-in text on an image Clean Pixel Data can process (any image
    stating BurnedInAnnotation YES, screen captures and dose screens of any image class,
    images a device signature matches, ultrasound, secondary captures (by class or by
    ConversionType), OT, derived and secondary XA/RF images), and not
    recognizable features, a document, or a photographic class or modality.
    """
    detail = burned_in_risk(
        modality,
        sop_class_uid,
        burned_in_annotation,
        recognizable_features,
        image_type=image_type,
        signature=signature,
        series_description=series_description,
        conversion_type=conversion_type,
    )
    if detail is None:
        return None
    if recognizable_features.strip().upper() == "YES" or sop_class_uid in _DOCUMENTS:
        return False, detail
    mod = modality.strip().upper()
    photographic = (
        sop_class_uid in RISKY_SOP_CLASSES and sop_class_uid not in CLEANABLE_SOP_CLASSES
    ) or (mod in RISKY_MODALITIES and mod not in CLEANABLE_MODALITIES)
    return not photographic, detail


_MODALITY, _SOP_CLASS, _IMAGE_TYPE = 0x00080060, 0x00080016, 0x00080008
_CONVERSION_TYPE, _SERIES_DESCRIPTION = 0x00080064, 0x0008103E
_ROWS, _BURNED_IN, _RECOGNIZABLE = 0x00280010, 0x00280301, 0x00280302
_OVERLAY_DESCRIPTION = 0x60000022
#: The top-level attributes :func:`header_risk` reads: its own and the device signatures' tests,
#: but OverlayDescription. Looking that one up means reading the header past every private
#: group to group 6000 on every file; the one signature testing it (a Siemens overlay, which
#: the profile removes unless the policy is "allow") still paints its regions on an object
#: at risk for another reason (Clean Pixel Data matches signatures on the whole data set).
#: They are the memo's key: an attribute a rule reads and the key missed would give one
#: series the answer of another.
HEADER_TAGS = frozenset(
    {
        _MODALITY,
        _SOP_CLASS,
        _IMAGE_TYPE,
        _CONVERSION_TYPE,
        _SERIES_DESCRIPTION,
        _ROWS,
        _BURNED_IN,
        _RECOGNIZABLE,
    }
) | (SIGNATURE_TAGS - {_OVERLAY_DESCRIPTION})


_KEY_TAGS = tuple(sorted(HEADER_TAGS))
#: header_risk's answers by the raw values it reads: the slices of a series share them, so
#: the signatures run once per series. Bounded; cleared when full.
_memo: dict[tuple[object, ...], tuple[bool, str] | None] = {}
_MEMO_SIZE = 512


def header_risk(top: Mapping[int, Element], codec: str | None) -> tuple[bool, str] | None:
    """:func:`pixel_risk` of a data set from its top-level elements (tag to element, at least
    those of :data:`HEADER_TAGS` present): the one rule every path applies.

    The ImageType, signature, SeriesDescription, ConversionType and XA/RF rules apply to images
    only (Rows present): a dose structured report in a "Dose Report" series carries no pixels
    to clean.
    """
    key = (codec, *[None if el is None else el.value for el in map(top.get, _KEY_TAGS)])
    try:
        return _memo[key]
    except KeyError:
        pass
    except TypeError:  # a sequence where a value belongs (malformed): not remembered
        return _header_risk(top, codec)
    risk = _header_risk(top, codec)
    if len(_memo) >= _MEMO_SIZE:
        _memo.clear()
    _memo[key] = risk
    return risk


def _header_risk(top: Mapping[int, Element], codec: str | None) -> tuple[bool, str] | None:
    def text(tag: int) -> str:
        el = top.get(tag)
        return el.raw.decode("latin-1").strip("\0 ") if el is not None else ""

    burned = text(_BURNED_IN)
    image_type = description = conversion = ""
    signature = None
    if _ROWS in top and burned.upper() != "YES":  # YES: at risk whatever else it shows
        image_type = text(_IMAGE_TYPE)
        conversion = text(_CONVERSION_TYPE)
        if screen_image_type(image_type) is None:
            found = match_header(top, codec)
            signature = found.label if found is not None else None
            el = top.get(_SERIES_DESCRIPTION)
            if el is not None and signature is None:
                description = decode_text(el.raw, codec)
    return pixel_risk(
        text(_MODALITY),
        text(_SOP_CLASS),
        burned,
        text(_RECOGNIZABLE),
        image_type=image_type,
        signature=signature,
        series_description=description,
        conversion_type=conversion,
    )
