"""One agent per state folder and per inbox: exclusive ``flock`` locks held for the agent's life.

The state folder's lock is ``state_dir/agent.lock`` (it records the holder's process id, for the
message a second agent prints); the inbox's lock is taken on the inbox folder itself, so a
read-only inbox can be locked too. Both are released when the process ends, however it ends (the
kernel drops ``flock`` locks with the last descriptor), so a killed agent never leaves a stale
lock. ``status`` and ``retry`` take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from ..._exceptions import ConfigError
from ...logs import get_logger

__all__ = ["LOCK_NAME", "FolderLock", "StateLock"]

log = get_logger()

#: The state folder's lock file.
LOCK_NAME = "agent.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class FolderLock:
    """An exclusive lock on a folder (the folder's own descriptor), for an inbox.

    :meth:`acquire` raises :class:`ConfigError` (one line) when another process holds it. A file
    system without ``flock`` (some network mounts) is logged and not locked.
    """

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Lock the folder as it is now (a folder replaced later is locked again by the caller)."""
        self.release()
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self._flock(fd):
            self._fd = fd

    def _flock(self, fd: int) -> bool:
        """Lock ``fd``: True when locked; False (``fd`` closed, logged) on a file system without
        ``flock``; ConfigError when another process holds the lock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self._holder(fd)
            os.close(fd)
            if exc.errno in _BUSY:
                raise ConfigError(
                    f"another agent is running with this {self.what} ({self.folder}{holder}): "
                    "stop it first; each agent needs its own inbox and state folder"
                ) from None
            log.warning("lock_unsupported", folder=self.what, errno=exc.errno)
            return False
        return True

    def _holder(self, fd: int) -> str:
        """What the error says of the process holding the lock, after the folder."""
        return ""

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class StateLock(FolderLock):
    """The state folder's lock: ``agent.lock`` inside it (mode 0600), holding the holder's pid."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(Path(state_dir), "state folder")
        self.path = self.folder / LOCK_NAME

    def acquire(self) -> None:
        self.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if not self._flock(fd):
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _holder(self, fd: int) -> str:
        holder = _read_pid(fd)
        return f", pid {holder}" if holder else ""


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
