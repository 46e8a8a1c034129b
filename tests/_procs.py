"""Process-tree helpers for tests that kill the agent: its descendants, and whether a pid lives."""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["alive", "descendants"]


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
