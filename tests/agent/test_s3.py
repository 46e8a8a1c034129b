"""The S3 destination against a real S3-compatible store (SeaweedFS on 127.0.0.1): objects read
back byte for byte, checksums sent and verified, multipart, refusals and outages."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from structlog.testing import capture_logs

from gateway_agent._exceptions import PermanentUploadError, RetryableUploadError
from gateway_agent.agent.outbox.db import OutboxRow
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations import destination_from_settings
from gateway_agent.agent.upload.destinations.s3 import (
    S3Destination,
    s3_from_settings,
    translate_boto_error,
)
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.config import DestinationSettings
from tests._faultproxy import FaultProxy
from tests._s3 import ACCESS_KEY, SECRET_KEY, S3Server, s3_server, start_s3

from ._agent_util import agent_command
from ._uploadkit import FakeClock, add_files, make_files, queued_outbox, wait_for

__all__ = ["s3_server"]  # the module-scoped store fixture

MB = 1024 * 1024


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credential from the machine, and never the instance metadata service (not loopback)."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def credentials_file(
    tmp_path: Path, secret: str = SECRET_KEY, key: str = ACCESS_KEY, name: str = "aws-credentials"
) -> Path:
    path = tmp_path / name
    path.write_text(f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    path.chmod(0o600)
    return path


def settings(server: S3Server, tmp_path: Path, **extra: Any) -> DestinationSettings:
    values: dict[str, Any] = {
        "name": "default",
        "kind": "s3",
        "bucket": "gateway",
        "prefix": f"t/{tmp_path.name}",
        "endpoint_url": server.endpoint,
        "aws_credentials_file": credentials_file(tmp_path),
        "timeout_seconds": 10,
        "confirm_storage": True,
        "backoff_base_seconds": 0.05,
        "backoff_cap_seconds": 0.5,
    }
    values.update(extra)
    return DestinationSettings(**values)


@pytest.fixture
def rows(tmp_path: Path) -> Iterator[list[OutboxRow]]:
    ob = Outbox(":memory:")
    add_files(ob, make_files(tmp_path / "files", 6))
    yield ob.queue("default").claim(max_items=100, max_bytes=10**9, lease_seconds=60)
    ob.close()


def _key(s: DestinationSettings, row: OutboxRow) -> str:
    return (
        f"{s.prefix}/{row.study_instance_uid}/{row.series_instance_uid}/{row.sop_instance_uid}.dcm"
    )


# -- objects, checksums, confirmation -----------------------------------------------------------
def test_series_read_back_byte_for_byte_and_confirmed(
    s3_server: S3Server, tmp_path: Path, rows: list[OutboxRow]
) -> None:
    s = settings(s3_server, tmp_path)
    dest = destination_from_settings(s)
    assert isinstance(dest, S3Destination)
    assert dest.label == f"s3:gateway/{s.prefix}@127.0.0.1:{s3_server.port}"
    assert s.target == f"s3 s3://gateway/{s.prefix} at {s3_server.endpoint}"
    try:
        result = dest.send(rows)
        assert sorted(result.sent) == sorted(r.sop_instance_uid for r in rows)
        assert not result.failed
        stored = s3_server.objects(prefix=s.prefix + "/")
        assert stored == {_key(s, r): r.path.read_bytes() for r in rows}
        client = s3_server.client()
        head = client.head_object(Bucket="gateway", Key=_key(s, rows[0]), ChecksumMode="ENABLED")
        data = rows[0].path.read_bytes()
        assert head["ContentType"] == "application/dicom"
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
        assert dest.confirm(rows) == {r.sop_instance_uid for r in rows}

        # The same instances again: the same keys, the same bytes (idempotent).
        again = dest.send(rows)
        assert sorted(again.sent) == sorted(result.sent)
        assert s3_server.objects(prefix=s.prefix + "/") == stored

        # An object replaced behind the agent's back, or gone, is not proven.
        client.put_object(Bucket="gateway", Key=_key(s, rows[1]), Body=b"other bytes")
        client.delete_object(Bucket="gateway", Key=_key(s, rows[2]))
        assert dest.confirm(rows) == {r.sop_instance_uid for r in rows} - {
            rows[1].sop_instance_uid,
            rows[2].sop_instance_uid,
        }
        client.close()
    finally:
        dest.close()


def test_confirm_after_restart_reads_the_file_again(
    s3_server: S3Server, tmp_path: Path, rows: list[OutboxRow]
) -> None:
    s = settings(s3_server, tmp_path)
    first = s3_from_settings(s)
    first.send(rows)
    first.close()
    later = s3_from_settings(s)  # nothing remembered: the check reads the outbox files
    assert later.confirm(rows) == {r.sop_instance_uid for r in rows}
    assert (
        s3_from_settings(settings(s3_server, tmp_path, confirm_storage=False)).confirm(rows) is None
    )
    later.close()


@pytest.mark.parametrize("checksum", ["sha256", "md5"])
def test_multipart_parts_carry_checksums(
    s3_server: S3Server, tmp_path: Path, checksum: str
) -> None:
    s = settings(
        s3_server, tmp_path, s3_checksum=checksum, multipart_threshold_mb=5, multipart_chunk_mb=5
    )
    big = tmp_path / "big.dcm"
    big.write_bytes(os.urandom(12 * MB + 12345))
    small = tmp_path / "small.dcm"
    small.write_bytes(os.urandom(100_000))
    ob = Outbox(":memory:")
    for i, path in enumerate((big, small)):
        ob.add(
            sop_instance_uid=f"1.2.3.{i}",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.9",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            path=path,
            size=path.stat().st_size,
            audit={},
        )
    rows = ob.queue("default").claim(max_items=10, max_bytes=10**12, lease_seconds=60)
    dest = s3_from_settings(s)
    try:
        result = dest.send(rows)
        assert sorted(result.sent) == ["1.2.3.0", "1.2.3.1"] and not result.failed
        stored = s3_server.objects(prefix=s.prefix + "/")
        assert stored[_key(s, rows[0])] == big.read_bytes()
        assert stored[_key(s, rows[1])] == small.read_bytes()
        client = s3_server.client()
        head = client.head_object(Bucket="gateway", Key=_key(s, rows[0]), ChecksumMode="ENABLED")
        if checksum == "sha256":
            assert head["ChecksumSHA256"].endswith("-3")  # composite over three parts
        else:
            assert head["ETag"].strip('"').endswith("-3")
        assert client.list_multipart_uploads(Bucket="gateway").get("Uploads", []) == []
        client.close()
        assert dest.confirm(rows) == {"1.2.3.0", "1.2.3.1"}
    finally:
        dest.close()
        ob.close()


def test_server_side_encryption_and_storage_class(
    s3_server: S3Server, tmp_path: Path, rows: list[OutboxRow]
) -> None:
    s = settings(s3_server, tmp_path, server_side_encryption="AES256")
    dest = s3_from_settings(s)
    assert sorted(dest.send(rows[:2]).sent) == sorted(r.sop_instance_uid for r in rows[:2])
    client = s3_server.client()
    head = client.head_object(Bucket="gateway", Key=_key(s, rows[0]))
    assert head["ServerSideEncryption"] == "AES256"
    assert (
        client.get_object(Bucket="gateway", Key=_key(s, rows[0]))["Body"].read()
        == rows[0].path.read_bytes()
    )
    client.close()
    assert dest.confirm(rows[:2]) == {r.sop_instance_uid for r in rows[:2]}
    dest.close()


def test_incomplete_upload_of_the_key_is_aborted_before_sending_again(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """What a kill -9 in the middle of a multipart upload leaves is cleaned up by the next try."""
    s = settings(s3_server, tmp_path, multipart_threshold_mb=5, multipart_chunk_mb=5)
    path = tmp_path / "big.dcm"
    path.write_bytes(os.urandom(11 * MB))
    ob = Outbox(":memory:")
    ob.add(
        sop_instance_uid="1.2.4.1",
        study_instance_uid="1.2.4",
        series_instance_uid="1.2.4.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        path=path,
        size=path.stat().st_size,
        audit={},
    )
    (row,) = ob.queue("default").claim(max_items=1, max_bytes=10**12, lease_seconds=60)
    client = s3_server.client()
    left = client.create_multipart_upload(Bucket="gateway", Key=_key(s, row))["UploadId"]
    client.upload_part(
        Bucket="gateway", Key=_key(s, row), UploadId=left, PartNumber=1, Body=b"x" * (5 * MB)
    )
    dest = s3_from_settings(s)
    assert dest.send([row]).sent == ["1.2.4.1"]
    uploads = client.list_multipart_uploads(Bucket="gateway", Prefix=_key(s, row))
    assert uploads.get("Uploads", []) == []
    assert s3_server.objects(prefix=_key(s, row))[_key(s, row)] == path.read_bytes()
    client.close()
    dest.close()
    ob.close()


def test_missing_file_and_bad_uid_fail_that_instance_only(
    s3_server: S3Server, tmp_path: Path, rows: list[OutboxRow]
) -> None:
    gone = rows[0]
    gone.path.unlink()
    weird = OutboxRow(
        999, "1.2.3.4/../../x", "1.2.3", "1.2.3.1", "1.2", rows[1].path, 10, "sending", 1, 0.0,
        None, 0.0, None,
    )  # fmt: skip
    dest = s3_from_settings(settings(s3_server, tmp_path))
    result = dest.send([gone, weird, *rows[1:]])
    assert result.failed[gone.sop_instance_uid] == (True, "file_missing")
    assert result.failed[weird.sop_instance_uid] == (True, "invalid_uid")
    assert sorted(result.sent) == sorted(r.sop_instance_uid for r in rows[1:])
    dest.close()


# -- refusals, a wrong address, outages ---------------------------------------------------------
def _uploader(ob: Outbox, s: DestinationSettings, clock: FakeClock | None = None) -> Uploader:
    kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
    return Uploader(ob, s3_from_settings(s), s, **kwargs)


def test_the_uploader_proves_each_object_by_head_before_its_file_may_go(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """Acknowledged objects await their proof (a HEAD comparing size and checksum); an object
    the store no longer holds is sent again, and only proven instances' files are removed."""
    ob = Outbox(tmp_path / "outbox.db")
    files = make_files(tmp_path / "files", 4)
    add_files(ob, files)
    s = settings(s3_server, tmp_path)
    up = _uploader(ob, s)
    try:
        assert up.loop_once() == 4  # one batch, acknowledged
        q = ob.queue("default")
        assert ob.proof_summary()["pending"][0] == 4
        assert ob.purge_sent_files(0) == 0 and all(p.exists() for p in files)
        (lost,) = [r for r in q.rows("sent") if r.path == files[0]]
        client = s3_server.client()
        client.delete_object(Bucket="gateway", Key=_key(s, lost))  # the store lost it
        client.close()
        assert up.loop_once() == 4  # nothing to send: the four are checked
        assert q.counts() == {"queued": 1, "sending": 0, "sent": 3, "dead": 0}
        assert q.rows("queued")[0].last_error == "not_stored_after_ack"
        assert ob.proof_summary()["pending"][0] == 0
        assert ob.purge_sent_files(0) == 3
        assert [p.exists() for p in files] == [True, False, False, False]
    finally:
        up.destination.close()
        ob.close()


