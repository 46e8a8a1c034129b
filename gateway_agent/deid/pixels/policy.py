"""Burned-in annotation policy: which objects may show identity in their pixels (at risk)."""

from __future__ import annotations

__all__ = [
    "CLEANABLE_MODALITIES",
    "CLEANABLE_SOP_CLASSES",
    "RISKY_MODALITIES",
    "RISKY_SOP_CLASSES",
    "burned_in_risk",
    "pixel_risk",
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
_DOCUMENTS = frozenset({_P + "104.1", _P + "104.2"})


def burned_in_risk(
    modality: str, sop_class_uid: str, burned_in_annotation: str, recognizable_features: str
) -> str | None:
    """Why an object may show identity in its pixels, or None.

    * BurnedInAnnotation = YES, or RecognizableVisualFeatures = YES: always a risk.
    * Documents (encapsulated PDF/CDA): always a risk (their content is free text).
    * A risky modality or SOP class: a risk unless the device states BurnedInAnnotation = NO;
      that explicit statement is the "proof otherwise" the policy accepts (see deid.md).

    The returned detail names the attribute or class, never a value from the patient.
    """
    burned = burned_in_annotation.strip().upper()
    if burned == "YES":
        return "BurnedInAnnotation is YES"
    if recognizable_features.strip().upper() == "YES":
        return "RecognizableVisualFeatures is YES"
    if sop_class_uid in _DOCUMENTS:
        return f"document SOP class {sop_class_uid}"
    if burned == "NO":
        return None
    if sop_class_uid in RISKY_SOP_CLASSES:
        return f"SOP class {sop_class_uid} without BurnedInAnnotation NO"
    if modality.strip().upper() in RISKY_MODALITIES:
        return f"modality {modality.strip().upper()[:8]} without BurnedInAnnotation NO"
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
    modality: str, sop_class_uid: str, burned_in_annotation: str, recognizable_features: str
) -> tuple[bool, str] | None:
    """``(cleanable, detail)`` when the object is at risk (see :func:`burned_in_risk`), else None.

    Cleanable: the risk is burned-in text on an image Clean Pixel Data can process (any image
    stating BurnedInAnnotation YES, ultrasound, secondary captures, OT), and not recognizable
    features, a document, or a photographic class or modality.
    """
    detail = burned_in_risk(modality, sop_class_uid, burned_in_annotation, recognizable_features)
    if detail is None:
        return None
    if recognizable_features.strip().upper() == "YES" or sop_class_uid in _DOCUMENTS:
        return False, detail
    mod = modality.strip().upper()
    photographic = (
        sop_class_uid in RISKY_SOP_CLASSES and sop_class_uid not in CLEANABLE_SOP_CLASSES
    ) or (mod in RISKY_MODALITIES and mod not in CLEANABLE_MODALITIES)
    return not photographic, detail
