"""Operator review: a picture of what Clean Pixel Data paints and where its reader still reads.

The preview never shows text read from the image: the reader's lines are drawn as boxes
(yellow: text read; magenta: the object's identity read), painted areas as red boxes over the
original frame.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..._exceptions import DeidError
from ...dicom.codec import Element
from ..profile import DeidOptions
from .clean import FrameResult, PixelJob

__all__ = ["PreviewResult", "preview"]


@dataclass(frozen=True)
class PreviewResult:
    """What the preview found (counts only)."""

    frames: int
    frame_shown: int  # 1-based
    painted_fraction: float
    regions: int
    lines_read: int
    identity_lines: int  # lines where the reader found the object's identity after cleaning
    identity_frames: int
    signature: str | None
    risk: str | None  # why the burned-in policy holds the object at risk; None: it does not


def preview(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    frame: int | None = None,
    options: DeidOptions | None = None,
) -> PreviewResult:
    """Draw ``src``'s frame (1-based ``frame``; default: the first frame where identity is
    still read, else the first) with what cleaning paints and what the reader reads, as PNG.

    Raises ``DeidError`` when the file cannot be read or its pixels cannot be decoded.
    """
    from PIL import Image, ImageDraw

    from ...dicom.codec import text_codec
    from ...dicom.files import SourceFile
    from .identity import identity_tokens
    from .policy import header_risk
    from .signatures import match_signature

    options = options or DeidOptions()
    shots: dict[int, tuple[np.ndarray, FrameResult]] = {}
    identity_frames: list[int] = []
    with SourceFile(src) as source:
        header = source.read_header()
        charset = next((e for e in header.elements if e.tag == 0x00080005), None)
        codec = text_codec(charset.raw if charset is not None else None)
        identity = identity_tokens(header.elements, codec, options)
        signature = match_signature(header.elements, header.meta, codec)
        top: dict[int, Element] = {}
        for el in header.elements:
            top.setdefault(el.tag, el)
        risk = header_risk(top, codec)
        fileobj = os.fdopen(os.dup(source.fd), "rb")
        job = PixelJob(fileobj, header.transfer_syntax, identity, signature)
        try:
            wanted = None if frame is None else frame - 1

            def observe(index: int, image: np.ndarray, result: FrameResult) -> None:
                found = result.reading is not None and bool(result.reading.identity)
                if index in (0, wanted) or (found and not identity_frames):
                    shots[index] = (image.copy(), result)
                if found:
                    identity_frames.append(index)

            job.observer = observe
            job.run(None, stop_on_identity=False)
        finally:
            job.close()
    if wanted is not None:
        if wanted not in shots:
            raise DeidError("burned_in_undecodable", "no such frame")
        index = wanted
    else:
        index = identity_frames[0] if identity_frames else 0
    image, result = shots[index]
    rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
    base = Image.fromarray(rgb).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for x0, y0, x1, y1 in result.boxes:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 0, 0, 90), outline=(255, 0, 0, 255))
    reading = result.reading
    if reading is not None:
        for x0, y0, x1, y1 in reading.lines:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 230, 0, 255))
        for _, (x0, y0, x1, y1) in reading.identity:
            draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(255, 0, 255, 255), width=3)
    picture = Image.alpha_composite(base, overlay).convert("RGB")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, "PNG")
    audit = job.audit
    return PreviewResult(
        frames=audit.frames,
        frame_shown=index + 1,
        painted_fraction=audit.painted_pixels / audit.total_pixels if audit.total_pixels else 0.0,
        regions=len(result.boxes),
        lines_read=len(reading.lines) if reading is not None else 0,
        identity_lines=len(reading.identity) if reading is not None else 0,
        identity_frames=len(identity_frames),
        signature=signature.label if signature is not None else None,
        risk=risk[1] if risk is not None else None,
    )