def test_wrong_credentials_stop_the_destination_without_dead_rows(
    s3_server: S3Server, tmp_path: Path
) -> None:
    secret = "not-the-secret-0123456789"
    s = settings(
        s3_server, tmp_path, aws_credentials_file=credentials_file(tmp_path, secret, name="wrong")
    )
    ob, clock, _ = queued_outbox(tmp_path / "files", 3)
    up = _uploader(ob, s, clock)
    with capture_logs() as logs:
        for _ in range(5):
            up.loop_once()
            clock.advance(600)
    q = ob.queue("default")
    assert q.counts() == {"queued": 3, "sending": 0, "sent": 0, "dead": 0}
    status = q.destination_status()
    assert status["auth_failing"] is True
    assert status["last_error"] == "s3 SignatureDoesNotMatch (http_403)"
    assert secret not in str(status) and ACCESS_KEY not in str(status)
    assert any("SignatureDoesNotMatch" in str(e) for e in logs), logs  # the refusal is logged...
    assert secret not in str(logs) and ACCESS_KEY not in str(logs)  # ...without the credentials
    assert all(r.attempts == 0 for r in q.rows())  # refusals never burn attempts
    up.destination.close()
    ob.close()


def test_missing_bucket_stops_the_destination_with_its_reason(
    s3_server: S3Server, tmp_path: Path
) -> None:
    ob, clock, _ = queued_outbox(tmp_path / "files", 3)
    s = settings(s3_server, tmp_path, bucket="no-such-bucket")
    up = _uploader(ob, s, clock)
    for _ in range(30):  # more than max_attempts would allow if they were burned
        up.loop_once()
        clock.advance(600)
    q = ob.queue("default")
    assert q.counts()["queued"] == 3 and q.counts()["dead"] == 0
    status = q.destination_status()
    assert status["last_error"] == "s3 NoSuchBucket (http_404)"
    assert status["auth_failing"] is False and status["consecutive_failures"] >= 1
    up.destination.close()
    ob.close()


