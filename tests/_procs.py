"""Process-tree helpers for tests that kill the agent: its descendants, and whether a pid lives."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["alive", "deleted_fds", "descendants"]


def descendants(pid: int) -> set[int]:
    """All processes below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat_path.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat_path.parent.name))
    out: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (``kill -0`` succeeds on zombies)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def deleted_fds(pid: int, under: Path) -> list[str]:
    """Targets of ``pid``'s descriptors that point at a deleted file below ``under``."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(under)) and target.endswith(" (deleted)"):
            out.append(target)
    return out
