"""The ``pixels`` command: preview what Clean Pixel Data paints on a file, for operator review."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .._exceptions import DeidError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pixels``."""
    from ._help import add_command

    p = add_command(
        sub,
        "pixels",
        summary="preview Clean Pixel Data on a file: what is painted, where text is still read",
        description=(
            "Runs Clean Pixel Data on FILE without writing a DICOM output and draws one frame "
            "to PNG: red boxes are painted, yellow boxes are lines the verifier reads after "
            "cleaning, magenta boxes are lines where it reads the object's identity (the "
            "reason for burned_in_text_remaining). No text is shown or printed. Default frame: "
            "the first where identity is read, else the first. Exit status 1 when identity is "
            "still read (the object would be quarantined)."
        ),
        examples=[
            "gateway-agent pixels state/quarantine/<id>/original -o preview.png",
            "gateway-agent pixels cine.dcm -o frame12.png --frame 12",
        ],
    )
    p.add_argument("file", type=Path, metavar="FILE", help="a DICOM file (e.g. from quarantine/)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="PREVIEW.png")
    p.add_argument("--frame", type=int, default=None, help="frame to draw (1-based)")
    p.set_defaults(func=_pixels)


def _pixels(args: argparse.Namespace) -> int:
    from ..deid.pixels.preview import preview

    try:
        found = preview(args.file, args.output, frame=args.frame)
    except DeidError as exc:
        print(f"gateway-agent pixels: cannot preview the file: {exc.reason}", file=sys.stderr)
        return 2
    print(
        f"frame {found.frame_shown} of {found.frames}: {found.regions} region(s) painted, "
        f"{100 * found.painted_fraction:.2f} % of the pixels over all frames; the verifier "
        f"reads {found.lines_read} line(s) after cleaning, {found.identity_lines} with the "
        f"object's identity ({found.identity_frames} frame(s) with identity in all)"
    )
    if found.signature:
        print(f"device signature: {found.signature}")
    if found.risk is not None:
        print(f"burned-in policy: at risk ({found.risk})")
    else:
        print("burned-in policy: not at risk (its pixels are sent as they are)")
    print(f"preview written to {args.output}")
    return 1 if found.identity_frames else 0