def test_store_down_then_up_delivers_everything(tmp_path: Path) -> None:
    server = start_s3()
    try:
        ob = Outbox(tmp_path / "outbox.db")
        files = make_files(tmp_path / "files", 8)
        uids = add_files(ob, files)
        s = settings(server, tmp_path, timeout_seconds=2)
        server.stop()
        up = _uploader(ob, s)
        up.start()
        q = ob.queue("default")
        assert wait_for(lambda: q.destination_status()["consecutive_failures"] >= 2, 30)
        assert q.counts()["sent"] == 0 and q.counts()["dead"] == 0
        assert str(q.destination_status()["last_error"]).startswith("network_error")
        server.start()
        assert wait_for(lambda: q.counts()["sent"] == 8, 60), q.counts()
        up.stop(deadline=time.monotonic() + 10)
        stored = server.objects(prefix=s.prefix + "/")
        assert sorted(k.rsplit("/", 1)[1][: -len(".dcm")] for k in stored) == sorted(uids)
        up.destination.close()
        ob.close()
    finally:
        server.close()


def test_throttling_and_5xx_are_retried(s3_server: S3Server, tmp_path: Path) -> None:
    plan = ["503", "status:500", "status:429"]
    with FaultProxy(s3_server.endpoint, plan=plan, keep_host=True) as proxy:
        ob, clock, uids = queued_outbox(tmp_path / "files", 2)
        s = settings(s3_server, tmp_path, endpoint_url=proxy.url)
        up = _uploader(ob, s, clock)
        q = ob.queue("default")
        for _ in range(10):
            up.loop_once()
            clock.advance(600)
            if q.counts()["sent"] == 2:
                break
        assert q.counts()["sent"] == 2 and q.counts()["dead"] == 0
        assert proxy.count("503") == 1 and proxy.count("status:500") == 1
        assert {r.sop_instance_uid for r in q.rows("sent")} == set(uids)
        up.destination.close()
        ob.close()


