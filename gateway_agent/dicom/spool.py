"""The C-STORE receipt spool's layout: a folder per calling AE title, file names without PHI.

``spool/ae-<calling AE, percent-encoded>/<time ns>-<counter>.dcm`` for instances kept durably,
``spool/.incoming/.recv-*`` for data sets still arriving. Light on purpose (no pynetdicom): intake
reads the layout without importing the network stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

__all__ = ["INCOMING_DIR", "folder_name", "received_files", "source_of"]

INCOMING_DIR = ".incoming"
_PREFIX = "ae-"


def folder_name(calling_ae: str) -> str:
    """The spool folder of a calling AE title (``CT 1`` -> ``ae-CT%201``)."""
    return _PREFIX + quote(calling_ae, safe="")


def source_of(path: Path) -> str:
    """The calling AE title an instance in the spool was received from ("" outside a folder)."""
    name = Path(path).parent.name
    return unquote(name[len(_PREFIX) :]) if name.startswith(_PREFIX) else ""


def received_files(spool: Path) -> Iterator[Path]:
    """Every instance received durably and not yet taken (oldest first per source)."""
    if not Path(spool).is_dir():
        return
    for folder in sorted(Path(spool).iterdir()):
        if folder.name.startswith(_PREFIX) and folder.is_dir():
            yield from sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
