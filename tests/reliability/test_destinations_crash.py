"""Crash with several destinations: kill -9 at seeded random instants while the agent delivers to a
real Orthanc (DICOMweb) and a real S3 store (SeaweedFS), one of them with a routing rule; and
kill -9 in the middle of multipart uploads of large objects.

Figures per destination: lost instances, duplicated instances (at Orthanc: stored twice; at the
store: an object whose bytes are not the instance's), instances delivered where no rule sends
them, originals lost, temporaries left.
"""

from __future__ import annotations

import collections
import hashlib
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._faultproxy import FaultProxy
from tests._s3 import ACCESS_KEY, SECRET_KEY, S3Server, start_s3

from ._harness import AgentRun, assert_no_phi, phi_audit, reached, record_figures, size
from .test_crash import Feeder

pytestmark = [pytest.mark.reliability, pytest.mark.orthanc, pytest.mark.slow]

SEED = 20261205


@pytest.fixture
def s3() -> Iterator[S3Server]:
    with start_s3() as server:
        yield server


def _credentials(run_root: Path) -> Path:
    path = run_root / "aws-credentials"
    path.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    path.chmod(0o600)
    return path


def _secret(run_root: Path, value: str) -> Path:
    path = run_root / "pacs-password"
    path.write_text(value)
    path.chmod(0o600)
    return path


def make_inputs(run: AgentRun, n: int, *, rows: int = 48) -> dict[str, tuple[str, str]]:
    """``n`` staged files in folders ``s000``, ``s001``... (40 each); name -> (output SOP UID,
    SHA-256 of the de-identified bytes), computed with the agent's own engine."""
    engine = run.engine()
    scratch = run.root / "expected"
    scratch.mkdir()
    expected: dict[str, tuple[str, str]] = {}
    for i in range(n):
        name = f"s{i // 40:03d}/PHIDOE_IMG{i:05d}.dcm"
        path = run.stage_ct(name, i, study=f"routes-study-{i // 40}", rows=rows)
        out = engine.deidentify_file(path, scratch)
        expected[name] = (
            out.sop_instance_uid,
            hashlib.sha256(Path(out.path).read_bytes()).hexdigest(),
        )
        Path(out.path).unlink()
    shutil.rmtree(scratch)
    return expected


def _s3_objects(s3: S3Server, prefix: str) -> dict[str, str]:
    """SOP UID -> SHA-256 of the object's bytes, for every object under ``prefix``."""
    return {
        key.rsplit("/", 1)[1][: -len(".dcm")]: hashlib.sha256(data).hexdigest()
        for key, data in s3.objects(prefix=prefix).items()
    }


def _kill_loop(run: AgentRun, rng: random.Random, n_kills: int) -> None:
    for k in range(n_kills):
        time.sleep(rng.uniform(0.05, 0.6) if k % 4 == 1 else rng.uniform(0.6, 2.5))
        run.sample()
        run.agent.kill9()
        run.start()


def _drained(run: AgentRun) -> bool:
    run.sample()
    rows = run.delivery_rows()
    return not run.inbox_files() and all(state in ("sent", "dead") for _, state, *_ in rows)


def test_kill9_with_two_destinations(
    tmp_path: Path, orthanc: Any, s3: S3Server, agent_run: Any
) -> None:
    n_kills, n_files = size(6, 40), size(160, 800)
    rng = random.Random(SEED)
    run = agent_run(
        destinations=[
            {
                "name": "pacs",
                "kind": "dicomweb",
                "url": orthanc.dicomweb_url,
                "auth": "basic",
                "username": orthanc.auth[0],
                "password_file": str(_secret(tmp_path, orthanc.auth[1])),
                "timeout_seconds": 10.0,
                "batch_max_instances": 10,
                "backoff_base_seconds": 0.2,
                "backoff_cap_seconds": 2.0,
            },
            {
                "name": "research",
                "kind": "s3",
                "bucket": "gateway",
                "prefix": "research",
                "endpoint_url": s3.endpoint,
                "aws_credentials_file": str(_credentials(tmp_path)),
                "timeout_seconds": 10.0,
                "batch_max_instances": 10,
                "backoff_base_seconds": 0.2,
                "backoff_cap_seconds": 2.0,
                # Half the folders: a rule decides, under kills too.
                "match": {"inbox_folder": ["s000", "s002", "s004", "s006", "s008"]},
            },
        ],
        env={"AWS_EC2_METADATA_DISABLED": "true"},
    )
    expected = make_inputs(run, n_files)
    routed = {
        uid: digest
        for name, (uid, digest) in expected.items()
        if name.split("/", 1)[0] in {"s000", "s002", "s004", "s006", "s008"}
    }
    feeder = Feeder(run, sorted(expected), random.Random(SEED + 1), duration=n_kills * 1.4)
    run.start()
    feeder.start()
    try:
        _kill_loop(run, rng, n_kills)
        feeder.join(timeout=600)
        assert feeder.fed == n_files
        drained = reached(lambda: _drained(run), timeout=size(300, 1500))
        metrics = run.metrics_text()
        assert run.agent.alive(), "the agent died on its own"
    finally:
        feeder.stop_event.set()
        rc = run.agent.stop()
    want = {uid for uid, _ in expected.values()}
    at_pacs = collections.Counter(orthanc.sop_uids())
    at_s3 = _s3_objects(s3, "research/")
    rows = run.delivery_rows()
    by_dest: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for sop, state, _path, _size, dest in rows:
        by_dest[dest][sop] = state
    originals_lost = [
        name
        for name, (sop, _) in expected.items()
        if not (run.inbox / name).exists()
        and not (run.staging / name).exists()
        and sop not in by_dest["pacs"]
    ]
    figures = {
        "kills": n_kills,
        "files": n_files,
        "pacs_lost": len(want - set(at_pacs)),
        "pacs_duplicated": sum(c - 1 for c in at_pacs.values()) + len(set(at_pacs) - want),
        "research_lost": len(set(routed) - set(at_s3)),
        "research_wrong_bytes": sum(1 for u, d in at_s3.items() if routed.get(u) != d),
        "research_unrouted_delivered": len(set(at_s3) - set(routed)),
        "deliveries": {d: len(v) for d, v in by_dest.items()},
        "dead": sum(1 for _, s, *_ in rows if s == "dead"),
        "originals_lost": len(originals_lost),
        "temp_left": len(run.temp_files()),
        "orphan_workers": run.agent.orphans,
        "final_exit": rc,
        "drained": drained,
    }
    record_figures("crash_two_destinations", figures)
    assert drained, ("inbox not empty or deliveries not drained in time", figures)
    assert figures["deliveries"] == {"pacs": n_files, "research": len(routed)}, figures
    zero = (
        "pacs_lost",
        "pacs_duplicated",
        "research_lost",
        "research_wrong_bytes",
        "research_unrouted_delivered",
        "dead",
        "originals_lost",
        "temp_left",
        "orphan_workers",
    )
    assert {k: figures[k] for k in zero} == dict.fromkeys(zero, 0), figures
    assert rc == 0
    assert_no_phi("crash_two_destinations", phi_audit(run, orthanc=orthanc, metrics=metrics))