@pytest.mark.parametrize("checksum", ["sha256", "md5"])
def test_bytes_damaged_in_transit_are_refused_and_sent_again(
    s3_server: S3Server, tmp_path: Path, checksum: str
) -> None:
    """One byte flipped on the way: the store refuses the object (the checksum does not match),
    the instance is retried on its own, and the object stored is the file's bytes."""
    with FaultProxy(s3_server.endpoint, plan=["corrupt"], keep_host=True) as proxy:
        clock = FakeClock()
        ob = Outbox(":memory:", clock=clock)
        files = make_files(tmp_path / "files", 2)
        add_files(ob, files)
        s = settings(s3_server, tmp_path, endpoint_url=proxy.url, s3_checksum=checksum)
        up = _uploader(ob, s, clock)
        q = ob.queue("default")
        errors: list[str] = []
        for _ in range(10):
            up.loop_once()
            errors += [str(r.last_error) for r in q.rows() if r.last_error]
            clock.advance(600)
            if q.counts()["sent"] == 2:
                break
        assert q.counts()["sent"] == 2 and q.counts()["dead"] == 0
        assert proxy.count("corrupt") == 1
        assert any(e.startswith("s3 ") for e in errors), errors  # the store's refusal, recorded
        assert q.destination_status()["auth_failing"] is False
        stored = s3_server.objects(prefix=s.prefix + "/")
        assert sorted(stored.values()) == sorted(f.read_bytes() for f in files)
        up.destination.close()
        ob.close()


def test_error_translation_never_carries_a_message() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": f"secret {SECRET_KEY} in a message"},
                "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}},
            },
            "PutObject",
        )

    cases = {
        ("AccessDenied", 403): (PermanentUploadError, 403),
        ("InvalidAccessKeyId", 403): (PermanentUploadError, 403),
        ("PermanentRedirect", 301): (PermanentUploadError, 301),
        ("NoSuchBucket", 404): (PermanentUploadError, 404),
        ("SlowDown", 503): (RetryableUploadError, 503),
        ("InternalError", 500): (RetryableUploadError, 500),
        ("RequestTimeout", 400): (RetryableUploadError, 400),
        ("BadDigest", 400): (RetryableUploadError, 400),
        ("EntityTooLarge", 400): (PermanentUploadError, 400),
    }
    for (code, status), (kind, mapped) in cases.items():
        err = translate_boto_error(client_error(code, status))
        assert isinstance(err, kind) and err.status == mapped, code
        assert SECRET_KEY not in str(err) and str(err).startswith(f"s3 {code}")
    network = translate_boto_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert isinstance(network, RetryableUploadError) and "127.0.0.1" not in str(network)
    none = translate_boto_error(NoCredentialsError())
    assert isinstance(none, PermanentUploadError) and none.status == 401
    assert translate_boto_error(ValueError("x")) is None


