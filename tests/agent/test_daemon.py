"""The daemon and its commands: SIGTERM exits 0 with nothing lost, status, retry, layout checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_agent._exceptions import ConfigError
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.service.daemon import Daemon
from gateway_agent.cli import main
from gateway_agent.cli.agent_cmds import collect_status
from gateway_agent.synthetic import make_ct_slice
from tests._orthanc import start_orthanc

from ._agent_util import (
    NAME_MARKER,
    agent_settings,
    dicomweb_overrides,
    files_under,
    running_daemon,
    sop_uid_of,
    wait_until,
    write_synthetic,
)


def _status(capsys: pytest.CaptureFixture[str], state: Path, *extra: str) -> Any:
    capsys.readouterr()
    assert main(["status", "--state-dir", str(state), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_sigterm_exits_zero_and_loses_nothing(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    src = tmp_path / "src"
    inputs = write_synthetic(src, 40, seed="term")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DISK__MIN_FREE_MB"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "gateway_agent",
        "run",
        "--inbox",
        str(settings.inbox),
        "--state-dir",
        str(settings.state_dir),
        "--destination-folder",
        str(settings.destination.folder),
        "--settle-seconds",
        "0.3",
        "--workers",
        "1",
        "--no-metrics",
    ]
    settings.inbox.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "agent.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=fh, stderr=fh)
        try:
            staged = tmp_path / "staged"
            src.rename(staged)
            staged.rename(settings.inbox / "study")
            assert wait_until(lambda: len(files_under(settings.destination.folder)) >= 3, 60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "agent_stopped" in text
    assert NAME_MARKER not in text
    # Nothing lost: each input is delivered, waiting in the outbox, or still in the inbox.
    delivered = len(files_under(settings.destination.folder))
    outbox = Outbox(settings.state_dir / "outbox.db")
    try:
        counts = outbox.counts()
    finally:
        outbox.close()
    assert counts["sending"] == 0, "in-flight rows are released on SIGTERM"
    left = len(files_under(settings.inbox))
    assert counts["sent"] == delivered
    assert counts["sent"] + counts["queued"] + left == len(inputs)
    # ... and a restart finishes the job.
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
    assert len(files_under(settings.destination.folder)) == len(inputs)


def test_in_process_stop_releases_and_restart_delivers(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    write_synthetic(tmp_path / "inbox" / "s", 10, seed="restart")
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
        assert d.threads_alive() == {"watcher": True, "intake": True, "uploader:default": True}
    assert len(files_under(settings.destination.folder)) == 10
    assert (settings.state_dir / "secret.key").stat().st_mode & 0o077 == 0
    assert settings.state_dir.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("inside", ["state_dir", "destination.folder", "archive_dir"])
def test_layouts_that_would_ingest_own_output_are_refused(tmp_path: Path, inside: str) -> None:
    over: dict[str, Any] = {inside: tmp_path / "inbox" / "x"}
    if inside == "archive_dir":
        over["originals"] = "archive"
    d = Daemon(agent_settings(tmp_path, **over))
    with pytest.raises(ConfigError, match="inbox"):
        d.start()
    d.stop()


def test_status_and_retry_quarantine_after_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A burned-in image is quarantined; after allowing it, `retry --quarantine` delivers it."""
    settings = agent_settings(tmp_path, **{"deid.burned_in": "quarantine"})
    ds = make_ct_slice(rows=32, cols=32, study_seed="burned")
    ds.BurnedInAnnotation = "YES"
    settings.inbox.mkdir(parents=True, exist_ok=True)
    ds.save_as(settings.inbox / f"{NAME_MARKER}.dcm", enforce_file_format=True)
    (settings.inbox / "junk.dcm").write_bytes(b"\0" * 300)
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 30)

    st = _status(capsys, settings.state_dir)
    assert st["quarantine"]["count"] == 2
    reasons = st["quarantine"]["by_reason"]
    assert reasons.get("burned_in_annotation") == 1, reasons
    assert NAME_MARKER not in json.dumps(st)
    capsys.readouterr()
    assert main(["status", "--state-dir", str(settings.state_dir)]) == 0
    text = capsys.readouterr().out
    assert "quarantine: 2 file(s)" in text and "burned_in_annotation" in text
    assert NAME_MARKER not in text

    assert (
        main(
            [
                "retry",
                "--quarantine",
                "--reason",
                "burned_in_annotation",
                "--state-dir",
                str(settings.state_dir),
                "--inbox",
                str(settings.inbox),
            ]
        )
        == 0
    )
    assert "released 1" in capsys.readouterr().out
    assert len(files_under(settings.inbox)) == 1
    allowed = agent_settings(tmp_path, **{"deid.burned_in": "allow"})
    with running_daemon(allowed) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 30)
    assert len(files_under(settings.destination.folder)) == 1
    st = _status(capsys, settings.state_dir)
    assert st["quarantine"]["by_reason"] == {"not_dicom": 1} or st["quarantine"]["count"] == 1
    assert st["outbox"]["counts"]["sent"] == 1
    assert st["outbox"]["sent_last_hour"] == 1


