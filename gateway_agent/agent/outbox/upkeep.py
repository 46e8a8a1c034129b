"""Upkeep: retention of delivered files and rows, and the start-up reconcile of files and rows."""

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
#: A file written after its instance was first sent (a new version whose row intake is about to
#: commit) is left alone while it is younger than this, or than the retention period if longer,
#: by the clock now: one written before the clock was set back is removed late, never kept for
#: good.
_NEW_VERSION_SECONDS = 3600.0
#: Rows whose files retention removes in one transaction.
_PURGE_BATCH = 256
#: Suffix of a file retention moved aside (hidden: ``.<name>.retention``) before removing it.
_ASIDE_SUFFIX = ".retention"


def _remove_sent(path: Path, sent_at: float, young_since: float) -> bool:
    """Remove the outbox file of a row sent at ``sent_at``; False if the name holds a version
    written since and after ``young_since`` (left in place, or put back). True also when the
    file was already gone.

    The name is renamed aside first, so the file examined is the file removed, whatever a
    worker renames onto the name meanwhile; a version put back never replaces a newer one.
    """
    aside = path.with_name(f".{path.name}{_ASIDE_SUFFIX}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return True
    mtime = aside.lstat().st_mtime
    if mtime > float(sent_at) + _MTIME_SLACK_SECONDS and mtime > young_since:
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
        "modality": str(ds.get("Modality", "") or ""),
        "path": path,
        "size": path.stat().st_size,
        "audit": audit,
        "scanner": scanner_in_dataset(ds) or None,
    }