def test_credentials_from_the_environment(
    s3_server: S3Server, tmp_path: Path, rows: list[OutboxRow], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    s = settings(s3_server, tmp_path, aws_credentials_file=None)
    dest = s3_from_settings(s)
    assert sorted(dest.send(rows).sent) == sorted(r.sop_instance_uid for r in rows)
    dest.close()


# -- a 500 MB object: bounded memory ------------------------------------------------------------
_BIG_SCRIPT = """
import json, sys
from pathlib import Path
from gateway_agent.agent.outbox.db import OutboxRow
from gateway_agent.agent.upload.destinations.s3 import s3_from_settings
from gateway_agent.config import DestinationSettings

def hwm_kb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so this process would start
    # at the peak of the pytest worker that forked it.
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))

s = DestinationSettings.model_validate_json(sys.argv[1])
path = Path(sys.argv[2])
row = OutboxRow(1, "1.2.5.1", "1.2.5", "1.2.5.9", "1.2.840.10008.5.1.4.1.1.2", path,
                path.stat().st_size, "sending", 1, 0.0, None, 0.0, None)
dest = s3_from_settings(s)
before = hwm_kb()
result = dest.send([row])
proven = dest.confirm([row])
peak = hwm_kb()
print(json.dumps({"sent": result.sent, "failed": result.failed, "proven": sorted(proven or []),
                  "before_kb": before, "peak_kb": peak}))
"""


@pytest.mark.slow
def test_500_mb_object_in_parts_with_bounded_memory(tmp_path: Path) -> None:
    server = start_s3()
    try:
        big = tmp_path / "big.dcm"
        block = os.urandom(MB)
        digest = hashlib.sha256()
        with big.open("wb") as fh:
            for i in range(500):
                chunk = bytes([i % 256]) + block[1:]
                fh.write(chunk)
                digest.update(chunk)
        s = settings(server, tmp_path)
        proc = subprocess.run(
            [sys.executable, "-c", _BIG_SCRIPT, s.model_dump_json(), str(big)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout)
        assert out["sent"] == ["1.2.5.1"] and out["proven"] == ["1.2.5.1"]
        peak_mb = out["peak_kb"] / 1024
        print(f"\n500 MB object: peak RSS of the whole process {peak_mb:.0f} MB")
        # One 16 MB part in memory at a time (and the client's buffers), never the object: the
        # whole process (Python, boto3, pydicom) stays under half the object's size.
        assert peak_mb < 250, peak_mb
        client = server.client()
        key = f"{s.prefix}/1.2.5/1.2.5.9/1.2.5.1.dcm"
        body = client.get_object(Bucket="gateway", Key=key)["Body"]
        got = hashlib.sha256()
        size = 0
        for chunk in iter(lambda: body.read(4 * MB), b""):
            got.update(chunk)
            size += len(chunk)
        assert size == 500 * MB and got.hexdigest() == digest.hexdigest()
        client.close()
    finally:
        server.close()


def test_parallel_workers_share_one_client(s3_server: S3Server, tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "outbox.db")
    uids = add_files(ob, make_files(tmp_path / "files", 24))
    s = settings(s3_server, tmp_path, parallel_requests=4, batch_max_instances=3)
    up = _uploader(ob, s)
    up.start()
    q = ob.queue("default")
    assert wait_for(lambda: q.counts()["sent"] == 24, 60), q.counts()
    up.stop(deadline=time.monotonic() + 10)
    stored = s3_server.objects(prefix=s.prefix + "/")
    assert len(stored) == 24 and {k.rsplit("/", 1)[1][:-4] for k in stored} == set(uids)
    up.destination.close()
    ob.close()


# -- the command line: run --destination-s3 ----------------------------------------------------
def _agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "AWS_"))}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        **extra,
    )
    return env


