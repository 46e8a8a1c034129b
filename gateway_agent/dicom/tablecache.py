"""Derived lookup tables cached on disk (marshal), rebuilt when a source file changes."""

from __future__ import annotations

import contextlib
import marshal
import os
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

TYPE_CHECKING = False  # not typing's: keeps typing off the de-identification path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["cache_dir", "cached_table"]

#: Bump when the layout of any cached table changes without its sources changing.
FORMAT = 1


def cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/gateway-agent``, else ``~/.cache/gateway-agent``; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "gateway-agent"
    home = os.environ.get("HOME")
    return Path(home) / ".cache" / "gateway-agent" if home else None


def _key(name: str, sources: Sequence[Path]) -> tuple[Any, ...]:
    stamps: list[tuple[str, int, int]] = []
    for path in sources:
        st = path.stat()
        stamps.append((str(path), st.st_size, st.st_mtime_ns))
    return (name, FORMAT, sys.version_info[:2], marshal.version, tuple(stamps))


def cached_table(name: str, sources: Sequence[Path], build: Callable[[], Any]) -> Any:
    """``build()``'s value, read from the cache when ``sources`` are unchanged.

    The value must be marshal-able (dicts, tuples, strings, ints...). The cache entry is keyed
    by the path, size and mtime of every source (include the module that builds the table, so an
    edit of the code invalidates it too), the format and the Python version. A missing, stale,
    corrupt or unwritable cache only costs the build; it is never an error.
    """
    try:
        key = _key(name, sources)
    except OSError:
        return build()
    folder = cache_dir()
    if folder is None:
        return build()
    path = folder / f"{name}-{zlib.crc32(repr(key).encode()):08x}.marshal"
    with contextlib.suppress(OSError, ValueError, EOFError, TypeError), path.open("rb") as fh:
        # Only our own files (in a folder we create 0700): a table steers de-identification.
        if os.fstat(fh.fileno()).st_uid == os.geteuid():
            stored_key, value = marshal.loads(fh.read())  # noqa: S302 - see above
            if stored_key == key:
                return value
    value = build()
    with contextlib.suppress(OSError, ValueError):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(marshal.dumps((key, value)))
        tmp.replace(path)  # atomic: concurrent writers write the same bytes
        for old in folder.glob(f"{name}-*.marshal"):  # entries of earlier sources
            if old != path:
                old.unlink(missing_ok=True)
    return value
