"""The DICOM data dictionary (tag -> VR, keyword, name), read from pydicom's table module."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

__all__ = ["is_known", "keyword_of", "name_of", "vr_of"]

Entry = tuple[str, str, str, str, str]  # VR, VM, Name, Retired, Keyword


@cache
def _tables() -> ModuleType:
    """pydicom's ``_dicom_dict`` module, loaded on its own.

    ``import pydicom`` (numpy, its pixel handlers) costs about 0.15 s per process, a quarter
    of ``anonymize`` on 1,000 CT slices (``benchmarks/bench_deid.py --slices 1000``), and the
    header-only path needs none of it: the dictionary is one module of dict literals, so it is
    loaded from its file (and cached bytecode) without its package.
    """
    package = importlib.util.find_spec("pydicom")
    if package is None or not package.submodule_search_locations:  # pragma: no cover
        raise ImportError("pydicom is not installed")
    folder = Path(next(iter(package.submodule_search_locations)))
    spec = importlib.util.spec_from_file_location(
        "_gateway_agent_dicom_dict", folder / "_dicom_dict.py"
    )
    if spec is None or spec.loader is None:  # pragma: no cover
        raise ImportError("cannot load the pydicom data dictionary")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _repeaters() -> tuple[tuple[int, int, Entry], ...]:
    """The repeating-group patterns (``60xx3000``...) as (mask, value, entry)."""
    found: list[tuple[int, int, Entry]] = []
    for pattern, entry in _tables().RepeatersDictionary.items():
        mask = int("".join("0" if c in "xX" else "F" for c in pattern), 16)
        value = int("".join("0" if c in "xX" else c for c in pattern), 16)
        found.append((mask, value, entry))
    return tuple(found)


@cache
def _entry(tag: int) -> Entry | None:
    found: Entry | None = _tables().DicomDictionary.get(tag)
    if found is not None:
        return found
    for mask, value, entry in _repeaters():
        if tag & mask == value:
            return entry
    return None


def is_known(tag: int) -> bool:
    """True when ``tag`` is a standard (public, dictionary) attribute."""
    return _entry(tag) is not None


@cache
def vr_of(tag: int) -> str:
    """The dictionary VR of ``tag`` (first of ambiguous ones, ``"UN"`` when unknown).

    Private creators (gggg,0010-00FF with gggg odd) are ``LO``.
    """
    entry = _entry(tag)
    if entry is None:
        group, elem = tag >> 16, tag & 0xFFFF
        if group & 1 and 0x10 <= elem <= 0xFF:
            return "LO"
        if elem == 0:
            return "UL"
        return "UN"
    vr = entry[0]
    if " or " in vr:
        # "US or SS", "OB or OW", "US or SS or OW": any choice encodes the same bytes.
        return vr.split(" or ")[0]
    return vr


def keyword_of(tag: int) -> str:
    """The dictionary keyword of ``tag`` or ``""``."""
    entry = _entry(tag)
    return entry[4] if entry else ""


def name_of(tag: int) -> str:
    """The dictionary name of ``tag``; private and unknown tags get a generic label."""
    entry = _entry(tag)
    if entry:
        return entry[2]
    return "Private" if (tag >> 16) & 1 else "Unknown"
