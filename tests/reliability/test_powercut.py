"""Power cut: the fsync ordering of invariant 1, read from a syscall trace of the real agent.

Dropping the page cache after a kill is not possible here, so the test runs ``gateway-agent run``
under ``strace -f -y`` and checks, for every original the agent unlinked, that before the unlink
the de-identified temp file was fsynced, renamed onto its outbox path, the outbox folder fsynced,
and the SQLite database or its WAL synced after that rename. Quarantined inputs: the reason file
is fsynced before the original is renamed into the entry, and the entry folder fsynced after.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway_agent.synthetic import make_ct_slice
from tests.conftest import require

from ._harness import record_figures, size, wait_until
from ._strace import durability_problems, parse_strace, strace_prefix

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def test_fsync_ordering_before_original_unlink(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    require(shutil.which("strace") is not None, "strace (apt-get install strace)")
    n = size(12, 200)
    trace = tmp_path / "trace.txt"
    run = agent_run(overrides={"intake_workers": 1}, argv_prefix=strace_prefix(trace))
    engine = run.engine()
    scratch = tmp_path / "expected"
    scratch.mkdir()
    expected: dict[str, str] = {}
    for i in range(n):
        ds = make_ct_slice(study_seed="powercut", instance_number=i + 1, rows=32, cols=32)
        path = run.staging / f"PHIDOE_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        expected[path.name] = engine.deidentify_file(path, scratch).sop_instance_uid
    bad = ["not-dicom.dcm", "empty.dcm"]
    (run.staging / bad[0]).write_bytes(b"this is not DICOM " * 50)
    (run.staging / bad[1]).write_bytes(b"")
    run.start()
    try:
        for name in [*expected, *bad]:
            run.feed(name)
        wait_until(
            lambda: not run.inbox_files() and len(run.outbox_rows()) == n,
            timeout=size(120, 900),
            what="all inputs taken under strace",
        )
    finally:
        rc = run.agent.stop(timeout=60)
    events = parse_strace(trace.read_text(errors="replace"))
    state = run.state.resolve()
    rows = {sop: path for sop, _state, path, _size in run.outbox_rows()}
    originals = {str(run.inbox.resolve() / name): rows[uid] for name, uid in expected.items()}
    db = (str(state / "outbox.db"), str(state / "outbox.db-wal"))
    problems, counts = durability_problems(events, originals, db)

    # Quarantine: reason durable, then the original moved in, then the entry folder synced.
    q_checked = 0
    for name in bad:
        src = str(run.inbox.resolve() / name)
        moves = [e for e in events if e.ok and e.call.startswith("rename") and e.paths[0] == src]
        if not moves:
            problems.append(f"{name}: never moved into the quarantine")
            continue
        move = moves[0]
        entry = str(Path(move.paths[1]).parent)
        fsyncs = [e for e in events if e.ok and e.call in ("fsync", "fdatasync")]
        if not any(e.seq < move.seq and e.paths[0].startswith(entry + "/") for e in fsyncs):
            problems.append(f"{name}: quarantine reason not fsynced before the move")
        if not any(e.seq > move.seq and e.paths[0] == entry for e in fsyncs):
            problems.append(f"{name}: quarantine entry folder not fsynced after the move")
        q_checked += 1
    figures = {
        "files": n,
        "quarantined_checked": q_checked,
        "problems": len(problems),
        "trace_events": len(events),
        **counts,
    }
    record_figures("powercut", figures)
    assert counts["unlinked"] == n, (figures, "the trace did not show every original's unlink")
    assert problems == [], "\n".join(problems[:30])
    assert rc == 0


_TOY = """
import os, sqlite3, sys, threading
d = sys.argv[1]
os.makedirs(d + "/inbox"); os.makedirs(d + "/outbox")
open(d + "/inbox/a.dcm", "wb").write(b"x")
c = sqlite3.connect(d + "/outbox.db", isolation_level=None)
c.execute("pragma journal_mode=wal"); c.execute("pragma synchronous=" + sys.argv[2])
c.execute("create table t(x)")
c.execute("create table other(x)")
with open(d + "/outbox/.o.tmp", "wb") as f:
    f.write(b"y"); f.flush(); os.fsync(f.fileno())
os.replace(d + "/outbox/.o.tmp", d + "/outbox/o.dcm")
fd = os.open(d + "/outbox", os.O_RDONLY); os.fsync(fd); os.close(fd)
c.execute("begin immediate"); c.execute("insert into t values (1)"); c.execute("commit")
if sys.argv[3] == "other":  # another thread's connection commits without a sync meanwhile
    def other():
        o = sqlite3.connect(d + "/outbox.db", isolation_level=None)
        o.execute("pragma synchronous=off"); o.execute("insert into other values (1)"); o.close()
    t = threading.Thread(target=other); t.start(); t.join()
os.unlink(d + "/inbox/a.dcm")
"""


@pytest.mark.parametrize(
    ("synchronous", "other", "durable"),
    [("full", "", True), ("normal", "", False), ("full", "other", True)],
)
def test_the_checker_tells_a_synced_commit_from_an_unsynced_one(
    tmp_path: Path, synchronous: str, other: str, durable: bool
) -> None:
    """The checker itself: WAL with synchronous=NORMAL does not sync a commit (not durable); an
    unsynced commit by another thread between ours and the unlink is not ours (durable)."""
    require(shutil.which("strace") is not None, "strace (apt-get install strace)")
    import subprocess
    import sys

    work = tmp_path / "w"
    trace = tmp_path / "trace.txt"
    subprocess.run(
        [*strace_prefix(trace), sys.executable, "-c", _TOY, str(work), synchronous, other or "-"],
        check=True,
        timeout=60,
    )
    problems, counts = durability_problems(
        parse_strace(trace.read_text()),
        {str(work / "inbox" / "a.dcm"): str(work / "outbox" / "o.dcm")},
        (str(work / "outbox.db"), str(work / "outbox.db-wal")),
    )
    assert counts["unlinked"] == 1 and counts["file_fsync"] == 1 and counts["dir_fsync"] == 1
    assert (problems == []) is durable, problems
