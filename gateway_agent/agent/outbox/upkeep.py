"""Upkeep: retention of sent files and rows, and the start-up reconcile of files and rows."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ...dicom.scanner import scanner_in_dataset
from ...logs import get_logger
from .db import OutboxDB, ids_param

__all__ = ["Upkeep", "row_from_file"]

log = get_logger()

_IGNORED_SUFFIXES = (".tmp", ".partial", ".part")
#: A file whose mtime is this much later than its row's ``sent_at`` was written after it was sent.
_MTIME_SLACK_SECONDS = 1.0
#: Rows whose files retention removes in one transaction.
_PURGE_BATCH = 256
#: Suffix of a file retention moved aside (hidden: ``.<name>.retention``) before removing it.
_ASIDE_SUFFIX = ".retention"


def _remove_sent(path: Path, sent_at: float) -> bool:
    """Remove the outbox file of a row sent at ``sent_at``; False if the name holds a version
    written since (left in place, or put back). True also when the file was already gone.

    The name is renamed aside first, so the file examined is the file removed, whatever a
    worker renames onto the name meanwhile; a version put back never replaces a newer one.
    """
    aside = path.with_name(f".{path.name}{_ASIDE_SUFFIX}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return True
    if aside.lstat().st_mtime > float(sent_at) + _MTIME_SLACK_SECONDS:
        # A new version, written since: back under its name, unless a newer one took it.
        with contextlib.suppress(FileExistsError):
            path.hardlink_to(aside)
        aside.unlink()
        return False
    aside.unlink()
    return True


def row_from_file(path: Path, audit: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``Outbox.add`` for a part-10 file, from its header alone.

    Raises pydicom's ``InvalidDicomError``, ``AttributeError`` (a UID missing), ``OSError``.
    """
    from pydicom import dcmread  # only reconcile (and tests, benchmarks) read headers this way

    ds = dcmread(path, stop_before_pixels=True)
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "path": path,
        "size": path.stat().st_size,
        "audit": audit,
        "scanner": scanner_in_dataset(ds) or None,
    }


class Upkeep(OutboxDB):
    """What keeps the outbox bounded and true to its folder: retention, compaction, reconcile."""

    def purge_sent_files(self, older_than_seconds: float) -> int:
        """Retention: unlink files of rows sent over ``older_than_seconds`` ago; keep the rows.

        A file written after its row was sent is a new version of the instance that arrived
        again (its row is being queued again by intake): it is left alone, also when it takes
        the name while retention works on it. Each batch runs in one write transaction, so the
        row of a new version cannot be committed in between (intake waits for it), and each
        file is first moved aside by a rename (atomic: whatever the name holds at that instant
        is what is examined) and removed only if it was written before its row was sent.
        """
        cutoff = self.now() - older_than_seconds
        victims = self._query(
            "select id from outbox where state = 'sent' and file_gone = 0 and sent_at <= ?",
            (cutoff,),
        )
        ids = [int(v[0]) for v in victims]
        gone = 0
        for start in range(0, len(ids), _PURGE_BATCH):
            batch = ids[start : start + _PURGE_BATCH]
            with self._tx() as c:
                rows = c.execute(
                    "select id, path, sent_at from outbox where state = 'sent' and file_gone = 0"
                    " and id in (select value from json_each(?))",
                    (ids_param(batch),),
                ).fetchall()
                removed = [int(i) for i, path, sent_at in rows if _remove_sent(Path(path), sent_at)]
                c.execute(
                    "update outbox set file_gone = 1 where id in (select value from json_each(?))",
                    (ids_param(removed),),
                )
            gone += len(removed)
        return gone

    def compact(self, older_than_seconds: float) -> int:
        """Audit retention: delete sent rows whose files are gone, sent over the age ago.

        This bounds the database (SQLite reuses the freed pages). The newest row is never
        deleted, so row ids keep growing and ``rows_since`` readers (the QC job) stay correct.
        """
        cutoff = self.now() - older_than_seconds
        with self._tx() as c:
            cur = c.execute(
                "delete from outbox where state = 'sent' and file_gone = 1 and sent_at <= ?"
                " and id < (select max(id) from outbox)",
                (cutoff,),
            )
            return int(cur.rowcount)

    def add_file(self, path: Path, *, audit: dict[str, Any]) -> bool:
        """``add`` a de-identified file, its UIDs read from its header (see ``row_from_file``)."""
        return self.add(**row_from_file(path, audit))

    def reconcile(self, files_dir: Path) -> dict[str, int]:
        """Start-up check between ``files_dir`` and the rows.

        * a ``*.dcm`` file without a row is re-added from its header (``added``), or counted as
          ``unreadable`` and left in place;
        * a queued/sending row whose file is missing goes to ``dead`` with ``file_missing``
          (``missing``).
        Hidden and temporary files (``.*``, ``*.tmp``, ``*.partial``) are counted as ``temp``;
        a file retention left aside (``.*.retention``, a stop in the middle) is removed.
        """
        result = {"added": 0, "missing": 0, "unreadable": 0, "temp": 0}
        known = {os.path.realpath(p) for (p,) in self._query("select path from outbox")}
        if files_dir.is_dir():
            for dirpath, _dirs, names in os.walk(files_dir):
                for name in names:
                    path = Path(dirpath) / name
                    if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
                        result["temp"] += 1
                        if name.endswith(_ASIDE_SUFFIX):
                            # Retention stopped between moving a file aside and removing it: a
                            # sent version (a newer one's row was not committed, so its
                            # original is still in the inbox).
                            path.unlink(missing_ok=True)
                        continue
                    if os.path.realpath(path) in known or not path.is_file():
                        continue
                    # pydicom (and NumPy with it) is loaded only when a file needs reading.
                    from pydicom.errors import InvalidDicomError

                    try:
                        added = self.add_file(path, audit={"reconciled": True})
                    except (InvalidDicomError, AttributeError, OSError, ValueError):
                        result["unreadable"] += 1
                        continue
                    if added:
                        result["added"] += 1
        waiting = self._query(
            "select id, path from outbox where state in ('queued', 'sending') and file_gone = 0"
        )
        missing = [int(i) for i, p in waiting if not Path(p).exists()]
        with self._tx() as c:
            c.execute(
                "update outbox set state = 'dead', last_error = 'file_missing',"
                " lease_until = null where id in (select value from json_each(?))",
                (ids_param(missing),),
            )
        result["missing"] = len(missing)
        if any(result.values()):
            log.info("outbox_reconciled", **result)
        return result
