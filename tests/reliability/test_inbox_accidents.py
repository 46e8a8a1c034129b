"""Accidents at the inbox: writers that append in rounds, files replaced under their name, the
inbox folder deleted or moved and recreated, names that are not UTF-8, an inbox the agent cannot
delete from, 255-byte names and paths deeper than PATH_MAX.

Each case runs the real agent as a child process and records its figures for
``benchmarks/reliability.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import require

from ._accidents import Inputs, cli, ct_bytes, readonly_folder, start_agent, status_json
from ._harness import AgentRun, assert_no_phi, phi_audit, record_figures, size, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _reached(predicate: Any, timeout: float, *, interval: float = 0.1) -> bool:
    try:
        wait_until(predicate, timeout, interval=interval)
    except AssertionError:
        return False
    return True


def _quarantine_reasons(run: AgentRun) -> list[str]:
    out = []
    root = run.state / "quarantine"
    if root.is_dir():
        for entry in root.iterdir():
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads((entry / "reason.json").read_text())["reason"])
    return out


def _errors(run: AgentRun) -> list[str]:
    return [ln for ln in run.agent.log_lines() if '"level": "error"' in ln or "Traceback" in ln]


def _readyz(run: AgentRun) -> dict[str, Any]:
    port = run.metrics_port()
    assert port is not None
    result: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
    return result


# --------------------------------------------------------------------------- chunked writers


def test_a_file_written_in_rounds_is_taken_once_complete(agent_run) -> None:  # type: ignore[no-untyped-def]
    """Writers that open, append and close in rounds (``dd conv=notrunc`` in a loop, SMB copies):
    each file is delivered once, nothing quarantined, however the rounds fall."""
    n, rounds = size(6, 100), 9
    # The default settle time: a writer that pauses longer than it between rounds is, by
    # definition, done (the suite's 0.3 s would be shorter than a pause on a loaded machine).
    run = agent_run(overrides={"settle_seconds": 2.0})
    inputs = Inputs(run)
    rng = random.Random(19)
    for i in range(n):
        inputs.add(f"PHIDOE_{i:03d}.dcm", ct_bytes(i, study="chunks", rows=64))
    start_agent(run)
    for name, data in inputs.data.items():
        target = run.inbox / name
        step = -(-len(data) // rounds)
        for k in range(rounds):
            with target.open("ab") as fh:
                fh.write(data[k * step : (k + 1) * step])
            time.sleep(rng.uniform(0.0, 0.05))  # well inside the 0.3 s settle time
    want = set(inputs.expected.values())
    delivered = _reached(lambda: want <= run.delivered_uids() and not run.inbox_files(), 60)
    time.sleep(1.0)  # anything quarantined late would show now
    reasons = _quarantine_reasons(run)
    run.agent.stop()
    figures = {
        "files": n,
        "rounds": rounds,
        "delivered": len(want & run.delivered_uids()),
        "quarantined": len(reasons),
        "reasons": sorted(set(reasons)),
    }
    record_figures("chunked_writer", figures)
    assert delivered and reasons == [], figures


# --------------------------------------------------------------------------- files replaced


def _same_size(a: bytes, b: bytes) -> tuple[bytes, bytes]:
    """Both made as long as each other with a trailing (FFFC,FFFC) Data Set Trailing Padding."""
    target = max(len(a), len(b)) + 64

    def pad(data: bytes) -> bytes:
        n = target - len(data) - 12
        return data + b"\xfc\xff\xfc\xffOB\x00\x00" + n.to_bytes(4, "little") + b"\0" * n

    return pad(a), pad(b)


def test_a_file_replaced_under_its_name_is_not_lost(agent_run) -> None:  # type: ignore[no-untyped-def]
    """Pairs: a file appears, and while the agent commits it a second file (another instance, same
    size) replaces it under the same name, rsync-style (temporary name renamed over it, the mtime
    set to the first's), or rewritten in place. The second must always be delivered.

    The replacement is timed to the agent's work: as soon as the de-identified copy of the first
    is complete in the outbox folder (the first has been read), the second takes its name.
    """
    pairs = size(12, 100)
    run = agent_run()
    inputs = Inputs(run)
    for i in range(pairs):
        a, b = _same_size(
            ct_bytes(2 * i, study="replace", rows=768),
            ct_bytes(2 * i + 1, study="replace", rows=768),
        )
        inputs.add(f"a{i}", a)
        inputs.add(f"b{i}", b)
    outbox = run.state / "outbox"
    start_agent(run)
    timed = 0
    for i in range(pairs):
        name = f"PHIDOE_{i:03d}.dcm"
        a, b = inputs.data[f"a{i}"], inputs.data[f"b{i}"]
        done_a = outbox / f"{inputs.expected[f'a{i}']}.dcm"

        def first_read(a: bytes = a, done_a: Path = done_a) -> bool:
            if done_a.exists():
                return True
            with contextlib.suppress(OSError):
                return any(p.stat().st_size >= len(a) - 4096 for p in outbox.glob(".tmp-*"))
            return False

        run.drop(name, a)
        st = os.stat(run.inbox / name)
        timed += _reached(first_read, 10, interval=0.0002)
        if i % 2:  # rewritten in place, same size (mtime and ctime change)
            try:
                with (run.inbox / name).open("r+b") as fh:
                    fh.write(b)
            except FileNotFoundError:  # the first was taken whole before: the second arrives
                (run.inbox / name).write_bytes(b)
        else:  # rsync-style: a temporary name renamed over it, the first's mtime kept
            tmp = run.inbox / f".{name}.rsync"
            tmp.write_bytes(b)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, run.inbox / name)
        wait_until(lambda name=name: not (run.inbox / name).exists(), 30, what="taken")
    want = {inputs.expected[f"b{i}"] for i in range(pairs)}
    _reached(lambda: want <= run.delivered_uids(), 30)
    run.agent.stop()
    lost = want - run.delivered_uids()
    firsts = {inputs.expected[f"a{i}"] for i in range(pairs)} & run.delivered_uids()
    figures = {
        "pairs": pairs,
        "replaced_while_committing": timed,
        "lost": len(lost),
        "first_versions_delivered": len(firsts),
        "left_in_inbox": len(run.inbox_files()),
    }
    record_figures("replaced_file", figures)
    assert not lost, figures


# --------------------------------------------------------------------------- the inbox itself


def test_inbox_deleted_or_moved_and_recreated(agent_run) -> None:  # type: ignore[no-untyped-def]
    """The inbox deleted and recreated, then moved away and a new one made: the agent watches the
    new folder at once (no wait for the periodic re-scan), and says so while it is missing."""
    run = agent_run()
    inputs = Inputs(run)
    for i in range(3):
        inputs.add(f"PHIDOE_{i}.dcm", ct_bytes(i, study="inbox"))
    names = sorted(inputs.data)
    start_agent(run)
    run.drop(names[0], inputs.data[names[0]])
    wait_until(lambda: inputs.expected[names[0]] in run.delivered_uids(), 30, what="first file")
    # 1. deleted; missing for a while (status and readiness say so); recreated.
    shutil.rmtree(run.inbox)
    time.sleep(2.5)
    ready_missing = _readyz(run)
    status_missing = status_json(run)["inbox"]
    run.inbox.mkdir()
    t0 = time.monotonic()
    run.drop(names[1], inputs.data[names[1]])
    took_recreated = (
        time.monotonic() - t0
        if _reached(lambda: inputs.expected[names[1]] in run.delivered_uids(), 30)
        else None
    )
    # 2. moved away, a new folder made in its place.
    os.rename(run.inbox, run.root / "inbox-old")
    run.inbox.mkdir()
    time.sleep(0.5)
    t0 = time.monotonic()
    run.drop(names[2], inputs.data[names[2]])
    took_moved = (
        time.monotonic() - t0
        if _reached(lambda: inputs.expected[names[2]] in run.delivered_uids(), 30)
        else None
    )
    ready_back = _readyz(run)
    run.agent.stop()
    figures = {
        "recreated_delivery_s": None if took_recreated is None else round(took_recreated, 2),
        "moved_delivery_s": None if took_moved is None else round(took_moved, 2),
        "readyz_while_missing": ready_missing.get("status"),
        "status_while_missing": bool(status_missing.get("missing")),
    }
    record_figures("inbox_recreated", figures)
    assert took_recreated is not None and took_moved is not None, figures
    assert ready_missing["status"] == "not ready", ready_missing
    assert "missing" in json.dumps(ready_missing["checks"].get("inbox")), ready_missing
    assert status_missing.get("missing") is True, status_missing
    assert ready_back["checks"]["inbox"]["ok"], ready_back


# --------------------------------------------------------------------------- names


NON_UTF8 = [b"\xff\xfe.dcm", b"M\xfcller_PHIDOE.dcm", b"sub\xe9/\xe9t\xe9.dcm", b"\x80\x81\x82"]


@pytest.mark.parametrize("originals", ["delete", "keep", "archive"])
def test_names_that_are_not_utf8(tmp_path: Path, agent_run, originals: str) -> None:  # type: ignore[no-untyped-def]
    overrides: dict[str, Any] = {"originals": originals}
    if originals == "archive":
        overrides["archive_dir"] = str(tmp_path / "archive")
    run = agent_run(overrides=overrides)
    inputs = Inputs(run)
    for i, raw in enumerate(NON_UTF8):
        inputs.add(os.fsdecode(raw), ct_bytes(i, study=f"names-{originals}"))
    start_agent(run)
    inbox = os.fsencode(run.inbox)
    for raw in NON_UTF8:
        data = inputs.data[os.fsdecode(raw)]
        tmp = os.path.join(inbox, b".incoming")
        with open(tmp, "wb") as fh:
            fh.write(data)
        if b"/" in raw:
            os.makedirs(os.path.join(inbox, os.path.dirname(raw)), exist_ok=True)
        os.rename(tmp, os.path.join(inbox, raw))
    want = set(inputs.expected.values())
    delivered = _reached(lambda: want <= run.delivered_uids(), 30)
    if originals != "keep":
        _reached(lambda: not run.inbox_files(), 10)
    # Restart: a kept original is not taken again.
    run.agent.stop()
    start_agent(run)
    time.sleep(1.5)
    run.agent.stop()
    stopped = [
        json.loads(ln)
        for ln in run.agent.log_lines()
        if ln.startswith("{") and '"intake_stopped"' in ln
    ]
    taken_again = sum(int(s.get("committed", 0)) for s in stopped[1:])
    errors = _errors(run)
    names_logged = [
        ln for ln in run.agent.log_lines() if "\\udc" in ln or "ller_" in ln or "\\u00fc" in ln
    ]
    rows = len(run.outbox_rows())
    figures = {
        "originals": originals,
        "names": len(NON_UTF8),
        "delivered": len(want & run.delivered_uids()),
        "rows": rows,
        "taken_again": taken_again,
        "errors_logged": len(errors),
        "names_logged": len(names_logged),
        "left_in_inbox": len(run.inbox_files()) if originals != "keep" else None,
    }
    record_figures("names", figures)
    assert delivered and taken_again == 0, figures
    assert errors == [] and names_logged == [], (figures, errors[:3], names_logged[:3])
    assert rows == len(NON_UTF8), figures
    if originals == "archive":
        archived = [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
        assert len(archived) == len(NON_UTF8)


# --------------------------------------------------------------------------- a read-only inbox


def _outbox_inodes(run: AgentRun) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (run.state / "outbox").glob("*.dcm")}


def test_an_inbox_the_agent_cannot_delete_from(agent_run) -> None:  # type: ignore[no-untyped-def]
    """``originals = "delete"`` on a read-only inbox: each file is de-identified once, not at every
    scan or start; status and /readyz say that originals cannot be removed."""
    n, restarts = size(10, 30), size(2, 5)
    run = agent_run()
    inputs = Inputs(run)
    for i in range(n):
        name = f"PHIDOE_{i:03d}.dcm"
        inputs.add(name, ct_bytes(i, study="readonly"))
        (run.inbox / name).write_bytes(inputs.data[name])
    try:
        ctx = readonly_folder(run.inbox)
        method = ctx.__enter__()
    except OSError:
        require(False, "a read-only bind mount or chattr +i (root)")
        return
    try:
        start_agent(run)
        want = set(inputs.expected.values())
        wait_until(lambda: want <= run.delivered_uids(), 60, what="delivered")
        time.sleep(1.0)
        made = _outbox_inodes(run)
        ready = _readyz(run)
        status = status_json(run)["inbox"]
        for _ in range(restarts):
            run.agent.stop()
            start_agent(run)
            time.sleep(1.5)
        run.agent.stop()
    finally:
        ctx.__exit__(None, None, None)
    # A de-identification writes its output anew (a new inode under the same name).
    redone = sum(1 for name, ino in _outbox_inodes(run).items() if made.get(name) != ino)
    errors = _errors(run)
    figures = {
        "method": method,
        "files": n,
        "restarts": restarts,
        "redone": redone,
        "errors_logged": len(errors),
        "readyz": ready.get("status"),
        "status_undeletable": status.get("undeletable"),
    }
    record_figures("readonly_inbox", figures)
    assert redone == 0 and errors == [], (figures, errors[:3])
    assert ready["checks"]["intake"]["ok"] is False, ready
    assert "cannot remove originals" in ready["checks"]["intake"]["detail"], ready
    assert status.get("undeletable") == n, status


# --------------------------------------------------------------------------- long names, deep paths


def test_long_names_and_deep_paths(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    """255-byte names: quarantined and released by ``retry --quarantine`` without a traceback or
    the name on the terminal; two of them colliding in the archive are both archived. A file
    deeper than PATH_MAX is quarantined with a reason, not left unseen."""
    run = agent_run(overrides={"originals": "archive", "archive_dir": str(tmp_path / "archive")})
    inputs = Inputs(run)
    long_bad = "PHIDOE_" + "x" * 244 + ".dcm"
    long_ok = "PHIDOE_" + "y" * 244 + ".dcm"
    assert len(long_bad.encode()) == 255
    inputs.add("v1", ct_bytes(1, study="long"))
    inputs.add("v2", ct_bytes(2, study="long"))
    # A file below a chain of folders whose path is longer than PATH_MAX (4096 bytes).
    part = "PHIDOE" + "d" * 240
    fd = os.open(run.inbox, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while depth * (len(part) + 1) < 4300:
            os.mkdir(part, dir_fd=fd)
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            depth += 1
        deep_data = ct_bytes(3, study="long")
        inputs.add("deep", deep_data)
        out = os.open("PHIDOE_deep.dcm", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(out, deep_data)
        os.close(out)
    finally:
        os.close(fd)
    start_agent(run)
    # 1. a 255-byte name that is not DICOM: quarantined, released, quarantined again.
    run.drop(long_bad, b"not dicom at all" * 10)
    wait_until(
        lambda: len([r for r in _quarantine_reasons(run) if r != "path_too_long"]) == 1,
        30,
        what="quarantined",
    )
    entries = [
        e.name
        for e in (run.state / "quarantine").iterdir()
        if json.loads((e / "reason.json").read_text())["reason"] != "path_too_long"
    ]
    released = cli(run, "retry", "--quarantine", *entries)
    # 2. the same 255-byte name archived twice (two versions one after the other).
    run.drop(long_ok, inputs.data["v1"])
    wait_until(lambda: inputs.expected["v1"] in run.delivered_uids(), 30, what="v1")
    run.drop(long_ok, inputs.data["v2"])
    both = _reached(lambda: inputs.expected["v2"] in run.delivered_uids(), 30)
    _reached(lambda: not (run.inbox / long_ok).exists(), 10)
    deep_seen = _reached(
        lambda: (
            "path_too_long" in _quarantine_reasons(run)
            or inputs.expected["deep"] in run.delivered_uids()
        ),
        30,
    )
    status = status_json(run)
    run.agent.stop()
    archived = [p for p in (tmp_path / "archive").rglob("*") if p.is_file()]
    figures = {
        "retry_exit": released.returncode,
        "retry_traceback": "Traceback" in released.stderr,
        "name_on_terminal": "xxxxxxxx" in released.stdout + released.stderr,
        "archived": len(archived),
        "long_name_left_in_inbox": (run.inbox / long_ok).exists(),
        "deep_file_accounted": deep_seen,
        "quarantine_reasons": sorted(_quarantine_reasons(run)),
    }
    record_figures("long_names", figures)
    assert released.returncode == 0, released.stderr[-2000:]
    assert not figures["retry_traceback"] and not figures["name_on_terminal"], figures
    assert both and not figures["long_name_left_in_inbox"] and len(archived) == 2, figures
    assert deep_seen, (figures, status["inbox"])
    assert_no_phi("long_names", phi_audit(run))
