"""What becomes of an original once its outbox row is committed: delete, archive or keep.

An original is removed (or moved) only if its name still points at the very file that was
processed (device, inode, size, mtime, ctime unchanged): a file replaced under the same name
meanwhile is left for the next pass. Originals that are kept (``keep``), and originals that could
not be removed (a read-only inbox), are remembered in ``state_dir/intake.db`` by name, inode, size
and mtime, so they are not processed again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from ...logs import describe_error, get_logger
from ..outbox._sqlite import is_damage, keep_aside
from .quarantine import move_file
from .worker import FileIdentity, identity_of

__all__ = ["INTAKE_DB", "NAME_MAX", "Disposal", "Originals", "fit_name", "undeletable_count"]

log = get_logger()

#: What :meth:`Originals.dispose` did: ``done`` (removed, archived or recorded as kept),
#: ``changed`` (the name holds another file now: nothing done), ``refused`` (the inbox refused
#: the removal: the original stays, remembered).
Disposal = Literal["done", "changed", "refused"]

#: In the state folder: originals kept, and originals that could not be removed.
INTAKE_DB = "intake.db"
#: The longest file name (bytes) most file systems take.
NAME_MAX = 255
#: Errors that mean "this inbox does not let us remove files" (read-only mount, permissions).
_CANNOT_REMOVE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.EBUSY)

_SCHEMA = (
    "create table if not exists kept (key text primary key, created real not null)",
    "create table if not exists undeletable (key text primary key, how text not null,"
    " created real not null)",
)


def _key(rel: str, ino: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(os.fsencode(rel))
    h.update(f"\0{ino}\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()


def _legacy_key(rel: str, size: int, mtime_ns: int) -> str | None:
    """The key of earlier versions (name, size, mtime), for kept originals recorded by them."""
    try:
        return hashlib.sha256(f"{rel}\0{size}\0{mtime_ns}".encode()).hexdigest()
    except UnicodeEncodeError:
        return None  # a name that is not UTF-8 was never recorded that way


def fit_name(name: str, suffix: str, limit: int = NAME_MAX) -> str:
    """``name + suffix``, ``name`` shortened (bytes) so that the result fits in ``limit`` bytes."""
    raw, tail = os.fsencode(name), os.fsencode(suffix)
    return os.fsdecode(raw[: max(1, limit - len(tail))] + tail)


def undeletable_count(state_dir: Path) -> int:
    """How many committed originals could not be removed (read-only; 0 without the index)."""
    db = Path(state_dir) / INTAKE_DB
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
        try:
            return int(conn.execute("select count(*) from undeletable").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


class _CopiedNotRemovedError(OSError):
    """The archive copy is made, but the original could not be removed."""


class _Index:
    """``state_dir/intake.db``: the ``kept`` and ``undeletable`` tables (one connection, a lock)."""

    def __init__(self, db_path: Path) -> None:
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        try:
            self._conn.execute("pragma journal_mode=wal")
            for ddl in _SCHEMA:
                self._conn.execute(ddl)
        except BaseException:
            self._conn.close()
            raise
        self._lock = threading.Lock()

    def has_kept(self, key: str | None) -> bool:
        if key is None:
            return False
        with self._lock:
            row = self._conn.execute("select 1 from kept where key = ?", (key,)).fetchone()
        return row is not None

    def how(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("select how from undeletable where key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def add_kept(self, key: str) -> None:
        with self._lock:
            self._conn.execute(
                "insert or ignore into kept (key, created) values (?, ?)", (key, time.time())
            )

    def add_undeletable(self, key: str, how: str) -> None:
        with self._lock:
            self._conn.execute(
                "insert or replace into undeletable (key, how, created) values (?, ?, ?)",
                (key, how, time.time()),
            )

    def remove_undeletable(self, key: str) -> None:
        with self._lock:
            self._conn.execute("delete from undeletable where key = ?", (key,))

    def count_undeletable(self) -> int:
        with self._lock:
            return int(self._conn.execute("select count(*) from undeletable").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class Originals:
    """The ``originals`` policy, applied after the commit (design invariant 1).

    ``delete`` removes the original; ``archive`` moves it durably below ``archive_dir`` under its
    inbox-relative name (a suffix when the name is taken, the name shortened to fit); ``keep``
    leaves it and remembers it in ``state_dir/intake.db``, so it is not taken again. An original
    that cannot be removed (read-only inbox) is remembered the same way, said once in the log,
    counted by :meth:`undeletable`, and removed at a later pass once the inbox allows it.
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
        self._db_path = Path(state_dir) / INTAKE_DB
        self._index: _Index | None = None
        self._undeletable = 0
        self._warned = False
        #: Why the inbox refused the latest removal (type and errno name), for readiness.
        self.refusal: str | None = None
        self._lock = threading.Lock()
        if policy == "keep" or self._db_path.exists():
            self._index = self._open_index()
            self._undeletable = self._index.count_undeletable()

    def undeletable(self) -> int:
        """Committed originals that are still in the inbox because it refuses their removal."""
        return self._undeletable

    def already_done(self, src: Path, rel: str, st: os.stat_result) -> bool:
        """True for an original committed earlier and unchanged since: kept (``keep``), or not
        removable (its removal is tried once more here, and succeeds once the inbox allows it)."""
        index = self._index
        if index is None:
            return False
        key = _key(rel, st.st_ino, st.st_size, st.st_mtime_ns)
        if self.policy == "keep":
            return index.has_kept(key) or index.has_kept(
                _legacy_key(rel, st.st_size, st.st_mtime_ns)
            )
        if not self._undeletable:
            return False
        how = index.how(key)
        if how is None:
            return False
        self._retry_removal(key, how, src, rel)
        return True

    def _retry_removal(self, key: str, how: str, src: Path, rel: str) -> bool:
        """Try again to remove (or archive) an original that could not be; True if it went."""
        assert self._index is not None
        try:
            if how == "move":
                self._archive(src, rel)
            else:
                src.unlink()
        except FileNotFoundError:
            pass
        except _CopiedNotRemovedError:
            self._index.add_undeletable(key, "unlink")  # archived now; only the removal is left
            return False
        except OSError:
            return False
        self._index.remove_undeletable(key)
        with self._lock:
            self._undeletable = max(0, self._undeletable - 1)
        log.info("original_removed_later")
        return True

    def dispose(
        self, src: Path, rel: str, identity: FileIdentity | None, *, own: bool = False
    ) -> Disposal:
        """Apply the policy to ``src`` (inbox-relative name ``rel``), whose row is committed.

        ``identity`` is that of the file that was processed: if ``src`` now names another file
        (replaced, or rewritten in place, since), nothing is done: ``changed`` (the caller
        offers it again). ``refused``: the inbox refused the removal; the original is remembered
        and not processed again (:attr:`refusal` says why).

        ``own``: the agent's own copy (received over C-STORE): ``keep`` deletes it too (keeping
        is for read-only inboxes; the listener's spool is not an archive).
        """
        policy = "delete" if own and self.policy == "keep" else self.policy
        if identity is not None:
            try:
                now = identity_of(os.lstat(src))
            except FileNotFoundError:
                return "done"  # gone already (removed by someone else): nothing to do
            if now != identity:
                return "changed"
        else:
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                return "done"
            identity = identity_of(st)
        key = _key(rel, identity[1], identity[2], identity[3])
        if policy == "keep":
            self._ensure_index().add_kept(key)
            return "done"
        try:
            if policy == "delete":
                src.unlink()
            else:
                self._archive(src, rel)
        except FileNotFoundError:
            return "done"
        except _CopiedNotRemovedError as exc:
            self._remember_undeletable(key, "unlink", exc)
            return "refused"
        except OSError as exc:
            if exc.errno not in _CANNOT_REMOVE:
                raise
            self._remember_undeletable(key, "move" if policy == "archive" else "unlink", exc)
            return "refused"
        return "done"

    def _archive(self, src: Path, rel: str) -> None:
        assert self._archive_dir is not None
        dst = self._archive_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while os.path.lexists(dst):
            n += 1
            suffix = f".{int(time.time() * 1000)}" + (f"-{n}" if n > 1 else "")
            dst = dst.with_name(fit_name(Path(rel).name, suffix))
        try:
            move_file(src, dst)
        except OSError as exc:
            if exc.errno in _CANNOT_REMOVE and dst.exists() and src.exists():
                # Copied to another file system, but the original cannot be removed: the copy
                # is the archive; the original stays and is remembered.
                raise _CopiedNotRemovedError(
                    exc.errno, "archived, original not removable"
                ) from None
            raise

    def _remember_undeletable(self, key: str, how: str, exc: OSError) -> None:
        self.refusal = describe_error(exc)
        self._ensure_index().add_undeletable(key, how)
        with self._lock:
            self._undeletable += 1
            first = not self._warned
            self._warned = True
        if first:
            log.warning(
                "originals_not_removable",
                errno=errno.errorcode.get(exc.errno or 0, "OSError"),
                policy=self.policy,
                hint="the inbox refuses removals: originals stay and are not processed again",
            )

    def _ensure_index(self) -> _Index:
        if self._index is None:
            self._index = self._open_index()
        return self._index

    def _open_index(self) -> _Index:
        """``intake.db``; a damaged one is kept aside and started anew (originals kept or
        refused before are then processed once more: their rows exist, nothing is lost)."""
        try:
            index = _Index(self._db_path)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
        else:
            try:
                index.count_undeletable()
                return index
            except sqlite3.DatabaseError as exc:
                index.close()
                if not is_damage(exc):
                    raise
        kept = keep_aside(self._db_path, time.strftime("%Y%m%dT%H%M%S", time.gmtime()))
        log.error("intake_index_damaged", kept_as=kept.name)
        return _Index(self._db_path)

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None