class Upkeep(OutboxDB):
    """What keeps the outbox bounded and true to its folder: retention, compaction, reconcile.

    An instance is *done* when every destination it goes to acknowledged it and proved it holds
    it (an instance no destination matched is done when it is added); only then may its file go.
    """

    def purge_sent_files(self, older_than_seconds: float, *, unconfirmed: bool = False) -> int:
        """Retention: unlink the files of instances done over ``older_than_seconds`` ago (every
        delivery sent that long ago; an instance no destination matched, added that long ago);
        keep the rows.

        Done means every delivery is sent and its destination proved it holds the instance
        (``confirmed`` = 1); with ``unconfirmed``, a delivery to a destination that could not
        prove it (``confirmed`` = 0) counts too. An instance with a delivery whose proof is
        pending is never purged: until then the outbox file is the last copy the agent can
        vouch for.

        A file written after its instance was first sent is a new version of the instance that
        arrived again (its deliveries are being queued again by intake): it is left alone, also
        when it takes the name while retention works on it. Each batch runs in one write
        transaction, so the row of a new version cannot be committed in between (intake waits
        for it), and each file is first moved aside by a rename (atomic: whatever the name holds
        at that instant is what is examined) and removed only if it was written before the
        first of its deliveries was sent (before its instance was added, when it has none).

        The wall clock may have been set since: every time is by the clock now. A delivery sent
        while this outbox was open had its time moved with the clock (see ``now``), so a file
        is never removed early because the clock was set forward. A file's own time is the
        clock's when it was written: one written before the clock was set back may look
        written after its send; it is treated as a new version only while it is younger than
        the retention period (at least an hour), then removed.
        """
        now = self.now()
        cutoff = now - older_than_seconds
        young_since = now - max(older_than_seconds, _NEW_VERSION_SECONDS)
        victims = self._query(
            "select i.id from instances i where i.file_gone = 0 and i.created_at <= ?1"
            " and not exists (select 1 from deliveries d where d.instance_id = i.id"
            " and (d.state != 'sent' or d.sent_at > ?1 or d.confirmed is null"
            " or (d.confirmed = 0 and not ?2)))",
            (cutoff, int(unconfirmed)),
        )
        ids = [int(v[0]) for v in victims]
        gone = 0
        for start in range(0, len(ids), _PURGE_BATCH):
            batch = ids[start : start + _PURGE_BATCH]
            with self._tx() as c:
                rows = c.execute(
                    "select i.id, i.path, coalesce((select min(d.sent_at) from deliveries d"
                    " where d.instance_id = i.id), i.created_at) from instances i"
                    " where i.file_gone = 0 and i.id in (select value from json_each(?1))"
                    " and not exists (select 1 from deliveries d where d.instance_id = i.id"
                    " and (d.state != 'sent' or d.confirmed is null"
                    " or (d.confirmed = 0 and not ?2)))",
                    (ids_param(batch), int(unconfirmed)),
                ).fetchall()
                removed = [
                    int(i)
                    for i, path, sent_at in rows
                    if _remove_sent(Path(path), sent_at, young_since)
                ]
                c.execute(
                    "update instances set file_gone = 1"
                    " where id in (select value from json_each(?))",
                    (ids_param(removed),),
                )
            gone += len(removed)
        return gone

    def compact(self, older_than_seconds: float) -> int:
        """Audit retention: delete done instances whose files are gone, done over the age ago
        (and their deliveries).

        This bounds the database (SQLite reuses the freed pages). The newest instance is never
        deleted, so ids keep growing and ``rows_since`` readers (the QC job) stay correct.
        """
        cutoff = self.now() - older_than_seconds
        with self._tx() as c:
            old = [
                int(r[0])
                for r in c.execute(
                    "select i.id from instances i where i.file_gone = 1 and i.created_at <= ?1"
                    " and i.id < (select max(id) from instances)"
                    " and not exists (select 1 from deliveries d where d.instance_id = i.id"
                    " and (d.state != 'sent' or d.sent_at > ?1))",
                    (cutoff,),
                )
            ]
            selected = ids_param(old)
            c.execute(
                "delete from deliveries where instance_id in (select value from json_each(?))",
                (selected,),
            )
            c.execute(
                "delete from instances where id in (select value from json_each(?))", (selected,)
            )
            return len(old)

    def requeue_stale(self) -> int:
        """At start-up: every ``sending`` delivery (left by a crash) goes back to ``queued``, due
        now, for every destination."""
        with self._tx() as c:
            now = self._now_tx(c)
            cur = c.execute(
                "update deliveries set state = 'queued', lease_until = null, next_attempt_at = ?"
                " where state = 'sending'",
                (now,),
            )
            n = cur.rowcount
        if n:
            log.info("outbox_requeued_stale", rows=n)
        return n

    def add_file(self, path: Path, *, audit: dict[str, Any]) -> bool:
        """``add`` a de-identified file, its UIDs read from its header (see ``row_from_file``)."""
        return self.add(**row_from_file(path, audit))

    def reconcile(self, files_dir: Path) -> dict[str, int]:
        """Start-up check between ``files_dir`` and the rows.

        * a ``*.dcm`` file without a row is re-added from its header (``added``) and routed by
          it (where it came from is not known then: rules on the inbox folder or calling AE
          match it only when its original is taken again, see ``add_many``), or counted as
          ``unreadable`` and left in place;
        * a waiting delivery whose file is missing goes to ``dead`` with ``file_missing``
          (``missing``: instances).
        Hidden and temporary files (``.*``, ``*.tmp``, ``*.partial``) are counted as ``temp``;
        a file retention left aside (``.*.retention``, a stop in the middle) is removed.
        """
        result = {"added": 0, "missing": 0, "unreadable": 0, "temp": 0}
        known = {os.path.realpath(p) for (p,) in self._query("select path from instances")}
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
            "select i.id, i.path from instances i where i.file_gone = 0 and exists (select 1"
            " from deliveries d where d.instance_id = i.id and d.state in ('queued', 'sending'))"
        )
        missing = [int(i) for i, p in waiting if not Path(p).exists()]
        with self._tx() as c:
            c.execute(
                "update deliveries set state = 'dead', last_error = 'file_missing',"
                " lease_until = null where state in ('queued', 'sending')"
                " and instance_id in (select value from json_each(?))",
                (ids_param(missing),),
            )
        result["missing"] = len(missing)
        if any(result.values()):
            log.info("outbox_reconciled", **result)
        return result