def test_run_with_the_destination_s3_flag(s3_server: S3Server, tmp_path: Path) -> None:
    """`run --destination-s3 s3://BUCKET/PREFIX --s3-endpoint URL` with credentials from the
    environment delivers every instance under the prefix, and no credential reaches the log."""
    from gateway_agent.synthetic import make_ct_series, write_series

    inbox = tmp_path / "inbox"
    write_series(make_ct_series(3, rows=32, cols=32), inbox)
    prefix = f"flag/{tmp_path.name}"
    proc = subprocess.Popen(
        agent_command(
            inbox,
            tmp_path / "state",
            "--destination-s3",
            f"s3://gateway/{prefix}/",
            "--s3-endpoint",
            s3_server.endpoint,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_agent_env(tmp_path, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY),
    )
    try:
        assert wait_for(lambda: len(s3_server.objects(prefix=prefix + "/")) == 3, 120)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-2000:]
    started = next(json.loads(x) for x in out.splitlines() if '"agent_started"' in x)
    assert started["destinations"] == [f"default: s3 s3://gateway/{prefix} at {s3_server.endpoint}"]
    keys = list(s3_server.objects(prefix=prefix + "/"))
    assert all(len(k[len(prefix) + 1 :].split("/")) == 3 and k.endswith(".dcm") for k in keys)
    assert SECRET_KEY not in out and ACCESS_KEY not in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--s3-endpoint", "http://127.0.0.1:9"], "--s3-endpoint goes with --destination-s3"),
        (["--destination-s3", "gateway/prefix"], "--destination-s3: expected s3://BUCKET/PREFIX"),
        (
            ["--destination-s3", "s3://gateway/p", "--s3-endpoint", "ftp://127.0.0.1:9"],
            "endpoint_url must start with http:// or https://",
        ),
    ],
)
def test_run_with_a_wrong_s3_flag_exits_2_without_a_traceback(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway_agent",
            "run",
            "--inbox",
            str(tmp_path / "inbox"),
            "--state-dir",
            str(tmp_path / "state"),
            "--no-metrics",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_agent_env(tmp_path),
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert done.stderr.startswith("gateway-agent: ") and "Traceback" not in done.stderr


def test_status_names_what_stops_each_s3_destination(
    s3_server: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing bucket and refused credentials: each destination's own line in `status`, the
    third one delivers, no row dead, no credential printed."""
    from gateway_agent.agent.outbox.routing import Route
    from gateway_agent.cli import main

    wrong = "not-the-secret-0123456789"
    good, bad = credentials_file(tmp_path), credentials_file(tmp_path, wrong, name="wrong")
    entries = {
        "research": {"bucket": "no-such-bucket", "aws_credentials_file": good},
        "archive": {"bucket": "gateway", "aws_credentials_file": bad},
        "copy": {"bucket": "gateway", "aws_credentials_file": good},
    }
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(
        f'state_dir = "{state}"\n'
        + "".join(
            f'[[destinations]]\nname = "{name}"\nkind = "s3"\nbucket = "{e["bucket"]}"\n'
            f'prefix = "st/{tmp_path.name}/{name}"\nendpoint_url = "{s3_server.endpoint}"\n'
            f'aws_credentials_file = "{e["aws_credentials_file"]}"\n'
            for name, e in entries.items()
        )
    )
    clock = FakeClock()
    ob = Outbox(state / "outbox.db", clock=clock, routes=[Route(n) for n in entries])
    add_files(ob, make_files(tmp_path / "files", 3))
    uploaders = [
        _uploader(ob, settings(s3_server, tmp_path, name=name, prefix=f"st/{name}", **e), clock)
        for name, e in entries.items()
    ]
    for _ in range(3):
        for up in uploaders:
            up.loop_once()
        clock.advance(600)
    for up in uploaders:
        up.destination.close()
    ob.close()

    assert main(["--config", str(config), "status"]) == 0
    out = capsys.readouterr().out
    blocks = {b.split(":", 1)[0]: b for b in out.split("destination ")[1:]}
    assert "queued 3, sending 0, sent 0, dead 0" in blocks["research"]
    assert "s3 NoSuchBucket (http_404)" in blocks["research"]
    assert "NO SUCH BUCKET: create the bucket" in blocks["research"]
    assert "queued 3, sending 0, sent 0, dead 0" in blocks["archive"]
    assert "AUTHENTICATION FAILING" in blocks["archive"]
    assert "queued 0, sending 0, sent 3, dead 0" in blocks["copy"]
    assert "FAILING" not in blocks["copy"] and "NO SUCH" not in blocks["copy"]
    assert wrong not in out and SECRET_KEY not in out and ACCESS_KEY not in out
