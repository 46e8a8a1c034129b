"""Fleet QC over a real Orthanc (DICOMweb) holding a synthetic fleet uploaded by several boxes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import pytest

from gateway_agent.cli import main
from gateway_agent.qc import ArchiveQC, FeatureCache, analyse_fleet, build_report
from gateway_agent.synthetic import PHI_MARKERS
from tests._orthanc import OrthancServer, start_orthanc
from tests.qc._archive import EDGE_BOXES, LoadedFleet, load_fleet

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def archive() -> Iterator[tuple[OrthancServer, LoadedFleet]]:
    server = start_orthanc()
    try:
        yield server, load_fleet(server)
    finally:
        server.close()


class Recorder:
    """An httpx client that counts requests by kind (listing, per-series QIDO, WADO)."""

    def __init__(self, server: OrthancServer) -> None:
        self.paths: list[str] = []
        self.client = httpx.Client(
            auth=server.auth, timeout=30, event_hooks={"request": [self._seen]}
        )

    def _seen(self, request: httpx.Request) -> None:
        self.paths.append(request.url.path)

    def kinds(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for p in self.paths:
            if p.endswith("/dicom-web/studies"):
                out["list"] += 1  # QIDO-RS: the studies
            elif p.endswith("/series"):
                out["series"] += 1  # QIDO-RS: the series of a study
            elif p.endswith("/instances"):
                out["qido"] += 1  # QIDO-RS: instances of a series
            else:
                out["wado"] += 1  # WADO-RS: an instance, or a small series whole
        return out


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for rec in made:
        rec.client.close()


def _qc(server: OrthancServer, cache: Path, rec: Recorder, **kwargs: object) -> ArchiveQC:
    return ArchiveQC(
        rec.client,
        server.dicomweb_url,
        FeatureCache(cache),
        progress=False,
        sleep=lambda s: None,
        **kwargs,  # type: ignore[arg-type]
    )


def test_detuned_scanner_is_flagged_and_a_rerun_fetches_nothing(
    archive: tuple[OrthancServer, LoadedFleet], tmp_path: Path, recorders: list[Recorder]
) -> None:
    server, fleet = archive
    rec = Recorder(server)
    recorders.append(rec)
    qc = _qc(server, tmp_path / "cache.db", rec, page_size=7, workers=3)
    first = qc.run()
    assert first.listed == first.fetched == first.studies == 24
    assert first.failed == first.unmeasurable == 0
    assert len(first.records) == 24 * 3 and first.instances == 72
    # Pages of 7 studies (7+7+7+3); each study's series; each 3-slice series whole.
    assert rec.kinds() == {"list": 4, "series": 24, "wado": 24}
    assert first.bytes > 72 * 48 * 48 * 2

    _matrix, labels, silhouette = analyse_fleet(first.records)
    report = build_report(first.records, labels, silhouette, first.failures)
    scanners = report["scanners"]
    assert set(scanners) == set(fleet.pseudonyms)  # grouped by scanner, not by edge box
    detuned = fleet.pseudonyms[2]
    assert scanners[detuned]["outlier_series"] == 4
    assert "air_mean" in scanners[detuned]["reasons"]
    flagged = {o["scanner"] for o in report["outliers"]}
    assert flagged == {detuned}, report["outliers"][:3]
    reason = next(o for o in report["outliers"] if o["scanner"] == detuned)["reasons"][0]
    assert reason.startswith("air_mean") and "fleet median" in reason
    # A mobile scanner's series came through several edge boxes: one scanner, several boxes.
    assert all(len(s["edge_boxes"]) >= 2 for s in scanners.values())
    assert set().union(*(s["edge_boxes"] for s in scanners.values())) == set(EDGE_BOXES)

    rec.paths.clear()
    again = qc.run()
    assert again.to_fetch == again.fetched == 0 and again.cached == 24
    assert rec.kinds() == {"list": 4}  # listing only: nothing fetched again
    assert [(r.sop_instance_uid, r.noise) for r in again.records] == [
        (r.sop_instance_uid, r.noise) for r in first.records
    ]
    qc.cache.close()


def test_new_series_only_are_fetched_and_since_limits_the_listing(
    tmp_path: Path, recorders: list[Recorder], capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_orthanc()
    try:
        load_fleet(server, scanners=2, series_per_scanner=2, slices=2)
        rec = Recorder(server)
        recorders.append(rec)
        qc = _qc(server, tmp_path / "cache.db", rec)
        qc.progress = True  # as on a terminal
        assert qc.run().fetched == 4
        assert "qc [##############################] 4/4 series" in capsys.readouterr().err
        qc.progress = False
        load_fleet(server, scanners=2, series_per_scanner=1, slices=2, start=2)
        rec.paths.clear()
        run = qc.run()
        assert (run.listed, run.fetched, run.cached) == (6, 2, 4)
        assert (run.studies, run.studies_listed) == (6, 2)
        assert rec.kinds() == {"list": 1, "series": 2, "wado": 2}
        # --since matches the archive's (de-identified, shifted) StudyDate.
        dates = sorted(
            item["00080020"]["Value"][0]
            for item in rec.client.get(server.dicomweb_url + "/series").json()
        )
        cut = dates[3]
        later = qc.run(since=date(int(cut[:4]), int(cut[4:6]), int(cut[6:])))
        expected = sum(d >= cut for d in dates)
        assert later.listed == expected < 6 and later.fetched == 0
        assert len(later.records) == 2 * expected
        assert qc.run(since=date(2100, 1, 1)).listed == 0
        qc.cache.close()
    finally:
        server.close()


def test_a_long_series_is_sampled_with_one_result_queries_and_refetched_when_it_grows(
    tmp_path: Path, recorders: list[Recorder]
) -> None:
    server = start_orthanc()
    try:
        fleet = load_fleet(server, scanners=1, series_per_scanner=1, slices=9)
        rec = Recorder(server)
        recorders.append(rec)
        qc = _qc(server, tmp_path / "cache.db", rec)
        run = qc.run()
        # Positions 2, 4 and 6 of 9 (0-based, in the archive's order), as the agent picks them.
        assert sorted(r.sop_instance_uid for r in run.records) == sorted(
            _sops(server)[i] for i in (2, 4, 6)
        )
        assert rec.kinds() == {"list": 1, "series": 1, "qido": 3, "wado": 3}
        # Three more slices of the same series arrive: the study's count changed, so its series
        # are listed again, and the grown series is sampled again.
        load_fleet(server, scanners=1, series_per_scanner=1, slices=12)
        rec.paths.clear()
        again = qc.run()
        assert (again.studies_listed, again.fetched) == (1, 1)
        assert rec.kinds() == {"list": 1, "series": 1, "qido": 3, "wado": 3}
        assert len(again.records) == 3 and fleet.pseudonyms[0] in {r.scanner for r in again.records}
        qc.cache.close()
    finally:
        server.close()


def _sops(server: OrthancServer) -> list[str]:
    """SOP Instance UIDs of the archive's only series, in the archive's (QIDO) order."""
    with httpx.Client(auth=server.auth, timeout=10) as client:
        series = client.get(server.dicomweb_url + "/series").json()[0]
        study, uid = series["0020000D"]["Value"][0], series["0020000E"]["Value"][0]
        items = client.get(f"{server.dicomweb_url}/studies/{study}/series/{uid}/instances").json()
    return [item["00080018"]["Value"][0] for item in items]


def _remove_from_storage(server: OrthancServer, series_uid: str, index: int) -> None:
    """Delete the stored file of the series' ``index``-th instance behind Orthanc's back."""
    with httpx.Client(auth=server.auth, timeout=10) as client:
        found = client.post(server.base_url + "/tools/lookup", content=series_uid.encode())
        series_id = found.json()[0]["ID"]
        instance = client.get(f"{server.base_url}/series/{series_id}/instances").json()[index]
        info = client.get(f"{server.base_url}/instances/{instance['ID']}/attachments/dicom/info")
    uuid = info.json()["Uuid"]
    (server.workdir / "storage" / uuid[:2] / uuid[2:4] / uuid).unlink()


def test_a_series_the_archive_cannot_serve_is_reported_and_the_rest_go_on(
    tmp_path: Path, recorders: list[Recorder]
) -> None:
    # No storage cache: a file removed from the storage area cannot be served from memory.
    server = start_orthanc(extra_config={"MaximumStorageCacheSize": 0})
    try:
        fleet = load_fleet(server, scanners=3, series_per_scanner=2, slices=5)
        _study, broken = fleet.series[fleet.pseudonyms[1]][0]
        # The archive still lists the series but fails (500) on the instance sampled second.
        _remove_from_storage(server, broken, 2)
        rec = Recorder(server)
        recorders.append(rec)
        qc = _qc(server, tmp_path / "cache.db", rec)
        run = qc.run()
        assert (run.listed, run.fetched, run.failed) == (6, 5, 1)
        assert len(run.records) == 15 and len(run.failures) == 1
        where, reason = run.failures[0]
        assert (where, reason) == (f"series {broken}", "http_500")
        # Positions 1, 2, 3 of 5; the bad one is tried three times.
        assert rec.kinds() == {"list": 1, "series": 6, "qido": 5 * 3 + 1 + 3, "wado": 5 * 3}
        # The failed series is tried again on the next run; the others are not fetched again.
        rec.paths.clear()
        again = qc.run()
        assert (again.to_fetch, again.failed, again.cached) == (1, 1, 5)
        assert rec.kinds() == {"list": 1, "qido": 1 + 3}
        qc.cache.close()
    finally:
        server.close()


def test_archive_that_cannot_be_listed_is_one_clear_error(tmp_path: Path) -> None:
    server = start_orthanc()
    try:
        from gateway_agent._exceptions import QCError

        with httpx.Client(auth=("edge", "wrong"), timeout=10) as client:
            cache = FeatureCache(tmp_path / "c.db")
            qc = ArchiveQC(client, server.dicomweb_url, cache, progress=False)
            with pytest.raises(QCError, match=r"cannot be listed \(http_401\)"):
                qc.run()
            cache.close()
    finally:
        server.close()


def test_cli_qc_dicomweb_writes_the_report(
    archive: tuple[OrthancServer, LoadedFleet], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, fleet = archive
    password = tmp_path / "password"
    password.write_text(server.auth[1] + "\n")
    args = [
        "qc", "--dicomweb", server.dicomweb_url, "--auth", "basic",
        "--username", server.auth[0], "--password-file", str(password),
        "--report", str(tmp_path / "report"), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "24 studies (24 new or changed), 24 series: 24 fetched" in out
    assert fleet.pseudonyms[2] in out  # the detuned scanner leads the summary
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["archive"]["listed"] == 24
    assert report["scanners"][fleet.pseudonyms[2]]["outlier_series"] == 4
    for name in ("features.csv", "fleet.png", "qc-cache.db"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    text = (tmp_path / "report" / "report.json").read_text()
    text += (tmp_path / "report" / "features.csv").read_text()
    for marker in (*PHI_MARKERS, "SN-0070", "CT01", "CT03"):
        assert marker not in text
    # Rerun: nothing fetched.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "24 studies (0 new or changed), 24 series: 0 fetched, 24 from the cache" in out
    assert "nothing new: the report in" in out and "up to date" in out
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == report
    # A URL with credentials is refused, as for the DICOMweb destination.
    bad = ["qc", "--dicomweb", server.dicomweb_url.replace("://", "://edge:x@"), "--report", "r"]
    assert main(bad) == 2
    assert "credentials" in capsys.readouterr().err
