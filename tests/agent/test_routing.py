"""Several destinations: routing rules, deliveries kept per (instance, destination), files kept
until every destination is done, and one destination down while the others deliver."""

from __future__ import annotations

import collections
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_agent._exceptions import ConfigError
from gateway_agent.agent.outbox.routing import Route, routes_from_settings
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.cli import main
from gateway_agent.cli.agent_cmds import collect_status
from gateway_agent.config import MatchSettings, Settings, load_settings
from tests._orthanc import OrthancServer, start_orthanc
from tests._s3 import ACCESS_KEY, SECRET_KEY, S3Server, start_s3

from ._agent_util import files_under, running_daemon, sop_uid_of, wait_until, write_synthetic
from ._uploadkit import FakeClock

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


# -- rules --------------------------------------------------------------------------------------
def test_match_rules() -> None:
    def attrs(**kw: Any) -> dict[str, Any]:
        base = {"modality": "CT", "sop_class_uid": CT, "inbox_folder": "", "calling_ae": None}
        return {**base, **kw}

    everything = Route("all")
    ct_mr = Route("pacs", MatchSettings(modality=["ct", "MR"]))
    reports = Route("reports", MatchSettings(sop_class_uid=["1.2.840.10008.5.1.4.1.1.88.*"]))
    scanner = Route("ct1", MatchSettings(inbox_folder=["ct-1"], modality=["CT"]))
    listener = Route("push", MatchSettings(calling_ae=["CT01"]))
    assert everything.matches(attrs())
    assert ct_mr.matches(attrs()) and ct_mr.matches(attrs(modality="MR"))
    assert not ct_mr.matches(attrs(modality="SR"))
    assert reports.matches(attrs(sop_class_uid=SR)) and not reports.matches(attrs())
    assert scanner.matches(attrs(inbox_folder="ct-1"))
    assert not scanner.matches(attrs(inbox_folder="ct-1", modality="MR"))  # every key must match
    assert not scanner.matches(attrs(inbox_folder="ct-2"))
    assert listener.matches(attrs(calling_ae="CT01")) and not listener.matches(attrs())


