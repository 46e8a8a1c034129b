"""The DICOM data dictionary (tag -> VR, keyword, name), read from pydicom's table file directly."""

from __future__ import annotations

import importlib.machinery
import os
from functools import cache
from types import ModuleType

from .tablecache import cached_table

__all__ = ["is_known", "keyword_of", "name_of", "vr_of"]

Entry = tuple[str, str, str, str, str]  # VR, VM, Name, Retired, Keyword


@cache
def _source() -> str:
    spec = importlib.machinery.PathFinder.find_spec("pydicom")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - pydicom is a dep
        raise ImportError("pydicom is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "_dicom_dict.py")


@cache
def _module() -> ModuleType:
    # ``import pydicom`` costs about 0.45 s (numpy, pixel handlers); the dictionary is a plain
    # module of dict literals, so load that one file (its cached bytecode) on its own.
    import importlib.util  # only when the table cache is rebuilt

    path = _source()
    mod_spec = importlib.util.spec_from_file_location("_gateway_agent_dicom_dict", path)
    if mod_spec is None or mod_spec.loader is None:  # pragma: no cover
        raise ImportError("cannot load the pydicom data dictionary")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@cache
def _tables() -> tuple[dict[int, Entry], list[tuple[int, int, Entry]]]:
    mod = _module()
    main: dict[int, Entry] = mod.DicomDictionary
    repeaters: list[tuple[int, int, Entry]] = []
    for pattern, entry in mod.RepeatersDictionary.items():
        mask = int("".join("0" if c in "xX" else "F" for c in pattern), 16)
        value = int("".join("0" if c in "xX" else c for c in pattern), 16)
        repeaters.append((mask, value, entry))
    return main, repeaters


def _build_vr_tables() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    main, repeaters = _tables()
    return (
        {tag: entry[0] for tag, entry in main.items()},
        tuple((mask, value, entry[0]) for mask, value, entry in repeaters),
    )


@cache
def _vr_tables() -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """tag -> dictionary VR and the repeating-group patterns: all the hot path needs.

    Cached on disk (see :mod:`.tablecache`): executing pydicom's table costs a few ms per
    process, reading the compact table about a tenth of that.
    """
    value: tuple[dict[int, str], tuple[tuple[int, int, str], ...]] = cached_table(
        "dicom-vr", (_source(), __file__), _build_vr_tables
    )
    return value


@cache
def _vr_entry(tag: int) -> str | None:
    main, repeaters = _vr_tables()
    found = main.get(tag)
    if found is not None:
        return found
    for mask, value, vr in repeaters:
        if tag & mask == value:
            return vr
    return None


@cache
def _entry(tag: int) -> Entry | None:
    main, repeaters = _tables()
    found = main.get(tag)
    if found is not None:
        return found
    for mask, value, entry in repeaters:
        if tag & mask == value:
            return entry
    return None


def is_known(tag: int) -> bool:
    """True when ``tag`` is a standard (public, dictionary) attribute."""
    return _vr_entry(tag) is not None


@cache
def vr_of(tag: int) -> str:
    """The dictionary VR of ``tag`` (first of ambiguous ones, ``"UN"`` when unknown).

    Private creators (gggg,0010-00FF with gggg odd) are ``LO``.
    """
    vr = _vr_entry(tag)
    if vr is None:
        group, elem = tag >> 16, tag & 0xFFFF
        if group & 1 and 0x10 <= elem <= 0xFF:
            return "LO"
        if elem == 0:
            return "UL"
        return "UN"
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
