"""Parse ``strace -f -y`` output into ordered file-system events and check durability ordering."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STRACE_CALLS", "Event", "durability_problems", "parse_strace", "strace_prefix"]

#: The calls the power-cut check needs (``openat`` too, to see originals being read).
STRACE_CALLS = "fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,openat,pwrite64"


def strace_prefix(out: Path) -> list[str]:
    """The argv prefix that runs a command under strace, writing the trace to ``out``."""
    return [
        "strace",
        "-f",
        "-y",
        "-qq",
        "-s",
        "4096",
        "-e",
        f"trace={STRACE_CALLS}",
        "-o",
        str(out),
    ]


@dataclass(frozen=True)
class Event:
    """One completed call: ``seq`` orders completions; ``paths`` are absolute where known."""

    seq: int
    pid: int
    call: str
    paths: tuple[str, ...]
    ok: bool


_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(.*)$")
_START = re.compile(r"^(\w+)\((.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_FD = re.compile(r"^(?:-?\d+|AT_FDCWD)<(.*)>$")
_RET = re.compile(r"\)\s+=\s+(-?\d+)")


def _unescape(s: str) -> str:
    return (
        s.encode("latin-1", "backslashreplace")
        .decode("unicode_escape")
        .encode("latin-1", "replace")
        .decode("utf-8", "replace")
    )


def _split_args(text: str) -> list[str]:
    """Split the argument text at top-level commas (strings and <...> kept whole)."""
    args, cur, depth, in_str, esc = [], [], 0, False, False
    for ch in text:
        if in_str:
            cur.append(ch)
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "<({[":
            depth += 1
        elif ch in ">)}]":
            if depth == 0 and ch == ")":
                break
            depth -= 1
        elif ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if cur:
        args.append("".join(cur).strip())
    return args


def _paths(call: str, args: list[str]) -> tuple[str, ...]:
    def fd_path(a: str) -> str | None:
        m = _FD.match(a)
        return m.group(1) if m else None

    def string(a: str) -> str | None:
        if a.startswith('"'):
            return _unescape(a[1:].split('"', 1)[0] if a.endswith('"') else a[1:-1])
        return None

    def join(dirfd: str, name: str | None) -> str:
        if name is None:
            return ""
        if name.startswith("/"):
            return name
        base = fd_path(dirfd)
        return f"{base}/{name}" if base else name

    if call in ("fsync", "fdatasync", "pwrite64"):
        return (fd_path(args[0]) or "",) if args else ("",)
    if call in ("unlink", "rename"):
        return tuple(string(a) or "" for a in args[:2])
    if call == "unlinkat":
        return (join(args[0], string(args[1])),) if len(args) >= 2 else ("",)
    if call == "openat":
        return (join(args[0], string(args[1])),) if len(args) >= 2 else ("",)
    if call in ("renameat", "renameat2") and len(args) >= 4:
        return (join(args[0], string(args[1])), join(args[2], string(args[3])))
    return ()


def parse_strace(text: str) -> list[Event]:
    """Events in completion order; ``<unfinished ...>`` calls are placed where they resumed."""
    pending: dict[int, tuple[str, str]] = {}
    events: list[Event] = []
    for raw in text.splitlines():
        m = _LINE.match(raw)
        if m is None:
            continue
        pid, rest = int(m.group(1)), m.group(2)
        if rest.startswith("---") or rest.startswith("+++"):
            continue
        r = _RESUMED.match(rest)
        if r is not None:
            call, tail = r.group(1), r.group(2)
            start = pending.pop(pid, None)
            if start is None:
                continue
            body = start[1] + tail
        else:
            s = _START.match(rest)
            if s is None:
                continue
            call, body = s.group(1), s.group(2)
            if body.rstrip().endswith("<unfinished ...>"):
                pending[pid] = (call, body.rstrip()[: -len("<unfinished ...>")])
                continue
        ret = _RET.search(body)
        ok = ret is not None and int(ret.group(1)) >= 0
        args = _split_args(body)
        events.append(Event(len(events), pid, call, _paths(call, args), ok))
    return events


def durability_problems(
    events: list[Event],
    originals: dict[str, str],
    db_files: tuple[str, ...],
) -> tuple[list[str], dict[str, int]]:
    """Check invariant 1 for every original that was unlinked.

    ``originals`` maps an inbox path to the final outbox path of its de-identified copy. For
    each original unlinked in the trace, before that unlink there must be, in this order:
    an fsync of the temp file that is then renamed onto the outbox path, that rename, an fsync
    of the outbox folder (by any process: the group commit fsyncs it once for several files),
    and an fsync/fdatasync of the database or its WAL, by the thread that
    unlinks, that follows both the rename and that thread's last write (``pwrite64``) to the
    database or WAL: at the moment of the unlink the row committed for it is not only in the
    page cache. (A row never committed at all
    before its original's unlink is not visible in syscalls; the crash test covers that.)
    Returns ``(problems, counts)``.
    """
    problems: list[str] = []
    counts = {"checked": 0, "unlinked": 0, "dir_fsync": 0, "db_sync": 0, "file_fsync": 0}
    ok_events = [e for e in events if e.ok]
    for original, output in originals.items():
        unlink = next(
            (e for e in ok_events if e.call in ("unlink", "unlinkat") and e.paths[0] == original),
            None,
        )
        if unlink is None:
            continue
        counts["unlinked"] += 1
        before = [e for e in ok_events if e.seq < unlink.seq]
        renames = [
            e for e in before if e.call.startswith("rename") and len(e.paths) == 2
            and e.paths[1] == output
        ]  # fmt: skip
        if not renames:
            problems.append(f"{Path(original).name}: unlinked before its output was renamed")
            continue
        rename = renames[-1]
        tmp = rename.paths[0]
        if any(e.call in ("fsync", "fdatasync") and e.paths[0] == tmp for e in before
               if e.seq < rename.seq):  # fmt: skip
            counts["file_fsync"] += 1
        else:
            problems.append(f"{Path(original).name}: output renamed without an fsync of {tmp}")
        # The database: at the unlink, the last write to the database or its WAL by the thread
        # that unlinks (intake commits a group of rows, then removes their originals, in one
        # thread) must be synced by it, by a sync that also follows the rename. Writes of other
        # threads or connections (the uploader's, the QC job's) may come and go in between: they
        # are not this original's row, and counting them made the check fail on a commit by
        # another thread between intake's sync and its unlink.
        db_events = [
            e for e in before if e.paths and e.paths[0] in db_files and e.pid == unlink.pid
        ]
        last_write = max((e.seq for e in db_events if e.call == "pwrite64"), default=-1)
        last_sync = max((e.seq for e in db_events if e.call != "pwrite64"), default=-1)
        # The folder (the new name) is durable before the row that points at it (before the
        # unlink when the database was not synced at all: that is a problem of its own below).
        folder = str(Path(output).parent)
        bound = last_sync if last_sync > rename.seq else unlink.seq
        if any(
            rename.seq < e.seq < bound and e.call in ("fsync", "fdatasync")
            and e.paths[0] == folder
            for e in before
        ):  # fmt: skip
            counts["dir_fsync"] += 1
        else:
            problems.append(
                f"{Path(original).name}: outbox folder not fsynced between the rename and the"
                " database sync"
            )
        if last_sync > rename.seq and last_sync > last_write:
            counts["db_sync"] += 1
        else:
            problems.append(
                f"{Path(original).name}: database not synced before the unlink"
                f" (last write {last_write}, last sync {last_sync}, rename {rename.seq})"
            )
        counts["checked"] += 1
    return problems, counts
