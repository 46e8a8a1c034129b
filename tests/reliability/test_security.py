"""Security: TLS verified by default, no credential leaks, no Authorization across hosts,
no escape from the inbox through symlinks, private modes for state files."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway_agent._exceptions import PermanentUploadError, RetryableUploadError, UploadError
from gateway_agent.agent.outbox.db import OutboxRow
from gateway_agent.agent.upload.destinations import destination_from_settings
from gateway_agent.config import DestinationSettings
from gateway_agent.synthetic import make_ct_slice
from tests._tls import self_signed

from ._harness import http_server, record_figures, wait_until

pytestmark = pytest.mark.reliability

PASSWORD = "pw-Zq8xK2-never-print"
RACES = 20
TOKEN = "tok-Hv41-never-print"


def _row(tmp_path: Path) -> OutboxRow:
    ds = make_ct_slice(rows=16, cols=16, plant_phi=False)
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    return OutboxRow(
        id=1,
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        path=path,
        size=path.stat().st_size,
        state="sending",
        attempts=0,
        next_attempt_at=0.0,
        last_error=None,
        created_at=0.0,
        sent_at=None,
    )


def _assert_no_secret(*texts: object) -> None:
    for text in texts:
        s = str(text)
        for secret in (PASSWORD, TOKEN, base64.b64encode(f"edge:{PASSWORD}".encode()).decode()):
            assert secret not in s, f"credential leaked into: {s[:200]}"


def _loopback_alias_works(host: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- TLS


def test_tls_self_signed_refused_by_default_then_accepted_with_ca_bundle(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "tls")
    row = _row(tmp_path)
    with http_server(tls=(cert, key)) as (url, rec), capture_logs() as logs:
        base = url + "/dicom-web"
        default = destination_from_settings(
            DestinationSettings(
                kind="dicomweb", url=base, auth="basic", username="edge", password=PASSWORD
            )
        )
        assert DestinationSettings(kind="dicomweb", url=base).verify_tls is True
        try:
            with pytest.raises(RetryableUploadError) as refused:
                default.send([row])
        finally:
            default.close()
        assert "SSL" in str(refused.value) or "network_error" in str(refused.value)
        assert rec.requests == [], "the request (and its credentials) went out over bad TLS"

        trusted = destination_from_settings(
            DestinationSettings(
                kind="dicomweb",
                url=base,
                auth="basic",
                username="edge",
                password=PASSWORD,
                ca_bundle=cert,
            )
        )
        try:
            trusted.send([row])
        finally:
            trusted.close()
        assert len(rec.requests) == 1
        assert rec.requests[0][2]["authorization"].startswith("Basic ")
    _assert_no_secret(refused.value, repr(refused.value), logs)


def test_tls_certificate_for_another_host_refused_even_with_ca(tmp_path: Path) -> None:
    if not _loopback_alias_works("127.0.0.2"):
        pytest.skip("127.0.0.2 is not routable here")
    cert, key = self_signed(tmp_path / "tls", host="127.0.0.1")
    with http_server("127.0.0.2", tls=(cert, key)) as (url, rec):
        dest = destination_from_settings(
            DestinationSettings(kind="dicomweb", url=url + "/dicom-web", ca_bundle=cert)
        )
        try:
            with pytest.raises(RetryableUploadError):
                dest.send([_row(tmp_path)])
        finally:
            dest.close()
        assert rec.requests == []


# --------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("auth", ["basic", "bearer"])
@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_redirect_to_another_host_does_not_carry_authorization(
    tmp_path: Path, code: int, auth: str
) -> None:
    other = "127.0.0.2" if _loopback_alias_works("127.0.0.2") else "localhost"
    with http_server(other) as (other_url, other_rec):

        def redirect(_m: str, path: str) -> tuple[int, dict[str, str], bytes]:
            return code, {"Location": other_url + path}, b""

        with http_server(reply=redirect) as (url, rec), capture_logs() as logs:
            settings = DestinationSettings(
                kind="dicomweb",
                url=url + "/dicom-web",
                auth=auth,  # type: ignore[arg-type]
                username="edge",
                password=PASSWORD,
                token=TOKEN,
            )
            dest = destination_from_settings(settings)
            try:
                with pytest.raises(UploadError) as err:
                    dest.send([_row(tmp_path)])
            finally:
                dest.close()
        assert len(rec.requests) == 1
        assert "authorization" in rec.requests[0][2]
        carried = [h for _m, _p, h in other_rec.requests if "authorization" in h]
        assert carried == [], "Authorization was sent to another host after a redirect"
        assert isinstance(err.value, PermanentUploadError)
        _assert_no_secret(err.value, logs)


# --------------------------------------------------------------------------- credentials


def test_credentials_not_in_errors_or_logs_on_401_and_network_failure(tmp_path: Path) -> None:
    def unauthorized(_m: str, _p: str) -> tuple[int, dict[str, str], bytes]:
        return 401, {"WWW-Authenticate": 'Basic realm="x"'}, b""

    row = _row(tmp_path)
    with http_server(reply=unauthorized) as (url, _rec), capture_logs() as logs:
        dest = destination_from_settings(
            DestinationSettings(
                kind="dicomweb", url=url + "/dicom-web", auth="basic", username="edge",
                password=PASSWORD,
            )
        )  # fmt: skip
        try:
            with pytest.raises(PermanentUploadError) as denied:
                dest.send([row])
        finally:
            dest.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dest = destination_from_settings(
        DestinationSettings(
            kind="dicomweb", url=f"http://127.0.0.1:{dead_port}/dicom-web", auth="bearer",
            token=TOKEN,
        )
    )  # fmt: skip
    try:
        with pytest.raises(RetryableUploadError) as refused:
            dest.send([row])
    finally:
        dest.close()
    assert denied.value.status == 401
    _assert_no_secret(denied.value, repr(denied.value), refused.value, repr(dest), logs)


@pytest.mark.parametrize("action", ["show", "check"])
@pytest.mark.parametrize("userinfo", [False, True])
def test_config_show_never_prints_credentials(tmp_path: Path, action: str, userinfo: bool) -> None:
    cfg = tmp_path / "config.toml"
    host = f"edge:{PASSWORD}@127.0.0.1:1" if userinfo else "127.0.0.1:1"
    cfg.write_text(
        f'[destination]\nkind = "dicomweb"\nurl = "https://{host}/dicom-web"\n'
        f'auth = "basic"\nusername = "edge"\npassword = "{PASSWORD}"\n'
    )
    env = dict(os.environ, GATEWAY_DESTINATION__TOKEN=TOKEN)
    out = subprocess.run(
        [sys.executable, "-m", "gateway_agent", "--config", str(cfg), "config", action],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    if out.returncode != 0 and "invalid choice" in out.stderr:
        pytest.skip("gateway-agent config show is not there yet")
    _assert_no_secret(out.stdout, out.stderr)
    if userinfo:  # credentials in the URL are refused, without echoing them
        assert out.returncode == 2
        assert "must not carry credentials" in out.stderr
    elif action == "show":
        assert out.returncode == 0, out.stderr
        assert "edge" in out.stdout  # the non-secret part is shown


# --------------------------------------------------------------------------- file modes


def _others_can_read(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IRGRP | stat.S_IWGRP))


def test_outbox_database_private(tmp_path: Path) -> None:
    from gateway_agent.agent.outbox.store import Outbox

    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "state" / "outbox.db")
        box.add(
            sop_instance_uid="1.2.3",
            study_instance_uid="1.2",
            series_instance_uid="1.2.3.4",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            path=tmp_path / "x.dcm",
            size=1,
            audit={},
        )
        files = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("outbox.db")]
        assert {p.name for p in files} >= {"outbox.db", "outbox.db-wal"}
        for p in files:
            assert not _others_can_read(p), f"{p.name} is {oct(p.stat().st_mode)}"
        box.close()
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- the running agent


def _victim(directory: Path, seed: str) -> tuple[Path, bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    ds = make_ct_slice(study_seed=seed, rows=16, cols=16)
    path = directory / f"{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, path.read_bytes()


def test_symlinks_and_specials_in_the_inbox_cannot_reach_outside(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    victim, victim_bytes = _victim(outside, "victim-file")
    victim_dir_file, victim_dir_bytes = _victim(outside / "dir", "victim-dir")
    run = agent_run()
    engine = run.engine()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    forbidden = {
        engine.deidentify_file(victim, scratch).sop_instance_uid,
        engine.deidentify_file(victim_dir_file, scratch).sop_instance_uid,
    }
    legit, _ = _victim(run.staging, "legit")
    legit_uid = engine.deidentify_file(legit, scratch).sop_instance_uid

    inbox = run.inbox
    (inbox / "link.dcm").symlink_to(victim)
    (inbox / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    (inbox / "sub").mkdir()
    (inbox / "sub" / "up.dcm").symlink_to("../../outside/victim-file.dcm")
    (inbox / "loop-a.dcm").symlink_to(inbox / "loop-b.dcm")
    (inbox / "loop-b.dcm").symlink_to(inbox / "loop-a.dcm")
    (inbox / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    os.mkfifo(inbox / "fifo.dcm")
    run.start()
    try:
        # Swap races: a file written in place, replaced by a symlink to the victim at once.
        for i in range(RACES):
            target = inbox / f"race{i}.dcm"
            target.write_bytes(legit.read_bytes())
            tmp_link = inbox / f".race{i}.tmp"
            tmp_link.symlink_to(victim)
            os.replace(tmp_link, target)
        run.drop("real/legit.dcm", legit.read_bytes())
        wait_until(lambda: legit_uid in run.delivered_uids(), timeout=60, what="the legit file")
        time.sleep(3)  # settle time several times over: give any wrong move time to happen
        assert run.agent.alive()
    finally:
        rc = run.agent.stop()
    assert victim.read_bytes() == victim_bytes
    assert victim_dir_file.read_bytes() == victim_dir_bytes
    leaked = forbidden & run.delivered_uids()
    victim_hashes = {hashlib.sha256(b).hexdigest() for b in (victim_bytes, victim_dir_bytes)}
    quarantined_victims = set(run.quarantined()) & victim_hashes
    assert not leaked, f"a file outside the inbox was read and sent ({RACES} swap races)"
    assert not quarantined_victims
    assert (inbox / "linkdir").is_symlink() and (outside / "dir").is_dir()
    assert rc == 0


def test_state_not_readable_by_other_users(agent_run) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("needs root to try the files as another user")
    # A world-traversable root (pytest's own base folder is 0700, which would hide everything).
    root = Path(tempfile.mkdtemp(prefix="gw-modes-"))
    root.chmod(0o755)
    old = os.umask(0o022)  # a typical service umask: the agent must not rely on a strict one
    try:
        run = agent_run(root)
        legit, _ = _victim(run.staging, "modes")
        run.drop("a.dcm", legit.read_bytes())
        run.drop("bad.dcm", b"not dicom at all")
        run.start()
        wait_until(lambda: not run.inbox_files() and bool(run.delivered_uids()), 60, what="intake")
        rc = run.agent.stop()
        assert rc == 0
        state = run.state
        files = [p for p in state.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"secret.key", "outbox.db"} <= names, names
        state_mode = oct(state.stat().st_mode & 0o777)
        loose = [
            f"{p.relative_to(root)} {oct(p.stat().st_mode & 0o777)}"
            for p in [state, *files, *(d for d in state.rglob("*") if d.is_dir())]
            if _others_can_read(p)
        ]
        # For real: as user nobody, try to read every state file.
        probe = 'for f; do cat "$f" >/dev/null 2>&1 && echo "$f"; done; exit 0'
        out = subprocess.run(
            ["/bin/sh", "-c", probe, "sh", *map(str, files)],
            user=65534,
            group=65534,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        # Sanity: nobody can read a world-readable file at the same place.
        control = root / "control.txt"
        control.write_text("x")
        control.chmod(0o644)
        ctl = subprocess.run(
            ["/bin/cat", str(control)], user=65534, group=65534, capture_output=True, timeout=60
        )
        assert ctl.returncode == 0, "the probe itself cannot read anything: test is vacuous"
    finally:
        os.umask(old)
        shutil.rmtree(root, ignore_errors=True)
    opened = out.stdout.split()
    record_figures(
        "security_modes",
        {
            "state_files": len(files),
            "nobody_could_read": len(opened),
            "state_dir_mode": state_mode,
            "loose_modes": loose,
        },
    )
    assert opened == [], f"user nobody could read: {opened}"


# --------------------------------------------------------------------------- logs


def test_logged_exception_does_not_print_local_values() -> None:
    import io
    import logging

    import structlog

    from gateway_agent import logs

    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    saved_structlog = structlog.get_config()
    try:
        logs.configure("json", "info", stream=stream)
        inbox_name = "PHIDOE_PHIJANE_0001.dcm"  # a local, as in intake._finish
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logs.get_logger().exception("intake_commit_failed", file=logs.short_hash(inbox_name))
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        structlog.configure(**saved_structlog)
    text = stream.getvalue()
    assert "intake_commit_failed" in text
    assert "PHIDOE" not in text, "a local variable's value reached the log"