def test_rules_are_checked_when_the_configuration_is_read() -> None:
    with pytest.raises(ConfigError, match="is not a UID"):
        load_settings(None, {"destination.match.sop_class_uid": ["1.2.*.3"]})
    with pytest.raises(ConfigError, match="one folder name directly under the inbox"):
        load_settings(None, {"destination.match.inbox_folder": ["a/b"]})
    with pytest.raises(ConfigError, match="needs a name"):
        load_settings(None, {"destinations": [{"kind": "folder"}]})
    with pytest.raises(ConfigError, match="used twice"):
        load_settings(None, {"destinations": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="not both"):
        load_settings(None, {"destinations": [{"name": "a"}], "destination.folder": "x"})
    with pytest.raises(ConfigError, match="lower-case letters"):
        load_settings(None, {"destinations": [{"name": "PACS one"}]})
    s = load_settings(None, {"destinations": [{"name": "a"}, {"name": "b", "kind": "folder"}]})
    assert [r.name for r in routes_from_settings(s.all_destinations)] == ["a", "b"]
    assert Settings().all_destinations[0].name == "default"


# -- the outbox: deliveries per destination -----------------------------------------------------
def _add(ob: Outbox, uid: str, path: Path, **attrs: Any) -> bool:
    path.write_bytes(b"x" * 10)
    written = ob.now()
    os.utime(path, (written, written))  # written before it is sent, by the outbox's clock
    return ob.add(
        sop_instance_uid=uid,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        sop_class_uid=attrs.pop("sop_class_uid", CT),
        path=path,
        size=10,
        audit={},
        **attrs,
    )


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[tuple[Outbox, FakeClock]]:
    clock = FakeClock()
    routes = [
        Route("pacs", MatchSettings(modality=["CT", "MR"])),
        Route("research", MatchSettings(inbox_folder=["study-x"])),
        Route("archive"),
    ]
    ob = Outbox(tmp_path / "outbox.db", clock=clock, routes=routes)
    yield ob, clock
    ob.close()


def test_each_instance_goes_to_every_destination_it_matches(
    routed: tuple[Outbox, FakeClock], tmp_path: Path
) -> None:
    ob, _ = routed
    _add(ob, "1.1", tmp_path / "a", modality="CT", inbox_folder="study-x")
    _add(ob, "1.2", tmp_path / "b", modality="SR", sop_class_uid=SR, inbox_folder="PHIDOE")
    _add(ob, "1.3", tmp_path / "c", modality="MR", source="listener", calling_ae="MR01")
    assert sorted(ob.deliveries_of("1.1")) == ["archive", "pacs", "research"]
    assert sorted(ob.deliveries_of("1.2")) == ["archive"]
    assert sorted(ob.deliveries_of("1.3")) == ["archive", "pacs"]
    # The inbox folder is kept only when a rule names it (a folder name may be a patient's).
    assert ob.get("1.1") is not None and ob.get("1.1").inbox_folder == "study-x"  # type: ignore[union-attr]
    assert ob.get("1.2") is not None and ob.get("1.2").inbox_folder is None  # type: ignore[union-attr]
    assert ob.counts_by_destination() == {
        "pacs": {"queued": 2, "sending": 0, "sent": 0, "dead": 0},
        "research": {"queued": 1, "sending": 0, "sent": 0, "dead": 0},
        "archive": {"queued": 3, "sending": 0, "sent": 0, "dead": 0},
    }


def test_an_instance_reconciled_after_a_kill_is_routed_again_by_its_original(
    tmp_path: Path,
) -> None:
    """A kill between writing an outbox file and committing its row: at start-up the file is
    re-added from its header, where it came from unknown, so a rule on the inbox folder misses
    it. Its original, still in the inbox and taken again, brings the missing deliveries."""
    from ._uploadkit import make_files

    routes = [Route("pacs"), Route("research", MatchSettings(inbox_folder=["study-x"]))]
    ob = Outbox(tmp_path / "outbox.db", routes=routes)
    files = tmp_path / "outbox"
    (path,) = make_files(files, 1)
    assert ob.reconcile(files)["added"] == 1
    row = ob.get(sop_uid_of(path))
    assert row is not None and sorted(ob.deliveries_of(row.sop_instance_uid)) == ["pacs"]
    again = {
        "sop_instance_uid": row.sop_instance_uid,
        "study_instance_uid": row.study_instance_uid,
        "series_instance_uid": row.series_instance_uid,
        "sop_class_uid": row.sop_class_uid,
        "modality": "CT",
        "path": path,
        "size": path.stat().st_size,
        "audit": {},
        "inbox_folder": "study-x",
    }
    assert ob.add(**again) is False  # the same instance: no second row...
    assert sorted(ob.deliveries_of(row.sop_instance_uid)) == ["pacs", "research"]  # ...routed
    # Any instance arriving again is routed by where the new version came from (not only a
    # reconciled one): the same instance again from the inbox itself routes nothing more.
    assert ob.add(**{**again, "inbox_folder": ""}) is False
    assert sorted(ob.deliveries_of(row.sop_instance_uid)) == ["pacs"]
    ob.close()


def test_unrouted_instances_are_kept_counted_and_logged(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    ob = Outbox(":memory:", routes=[Route("pacs", MatchSettings(modality=["CT"]))])
    with capture_logs() as logs:
        _add(ob, "1.9", tmp_path / "us", modality="US")
    assert ob.unrouted_count() == 1 and ob.deliveries_of("1.9") == {}
    assert [e["event"] for e in logs] == ["instance_unrouted"]
    ob.close()


def test_one_destination_never_holds_another_back(
    routed: tuple[Outbox, FakeClock], tmp_path: Path
) -> None:
    ob, clock = routed
    for i in range(3):
        _add(ob, f"1.{i}", tmp_path / f"f{i}", modality="CT", inbox_folder="study-x")
    pacs, archive = ob.queue("pacs"), ob.queue("archive")
    rows = pacs.claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    started = clock.now
    pacs.mark_retry([r.id for r in rows], error="network_error", delay=600, refund_attempt=True)
    pacs.circuit_failure("network_error", delay=600, started_at=started)
    assert pacs.circuit_acquire(probe_lease=60)[0] > 0  # pacs waits...
    assert archive.circuit_acquire(probe_lease=60) == (0.0, False)  # ...archive does not
    taken = archive.claim(max_items=10, max_bytes=10**9, lease_seconds=60)
    assert [r.destination for r in taken] == ["archive"] * 3
    archive.mark_sent([r.id for r in taken])
    assert archive.counts()["sent"] == 3 and pacs.counts()["queued"] == 3
    assert ob.get("1.0") is not None and ob.get("1.0").state == "queued"  # type: ignore[union-attr]


def test_files_go_only_when_every_destination_is_done(
    routed: tuple[Outbox, FakeClock], tmp_path: Path
) -> None:
    ob, clock = routed
    _add(ob, "1.1", tmp_path / "both", modality="CT")  # pacs + archive
    _add(ob, "1.2", tmp_path / "one", modality="SR", sop_class_uid=SR)  # archive only
    archive, pacs = ob.queue("archive"), ob.queue("pacs")
    acked = [r.id for r in archive.claim(max_items=9, max_bytes=10**9, lease_seconds=9)]
    archive.mark_sent(acked)
    clock.advance(100)
    assert ob.purge_sent_files(older_than_seconds=10) == 0  # acknowledged, not proven yet
    archive.mark_proven(acked)
    assert ob.purge_sent_files(older_than_seconds=10) == 1
    assert not (tmp_path / "one").exists() and (tmp_path / "both").exists()
    (row,) = pacs.claim(max_items=9, max_bytes=10**9, lease_seconds=9)
    pacs.mark_dead([row.id], error="http_409 conflict")
    clock.advance(100)
    assert ob.purge_sent_files(older_than_seconds=10) == 0  # dead at pacs: kept for a retry
    assert ob.retry_dead(destination="pacs") == 1
    acked = [r.id for r in pacs.claim(max_items=9, max_bytes=10**9, lease_seconds=9)]
    pacs.mark_sent(acked)
    pacs.mark_proven(acked)
    assert ob.purge_sent_files(older_than_seconds=10) == 0  # not old enough since the last
    clock.advance(100)
    assert ob.purge_sent_files(older_than_seconds=10) == 1
    assert not (tmp_path / "both").exists()
    assert ob.compact(older_than_seconds=10) == 1  # the newest instance is kept


def test_retry_one_destination_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    ob = Outbox(state / "outbox.db", routes=[Route("pacs"), Route("research")])
    for i in range(2):
        _add(ob, f"1.{i}", tmp_path / f"f{i}")
    for name in ("pacs", "research"):
        q = ob.queue(name)
        q.mark_dead(
            [r.id for r in q.claim(max_items=9, max_bytes=10**9, lease_seconds=9)], error="x"
        )
    ob.close()
    assert main(["retry", "--destination", "pacs", "--state-dir", str(state)]) == 0
    assert "requeued 2 dead deliveries of pacs" in capsys.readouterr().out
    assert main(["retry", "--destination", "nope", "--state-dir", str(state)]) == 1
    assert "no destination 'nope' (known: pacs, research)" in capsys.readouterr().err
    ob = Outbox(state / "outbox.db", routes=[Route("pacs"), Route("research")])
    assert ob.counts("pacs")["queued"] == 2 and ob.counts("research")["dead"] == 2
    ob.close()


# -- three destinations of different kinds, one down for a minute -------------------------------
DOWN_SECONDS = float(os.environ.get("GW_TEST_PACS_DOWN_SECONDS", "60"))


@pytest.fixture
def servers() -> Iterator[tuple[OrthancServer, S3Server]]:
    with start_orthanc() as orthanc, start_s3() as s3:
        yield orthanc, s3


def _settings(tmp_path: Path, orthanc: OrthancServer, s3: S3Server) -> Settings:
    creds = tmp_path / "aws-credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    creds.chmod(0o600)
    user, password = orthanc.auth
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return load_settings(
        None,
        {
            "inbox": tmp_path / "inbox",
            "state_dir": tmp_path / "state",
            "settle_seconds": 0.3,
            "intake_workers": 2,
            "metrics.port": 0,
            "disk.min_free_mb": 1.0,
            "disk.sent_retention_hours": 0,
            "qc.enabled": False,
            "destinations": [
                {
                    "name": "pacs",
                    "kind": "dicomweb",
                    "url": orthanc.dicomweb_url,
                    "auth": "basic",
                    "username": user,
                    "password": password,
                    "timeout_seconds": 5,
                    "backoff_base_seconds": 0.2,
                    "backoff_cap_seconds": 2.0,
                    "match": {"inbox_folder": ["clinical", "both"]},
                },
                {
                    "name": "research",
                    "kind": "s3",
                    "bucket": "gateway",
                    "prefix": "research",
                    "endpoint_url": s3.endpoint,
                    "aws_credentials_file": creds,
                    "match": {"inbox_folder": ["study", "both"]},
                },
                {"name": "copy", "kind": "folder", "folder": tmp_path / "copy"},
            ],
        },
    )


def test_three_destinations_one_down_for_a_minute(
    tmp_path: Path, servers: tuple[OrthancServer, S3Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    orthanc, s3 = servers
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = _settings(tmp_path, orthanc, s3)
    orthanc.stop()  # the PACS is down from the start
    with running_daemon(settings, components=[]) as d:
        assert d.outbox is not None and d.service is not None
        inbox = settings.inbox
        stage = tmp_path / "stage"
        groups = {"clinical": 6, "study": 5, "both": 4, "other": 3}
        for folder, n in groups.items():
            write_synthetic(stage / folder, n, seed=f"route-{folder}")
        for folder in groups:
            (stage / folder).rename(inbox / folder)
        down_since = time.monotonic()
        report = d.outbox.destination_report
        # While the PACS is down, the others deliver everything they match.
        assert wait_until(lambda: report()["copy"]["counts"]["sent"] == 18, 60), report()
        assert wait_until(lambda: report()["research"]["counts"]["sent"] == 9, 60), report()
        assert not files_under(inbox)  # every original went once its rows were committed
        pacs = report()["pacs"]
        assert pacs["waiting"] == 10 and pacs["counts"]["dead"] == 0
        assert pacs["consecutive_failures"] >= 1
        # The per-destination views say the same.
        st = collect_status(settings)
        by_name = {x["name"]: x for x in st["destinations"]}
        assert by_name["pacs"]["waiting"] == 10 and by_name["research"]["waiting"] == 0
        url = f"http://127.0.0.1:{d.service.port}"
        checks = httpx.get(url + "/readyz", timeout=10).json()["checks"]
        assert checks["destination:copy"]["ok"] and checks["destination:research"]["ok"]
        metrics = httpx.get(url + "/metrics", timeout=10).text
        # Queued, or claimed by the probe that tries the PACS again right now.
        waiting = re.findall(
            r'gateway_outbox_depth\{destination="pacs",state="(?:queued|sending)"\} (\S+)', metrics
        )
        assert sum(float(v) for v in waiting) == 10.0, metrics
        assert 'gateway_destination_up{destination="copy"} 1.0' in metrics
        # Files wanted by the PACS stay; the others' may go once proven (sizes read back, HEAD).
        assert wait_until(lambda: d.outbox.proof_summary()["pending"][0] == 0, 60)
        d.outbox.purge_sent_files(0)
        kept = {p.name for p in (settings.state_dir / "outbox").iterdir()}
        assert len(kept) == 10
        time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_since)))
        assert report()["pacs"]["counts"]["dead"] == 0  # a minute down burns no instance
        orthanc.start()
        assert wait_until(lambda: report()["pacs"]["counts"]["sent"] == 10, 90), report()
        assert wait_until(lambda: d.outbox.proof_summary()["pending"][0] == 0, 60)  # C-FIND
        d.outbox.purge_sent_files(0)
        assert not list((settings.state_dir / "outbox").iterdir())
    # Exactly once at every destination it matches, and nowhere else.
    stored = collections.Counter(orthanc.sop_uids())
    assert len(stored) == 10 and set(stored.values()) == {1}
    objects = s3.objects(prefix="research/")
    assert len(objects) == 9
    copies = [p.stem for p in (tmp_path / "copy").rglob("*.dcm")]
    assert len(copies) == 18 and len(set(copies)) == 18
    pacs_uids, s3_uids = set(stored), {k.rsplit("/", 1)[1][:-4] for k in objects}
    assert len(pacs_uids & s3_uids) == 4  # the "both" folder
    assert (pacs_uids | s3_uids) < set(copies)
    record = json.loads((settings.state_dir / "effective-settings.json").read_text())
    assert [x["name"] for x in record["destinations"]] == ["pacs", "research", "copy"]


def test_config_show_and_check_list_every_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        "[[destinations]]\n"
        'name = "pacs"\nkind = "dicomweb"\nurl = "https://pacs/dw"\nauth = "basic"\n'
        'username = "u"\npassword = "not-shown-anywhere"\n'
        "[destinations.match]\n"
        'modality = ["CT"]\n'
        "[[destinations]]\n"
        'name = "research"\nkind = "s3"\nbucket = "b"\n'
        f'aws_credentials_file = "{tmp_path / "missing-credentials"}"\n'
    )
    assert main(["--config", str(cfg), "config", "show"]) == 0
    out = capsys.readouterr().out
    assert 'destinations.pacs.match.modality = ["CT"]' in " ".join(out.split())
    assert "destinations.research.bucket" in out and "not-shown-anywhere" not in out
    assert main(["--config", str(cfg), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert "destinations.research.aws_credentials_file: file" in err and "does not exist" in err


# -- rules on where an instance came from, end to end -------------------------------------------
def _routed_settings(
    tmp_path: Path, destinations: list[dict[str, Any]], **overrides: Any
) -> Settings:
    """A unit ``EDGE01`` with these ``[[destinations]]``, everything under ``tmp_path`` (its inbox
    made), fast settle, two workers, no metrics port, no QC."""
    (tmp_path / "inbox").mkdir()
    return load_settings(
        None,
        {
            "inbox": tmp_path / "inbox",
            "state_dir": tmp_path / "state",
            "unit_name": "EDGE01",
            "settle_seconds": 0.3,
            "intake_workers": 2,
            "metrics.enabled": False,
            "disk.min_free_mb": 1.0,
            "qc.enabled": False,
            "destinations": destinations,
            **overrides,
        },
    )


def test_rules_on_calling_ae_and_inbox_folder_route_real_deliveries(tmp_path: Path) -> None:
    """Scanners pushing over C-STORE (two calling AE titles) and files dropped into two inbox
    folders: each folder destination gets exactly what its rule names, the catch-all everything."""
    from tests._dcmtk import send_ct
    from tests._orthanc import free_port

    port = free_port()
    dest = tmp_path / "out"
    settings = _routed_settings(
        tmp_path,
        [
            {"name": "room1", "kind": "folder", "folder": dest / "room1",
             "match": {"calling_ae": ["CT_ROOM1"]}},
            {"name": "ward", "kind": "folder", "folder": dest / "ward",
             "match": {"inbox_folder": ["ward"], "modality": ["CT"]}},
            {"name": "all", "kind": "folder", "folder": dest / "all"},
        ],
        **{"listener.enabled": True, "listener.host": "127.0.0.1", "listener.port": port},
    )  # fmt: skip
    pushed = {
        "CT_ROOM1": write_synthetic(tmp_path / "room1", 3, seed="room1"),
        "CT_ROOM2": write_synthetic(tmp_path / "room2", 2, seed="room2"),
    }
    stage = tmp_path / "stage"
    write_synthetic(stage / "ward", 4, seed="ward")
    write_synthetic(stage / "other", 2, seed="other")

    def outputs(name: str) -> set[str]:
        return {p.stem for p in (dest / name).rglob("*.dcm")}

    with running_daemon(settings, components=[]) as d:
        assert wait_until(lambda: d.listener is not None and d.listener.alive(), 30)
        for calling, paths in pushed.items():
            assert send_ct(port, paths, calling=calling) == [0] * len(paths)
        for folder in ("ward", "other"):
            (stage / folder).rename(settings.inbox / folder)
        assert wait_until(lambda: len(outputs("all")) == 11, 120), outputs("all")
        assert wait_until(lambda: bool(d.drained()), 60)
        rows = {r.sop_instance_uid: r for r in d.outbox.rows("sent", limit=100)}
    room1, ward, everything = outputs("room1"), outputs("ward"), outputs("all")
    assert len(room1) == 3 and len(ward) == 4 and room1 | ward < everything
    assert {rows[u].calling_ae for u in room1} == {"CT_ROOM1"}
    assert not room1 & ward


@pytest.mark.orthanc
def test_a_pacs_over_c_store_among_the_destinations(tmp_path: Path, pacs: OrthancServer) -> None:
    """A ``dicom`` destination in ``[[destinations]]`` (our AE title: the unit name) beside a
    folder: the PACS gets what its rule matches, the folder everything, each exactly once."""
    settings = _routed_settings(
        tmp_path,
        [
            {"name": "pacs", "kind": "dicom", "host": "127.0.0.1",
             "port": pacs.dicom_port, "called_ae": pacs.dicom_aet,
             "match": {"inbox_folder": ["clinical"]}},
            {"name": "copy", "kind": "folder", "folder": tmp_path / "copy"},
        ],
    )  # fmt: skip
    stage = tmp_path / "stage"
    write_synthetic(stage / "clinical", 5, seed="clinical")
    write_synthetic(stage / "other", 3, seed="other")
    with running_daemon(settings, components=[]) as d:
        assert d.outbox is not None
        for folder in ("clinical", "other"):
            (stage / folder).rename(settings.inbox / folder)
        report = d.outbox.destination_report
        assert wait_until(lambda: report()["copy"]["counts"]["sent"] == 8, 120), report()
        assert wait_until(lambda: report()["pacs"]["counts"]["sent"] == 5, 120), report()
    stored = collections.Counter(pacs.sop_uids())
    copies = {p.stem for p in (tmp_path / "copy").rglob("*.dcm")}
    assert len(stored) == 5 and set(stored.values()) == {1}
    assert len(copies) == 8 and set(stored) < copies
