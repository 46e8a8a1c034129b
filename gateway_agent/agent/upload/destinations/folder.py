"""The folder destination: atomic, idempotent copies into a local (or mounted) folder, each read
back (its size) before it is acknowledged."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from ...._exceptions import RetryableUploadError
from ...outbox.db import OutboxRow
from . import SendResult, open_row

__all__ = ["FolderDestination"]

_CHUNK = 1 << 20


class FolderDestination:
    """Atomic copies to ``root/<study>/<series>/<sop>.dcm`` (temp + fsync + rename); idempotent."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.label = "folder"

    def target(self, row: OutboxRow) -> Path:
        return (
            self.root
            / row.study_instance_uid
            / row.series_instance_uid
            / f"{row.sop_instance_uid}.dcm"
        )

    def send(self, items: Sequence[OutboxRow]) -> SendResult:
        result = SendResult()
        touched: set[Path] = set()
        written: list[tuple[OutboxRow, int]] = []
        for row in items:
            src = open_row(row, result, uids_name_it=True)
            if src is None:
                continue
            target = self.target(row)
            try:
                size = os.fstat(src.fileno()).st_size
                with src:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.parent / f".{row.sop_instance_uid}.{secrets.token_hex(4)}.tmp"
                    try:
                        with tmp.open("xb") as dst:
                            while chunk := src.read(_CHUNK):
                                dst.write(chunk)
                            dst.flush()
                            os.fsync(dst.fileno())
                        tmp.replace(target)
                    finally:
                        tmp.unlink(missing_ok=True)
            except OSError as exc:
                # The folder itself is failing (full, read-only, unmounted): an outage, not the row.
                raise RetryableUploadError(
                    f"folder_error: {exc.strerror or type(exc).__name__}"
                ) from exc
            touched.add(target.parent)
            written.append((row, size))
        try:
            for d in touched:
                _fsync_dir(d)
            for row, size in written:
                # The proof of storage, made while the file is surely still there (a consumer of
                # the folder may take it away at any time after): its size, read back.
                try:
                    got = self.target(row).stat().st_size
                except FileNotFoundError:
                    got = -1
                if got == size:
                    result.sent.append(row.sop_instance_uid)
                else:
                    result.failed[row.sop_instance_uid] = (False, "folder_readback_mismatch")
        except OSError as exc:
            raise RetryableUploadError(
                f"folder_error: {exc.strerror or type(exc).__name__}"
            ) from exc
        return result

    def confirm(self, items: Sequence[OutboxRow]) -> set[str]:
        """All of them: ``send`` acknowledges a file only once it is flushed, renamed, its folder
        flushed and its size read back. Checking later would find files a consumer of the folder
        has already taken, and send them again."""
        return {row.sop_instance_uid for row in items}

    def close(self) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
