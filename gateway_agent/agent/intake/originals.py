"""What becomes of an original once its outbox row is committed: delete, archive or keep."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from .quarantine import move_file

__all__ = ["Originals"]


class _KeptIndex:
    """Inputs already processed under ``originals = "keep"``: path hash, size, mtime (SQLite)."""

    def __init__(self, db_path: Path) -> None:
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.execute("pragma journal_mode=wal")
        self._conn.execute(
            "create table if not exists kept (key text primary key, created real not null)"
        )
        self._lock = threading.Lock()

    @staticmethod
    def key(rel: str, size: int, mtime_ns: int) -> str:
        return hashlib.sha256(f"{rel}\0{size}\0{mtime_ns}".encode()).hexdigest()

    def __contains__(self, key: object) -> bool:
        with self._lock:
            row = self._conn.execute("select 1 from kept where key = ?", (key,)).fetchone()
        return row is not None

    def add(self, key: str) -> None:
        with self._lock:
            self._conn.execute(
                "insert or ignore into kept (key, created) values (?, ?)", (key, time.time())
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Originals:
    """The ``originals`` policy, applied after the commit (design invariant 1).

    ``delete`` removes the original; ``archive`` moves it durably below ``archive_dir`` under its
    inbox-relative name (a suffix when the name is taken); ``keep`` leaves it and remembers it in
    ``state_dir/intake.db`` (path hash, size, mtime), so it is not taken again.
    """

    def __init__(
        self,
        policy: Literal["delete", "archive", "keep"],
        *,
        archive_dir: Path | None,
        state_dir: Path,
    ) -> None:
        if policy == "archive" and archive_dir is None:
            raise ValueError('Argument "archive_dir" is required when originals is "archive".')
        self.policy = policy
        self._archive_dir = Path(archive_dir) if archive_dir is not None else None
        self._kept = _KeptIndex(Path(state_dir) / "intake.db") if policy == "keep" else None

    def already_kept(self, rel: str, size: int, mtime_ns: int) -> bool:
        """True for an original kept earlier, unchanged since (``keep`` only)."""
        return self._kept is not None and _KeptIndex.key(rel, size, mtime_ns) in self._kept

    def dispose(self, src: Path, rel: str, size: int, mtime_ns: int, *, own: bool = False) -> None:
        """Apply the policy to ``src`` (inbox-relative name ``rel``); its row is committed.

        ``own``: the agent's own copy (received over C-STORE): ``keep`` deletes it too (keeping
        is for read-only inboxes; the listener's spool is not an archive).
        """
        if self.policy == "delete" or (own and self.policy == "keep"):
            with contextlib.suppress(FileNotFoundError):
                src.unlink()
        elif self.policy == "archive":
            assert self._archive_dir is not None
            dst = self._archive_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                dst = dst.with_name(f"{dst.name}.{int(time.time() * 1000)}")
            move_file(src, dst)
        else:
            assert self._kept is not None
            self._kept.add(_KeptIndex.key(rel, size, mtime_ns))

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()