def test_kill9_during_multipart_uploads(tmp_path: Path, s3: S3Server, agent_run: Any) -> None:
    """Large objects go up in 5 MB parts through a proxy that holds every request 0.3 s, so kills
    land in the middle of multipart uploads. Every object ends up whole (its bytes the
    instance's) and no incomplete upload is left."""
    n_kills, n_files = size(5, 20), size(10, 40)
    rng = random.Random(SEED + 7)
    proxy = FaultProxy(s3.endpoint, plan=lambda _i: "delay:0.3", keep_host=True).start()
    run = agent_run(
        destinations=[
            {
                "name": "research",
                "kind": "s3",
                "bucket": "gateway",
                "prefix": "big",
                "endpoint_url": proxy.url,
                "aws_credentials_file": str(_credentials(tmp_path)),
                "multipart_threshold_mb": 5,
                "multipart_chunk_mb": 5,
                "batch_max_instances": 2,
                "parallel_requests": 2,
                "timeout_seconds": 20.0,
                "backoff_base_seconds": 0.2,
                "backoff_cap_seconds": 2.0,
            }
        ],
        env={"AWS_EC2_METADATA_DISABLED": "true"},
    )
    expected = make_inputs(run, n_files, rows=1700)  # ~5.8 MB each: two parts
    for name in sorted(expected):
        run.feed(name)
    run.start()
    try:
        for _ in range(n_kills):
            # Kill while a multipart upload is open: a part has just reached the proxy, which
            # holds it 0.3 s (on a loaded machine a fixed delay after the lease may fall before
            # the upload was created, or after it was completed).
            seen = len(proxy.requests)

            def part_sent(seen: int = seen) -> bool:
                return any("partNumber=" in r.path for r in proxy.requests[seen:])

            reached(part_sent, timeout=120, interval=0.02)
            time.sleep(rng.uniform(0.0, 0.25))
            run.agent.kill9()
            run.start()
        drained = reached(lambda: _drained(run), timeout=size(300, 900))
        assert run.agent.alive(), "the agent died on its own"
    finally:
        rc = run.agent.stop()
        proxy.stop()
    at_s3 = _s3_objects(s3, "big/")
    aborted = sum(1 for line in run.agent.log_lines() if "s3_stale_upload_aborted" in line)
    want = dict(expected.values())
    client = s3.client()
    incomplete = [
        u["Key"]
        for u in client.list_multipart_uploads(Bucket="gateway", Prefix="big/").get("Uploads", [])
    ]
    client.close()
    figures = {
        "kills": n_kills,
        "files": n_files,
        "lost": len(set(want) - set(at_s3)),
        "wrong_bytes": sum(1 for u, d in at_s3.items() if want.get(u) != d),
        "incomplete_uploads_left": len(incomplete),
        "interrupted_uploads_aborted": aborted,
        "final_exit": rc,
        "drained": drained,
    }
    record_figures("crash_multipart", figures)
    assert drained, figures
    assert (figures["lost"], figures["wrong_bytes"], len(incomplete)) == (0, 0, 0), figures
    assert aborted >= 1, ("no kill landed in the middle of a multipart upload", figures)
    assert rc == 0
