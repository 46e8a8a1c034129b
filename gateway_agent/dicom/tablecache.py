"""Derived lookup tables cached on disk (marshal), rebuilt when a source file changes.

Plain ``os`` paths, no ``pathlib``: importing it (with ``urllib.parse`` and ``ipaddress``) costs
about 3 ms of every ``anonymize`` start-up, and this module is on that path.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import sys
import zlib
from collections.abc import Callable, Sequence

TYPE_CHECKING = False  # not typing's: keeps typing off the de-identification path
if TYPE_CHECKING:
    from typing import Any

__all__ = ["cache_dir", "cached_table"]

#: Bump when the layout of any cached table changes without its sources changing.
FORMAT = 1


def cache_dir() -> str | None:
    """``$XDG_CACHE_HOME/gateway-agent``, else ``~/.cache/gateway-agent``; None without a home."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return os.path.join(base, "gateway-agent")
    home = os.environ.get("HOME")
    return os.path.join(home, ".cache", "gateway-agent") if home else None


def _key(name: str, sources: Sequence[str | os.PathLike[str]]) -> tuple[Any, ...]:
    stamps: list[tuple[str, int, int]] = []
    for path in sources:
        st = os.stat(path)
        stamps.append((os.fspath(path), st.st_size, st.st_mtime_ns))
    return (name, FORMAT, sys.version_info[:2], marshal.version, tuple(stamps))


def cached_table(
    name: str, sources: Sequence[str | os.PathLike[str]], build: Callable[[], Any]
) -> Any:
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
    entry = f"{name}-{zlib.crc32(repr(key).encode()):08x}.marshal"
    path = os.path.join(folder, entry)
    with contextlib.suppress(OSError, ValueError, EOFError, TypeError), open(path, "rb") as fh:
        # Only our own files (in a folder we create 0700): a table steers de-identification.
        if os.fstat(fh.fileno()).st_uid == os.geteuid():
            stored_key, value = marshal.loads(fh.read())  # noqa: S302 - see above
            if stored_key == key:
                return value
    value = build()
    with contextlib.suppress(OSError, ValueError):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tmp = os.path.join(folder, f".{entry}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(marshal.dumps((key, value)))
        os.replace(tmp, path)  # atomic: concurrent writers write the same bytes
        for old in os.listdir(folder):  # entries of earlier sources
            if old != entry and old.startswith(f"{name}-") and old.endswith(".marshal"):
                with contextlib.suppress(FileNotFoundError):  # a concurrent writer's
                    os.unlink(os.path.join(folder, old))
    return value