def test_retry_dead_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = agent_settings(tmp_path)
    write_synthetic(settings.inbox / "s", 3, seed="dead")
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 30)
    outbox = Outbox(settings.state_dir / "outbox.db")
    try:
        rows = outbox.rows("sent")
        # Pretend the destination refused two of them for good.
        for r in rows[:2]:
            outbox._conn.execute(
                "update deliveries set state = 'dead', last_error = 'http 400: rejected'"
                " where instance_id = ?",
                (r.id,),
            )
        victim = rows[0]
    finally:
        outbox.close()
    st = _status(capsys, settings.state_dir)
    assert st["outbox"]["counts"]["dead"] == 2
    assert {r["id"] for r in st["outbox"]["dead_latest"]} == {rows[0].id, rows[1].id}
    assert main(["retry", "--dead", str(victim.id), "--state-dir", str(settings.state_dir)]) == 0
    assert "requeued 1 dead delivery" in capsys.readouterr().out
    assert main(["retry", "--state-dir", str(settings.state_dir)]) == 0
    assert "requeued 1 dead delivery" in capsys.readouterr().out
    st = _status(capsys, settings.state_dir)
    assert st["outbox"]["counts"] == {"queued": 2, "sending": 0, "sent": 1, "dead": 0}
    with running_daemon(settings) as d:
        assert wait_until(d.drained, 30)
        assert d.outbox.counts()["sent"] == 3


def test_status_without_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-dir", str(tmp_path / "nothing")]) == 0
    out = capsys.readouterr().out
    assert "outbox: empty" in out and "quarantine: 0 file(s)" in out


@pytest.mark.orthanc
@pytest.mark.slow
def test_wrong_credentials_wait_then_retry_delivers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_orthanc()
    try:
        over = dicomweb_overrides(server)
        wrong = agent_settings(
            tmp_path,
            **{
                **over,
                "destination.password": "not-the-password",
                "destination.backoff_base_seconds": 0.5,
                "destination.backoff_cap_seconds": 5.0,
            },
        )
        write_synthetic(wrong.inbox / "s", 5, seed="creds")
        with running_daemon(wrong) as d:
            assert wait_until(lambda: not files_under(wrong.inbox) and d.intake.idle(), 30)
            assert wait_until(
                lambda: d.outbox.queue("default").destination_status()["auth_failing"], 30
            )
            time.sleep(3.0)
            status = d.outbox.queue("default").destination_status()
            counts = d.outbox.counts()
        # Backing off like an outage: a handful of probes, not a tight loop.
        assert status["consecutive_failures"] < 15
        # They wait (one of them may be out as the probe at this moment); none was delivered.
        assert counts["queued"] + counts["sending"] == 5 and counts["sent"] == 0, counts
        capsys.readouterr()
        assert main(["status", "--state-dir", str(wrong.state_dir)]) == 0
        assert "AUTHENTICATION FAILING" in capsys.readouterr().out
        assert server.count_instances() == 0

        fixed = agent_settings(tmp_path, **over)
        assert main(["retry", "--state-dir", str(fixed.state_dir)]) == 0
        with running_daemon(fixed) as d:
            assert wait_until(lambda: server.count_instances() == 5, 60)
            assert wait_until(d.drained, 30)
        uids = {sop_uid_of(p) for p in files_under(fixed.state_dir / "outbox")}
        assert all(server.lookup(u) for u in uids)
    finally:
        server.close()


def test_status_counts_what_waits_in_the_inbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file the agent has not taken (stuck, deferred, or the agent down) is visible in
    `status`, with its age; hidden, temporary and symlinked names are not counted."""
    settings = agent_settings(tmp_path)
    paths = write_synthetic(settings.inbox / "study", 3, seed="waiting")
    old = time.time() - 3 * 3600
    os.utime(paths[0], (old, old))
    (settings.inbox / ".hidden.dcm").write_bytes(b"x")
    (settings.inbox / "copying.dcm.partial").write_bytes(b"x")
    (settings.inbox / "link.dcm").symlink_to(paths[1])
    st = collect_status(settings)
    assert st["inbox"]["waiting"] == 3
    assert 3 * 3600 - 60 < st["inbox"]["oldest_seconds"] < 3 * 3600 + 60
    argv = ["status", "--state-dir", str(settings.state_dir), "--inbox", str(settings.inbox)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "inbox: 3 file(s) not taken yet, oldest 3.0 h" in out
    assert "intake_deferred" in out  # the hint for files that stay
    with running_daemon(settings):
        assert wait_until(lambda: collect_status(settings)["inbox"]["waiting"] == 0, 30)
    assert main(argv) == 0
    assert "inbox: empty" in capsys.readouterr().out
