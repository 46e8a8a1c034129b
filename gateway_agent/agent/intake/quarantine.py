"""The quarantine: inputs that cannot be processed, kept locally (0700/0600) with a JSON reason."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...logs import get_logger
from ..metrics import QUARANTINED

__all__ = [
    "ORIGINAL_NAME",
    "REASON_FILE",
    "Quarantine",
    "QuarantineEntry",
    "file_digest",
    "move_file",
]

log = get_logger()

#: Inside ``quarantine/<id>/``: the original bytes (its inbox name is kept only in reason.json).
ORIGINAL_NAME = "original"
REASON_FILE = "reason.json"


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined input; ``original_name`` may be PHI and never leaves the box."""

    id: str
    reason: str
    detail: str
    time: str
    original_size: int | None
    original_name: str | None
    path: Path

    def public(self) -> dict[str, Any]:
        """The fields safe to print: no original name."""
        return {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "time": self.time,
            "original_size": self.original_size,
        }


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex): how a release names the one file it allows."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_file(src: Path, dst: Path, *, mode: int | None = None) -> None:
    """Move ``src`` to ``dst`` durably: a rename when possible, else copy + fsync + rename + unlink.

    ``dst`` must not exist. The source is removed only once the copy is durable.
    """
    try:
        src.rename(dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # another file system: copy
            raise
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
        with src.open("rb") as fin, tmp.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
        tmp.replace(dst)
        _fsync_dir(dst.parent)
        src.unlink()
    if mode is not None:
        dst.chmod(mode)


def _copy_at(folder_fd: int, name: str, dst: Path) -> None:
    """Copy ``name`` of the folder ``folder_fd`` to ``dst`` durably (temp, fsync, rename)."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    with os.fdopen(src_fd, "rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)
        fout.flush()
        os.fsync(fout.fileno())
    tmp.replace(dst)
    _fsync_dir(dst.parent)


class Quarantine:
    """``root/<id>/`` folders, each holding ``original`` and ``reason.json``; never uploaded."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def released_dir(self) -> Path:
        """Where releases with ``allow_burned_in`` are recorded (beside the quarantine root):
        one ``<sha256 of the file>.json`` each, read and removed by the worker that delivers it.
        """
        return self.root.with_name(self.root.name + "-released")

    def ensure(self) -> None:
        """Create the root (mode 0700)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)

    def put(
        self, src: Path, reason: str, detail: str = "", *, original_name: str | None = None
    ) -> str:
        """Move ``src`` into a new entry with its reason; return the entry id.

        The reason file is written first, then the original is moved in; a crash in between
        leaves an entry without ``original`` (removed by :meth:`cleanup`) and the input still
        in the inbox, so nothing is lost.
        """
        try:
            size: int | None = src.lstat().st_size
        except OSError:
            size = None
        name = original_name if original_name is not None else src.name
        entry = self._new_entry(reason, detail, size, name)
        move_file(src, entry / ORIGINAL_NAME, mode=0o600)
        return self._done(entry, reason, size)

    def put_at(
        self, folder_fd: int, name: str, reason: str, detail: str = "", *, original_name: str
    ) -> str:
        """:meth:`put` for a file given by its folder's descriptor and its name (a path too long
        to be opened by name)."""
        try:
            size: int | None = os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_size
        except FileNotFoundError:
            raise
        except OSError:
            size = None
        entry = self._new_entry(reason, detail, size, original_name)
        dst = entry / ORIGINAL_NAME
        try:
            os.rename(name, dst, src_dir_fd=folder_fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                shutil.rmtree(entry, ignore_errors=True)
                raise
            _copy_at(folder_fd, name, dst)
            os.unlink(name, dir_fd=folder_fd)
        dst.chmod(0o600)
        return self._done(entry, reason, size)

    def _new_entry(self, reason: str, detail: str, size: int | None, original_name: str) -> Path:
        """A new entry folder holding its (flushed) ``reason.json``; the original comes next."""
        self.ensure()
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        entry_id = f"{stamp}-{secrets.token_hex(4)}"
        entry = self.root / entry_id
        entry.mkdir(mode=0o700)
        entry.chmod(0o700)
        record = {
            "id": entry_id,
            "reason": reason,
            "detail": detail,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "original_size": size,
            "original_name": original_name,
        }
        tmp = entry / f".{REASON_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(entry / REASON_FILE)
        return entry

    def _done(self, entry: Path, reason: str, size: int | None) -> str:
        _fsync_dir(entry)
        QUARANTINED.labels(reason=reason).inc()
        log.warning("quarantined", id=entry.name, reason=reason, size=size)
        return entry.name

    def _read(self, entry: Path) -> QuarantineEntry | None:
        try:
            data = json.loads((entry / REASON_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        return QuarantineEntry(
            id=entry.name,
            reason=str(data.get("reason", "unknown")),
            detail=str(data.get("detail", "")),
            time=str(data.get("time", "")),
            original_size=data.get("original_size"),
            original_name=data.get("original_name"),
            path=entry,
        )

    def entries(self) -> list[QuarantineEntry]:
        """All complete entries, oldest first (ids sort by time)."""
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            if not (child / ORIGINAL_NAME).exists():
                continue
            e = self._read(child)
            if e is not None:
                out.append(e)
        return out

    def summary(self, latest: int = 5) -> dict[str, Any]:
        """Count by reason and the latest few entries (public fields only)."""
        items = self.entries()
        return {
            "count": len(items),
            "by_reason": dict(Counter(e.reason for e in items).most_common()),
            "latest": [e.public() for e in items[-latest:][::-1]],
        }

    def _record_release(self, original: Path, info: QuarantineEntry) -> None:
        digest = file_digest(original)
        folder = self.released_dir
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        record = {
            "quarantine_id": info.id,
            "reason": info.reason,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp = folder / f".{digest}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(folder / f"{digest}.json")
        _fsync_dir(folder)
        log.warning("burned_in_released", id=info.id, reason=info.reason)

    def cleanup(self) -> int:
        """Remove entries left incomplete by a crash (no original inside); return how many."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for child in self.root.iterdir():
            if not child.is_dir() or (child / ORIGINAL_NAME).exists():
                continue
            shutil.rmtree(child, ignore_errors=True)
            removed += 1
        return removed

    def release(self, entry_id: str, inbox: Path, *, allow_burned_in: bool = False) -> Path:
        """Put an entry's original back into ``inbox`` (atomically visible) and drop the entry.

        The file lands as ``inbox/retry-<id>/<original name>``; the watcher takes it from there.
        ``allow_burned_in`` (an operator's decision after review, for an entry quarantined for
        its pixels) records the file's digest in :attr:`released_dir` first: the agent then
        delivers that file, and only that file, as the ``allow`` policy would, and records the
        release in its audit.
        """
        entry = self.root / entry_id
        if "/" in entry_id or entry_id.startswith(".") or not (entry / ORIGINAL_NAME).exists():
            raise KeyError(entry_id)
        info = self._read(entry)
        if allow_burned_in:
            if info is None or not info.reason.startswith("burned_in_"):
                raise ValueError(f"entry {entry_id} was not quarantined for its pixels")
            self._record_release(entry / ORIGINAL_NAME, info)
        name = Path(info.original_name or "").name if info else ""
        if not name or name.startswith(".") or name == ".." or len(os.fsencode(name)) > 255:
            name = f"{entry_id}.dcm"
        target_dir = Path(inbox) / f"retry-{entry_id}"
        target_dir.mkdir(parents=True, exist_ok=True)
        # Staged under a name of our own (never the original's: it may be PHI, and as long as
        # the longest name a file system takes, leaving no room for a prefix or a suffix).
        staged = target_dir / f".{entry_id}.partial"
        move_file(entry / ORIGINAL_NAME, staged)
        target = target_dir / name
        staged.replace(target)  # the rename is what makes the watcher take it
        with contextlib.suppress(OSError):
            target.chmod(0o600)
        shutil.rmtree(entry, ignore_errors=True)
        return target
