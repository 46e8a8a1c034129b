"""A real Prometheus scrapes a running agent on 127.0.0.1 while a fleet's images arrive; the
detuned scanner's alerts (deploy/prometheus/alerts.rules.yml) reach the firing state, and every
query of the Grafana dashboard runs on the agent's real metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.deid import load_or_create_secret
from gateway_agent.deid.keys import Keys
from gateway_agent.synthetic import PHI_MARKERS, make_fleet_series, synthetic_fleet, write_series
from tests._orthanc import free_port
from tests._prometheus import RULES, PrometheusServer, prometheus_available
from tests.agent._agent_util import agent_settings, running_daemon, wait_until
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-agent-fleet.json"
#: The shipped rules with their ``for:`` durations shortened to a few seconds (the expressions,
#: labels and annotations are the shipped ones).
SHORT_FOR = {f"for: {d}": "for: 3s" for d in ("5m", "10m", "15m", "30m", "1h")}


def _firing(prom: PrometheusServer, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


@pytest.mark.slow
def test_a_detuned_scanner_fires_its_alerts_in_a_real_prometheus(tmp_path: Path) -> None:
    require(prometheus_available(), "promtool and prometheus (Debian package prometheus)")
    port = free_port()
    settings = agent_settings(
        tmp_path,
        **{
            "metrics.enabled": True,
            "metrics.port": port,
            "qc.interval_seconds": 1.0,
            "qc.max_cpu_fraction": 0.9,
            "unit_name": "EDGE01",
        },
    )
    inbox = Path(settings.inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    fleet = synthetic_fleet(5, detuned=(2,))
    prom = PrometheusServer(
        scrape={"gateway-agent": [f"127.0.0.1:{port}"]}, rule_files=RULES, rewrite_rules=SHORT_FOR
    )
    with running_daemon(settings), prom:
        keys = Keys(load_or_create_secret(settings.secret_file))
        names = {
            keys.scanner_pseudonym(
                s.manufacturer.encode(), s.model.encode(), s.serial.encode(), s.station.encode()
            ): s
            for s in fleet
        }
        detuned = next(name for name, s in names.items() if s.detuned)

        drops = iter(range(100))

        def drop(scanners: list[int], index: int) -> None:
            stage = tmp_path / f"stage-{next(drops)}"
            for i in scanners:
                series = make_fleet_series(fleet[i], index, slices=3, rows=48, cols=48)
                write_series(series, stage / f"scanner{i}")
            stage.rename(inbox / stage.name)

        # The normal scanners first; Prometheus sees four healthy scanners.
        drop([0, 1, 3, 4], 0)
        drop([0, 1, 3, 4], 1)
        assert wait_until(
            lambda: len(prom.query("scanner:gateway_qc_scanner_air_mean:current")) == 4, 90
        ), "Prometheus never recorded the four normal scanners"
        assert _firing(prom, "GatewayScannerOutOfLine") == []
        # Then the detuned scanner's images arrive.
        drop([2], 0)
        assert wait_until(lambda: bool(_firing(prom, "GatewayScannerOutOfLine")), 120), (
            prom.alerts()
        )
        fired = _firing(prom, "GatewayScannerOutOfLine")
        assert {(a["labels"]["scanner"], a["labels"]["feature"]) for a in fired} == {
            (detuned, "air_mean")
        }
        assert "MADs from the fleet median" in fired[0]["annotations"]["summary"]
        assert wait_until(lambda: bool(_firing(prom, "GatewayScannerQCOutlier")), 60)
        qc_flag = _firing(prom, "GatewayScannerQCOutlier")
        assert {a["labels"]["scanner"] for a in qc_flag} == {detuned}
        assert "air_mean" in {a["labels"]["reason"] for a in qc_flag}

        # Every dashboard query runs on the agent's real metrics.
        everything = {"$scanner": ".*", "$modality": ".*", "$instance": ".*"}
        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "1m")
                for var, value in everything.items():
                    expr = expr.replace(var, value)
                if not prom.query(expr):  # asserts the query itself succeeded
                    empty.append(f"{panel['title']} {target['refId']}")
        # Without a week of history there is no baseline; nothing was quarantined; the disk
        # guard's gauge needs its first check. Every other panel shows data.
        allowed = {"Noise B", "Air / background mean B", "SNR B", "Mean density B"}
        allowed |= {"Quarantined (last hour) A", "Gateway alerts firing A"}
        assert set(empty) <= allowed, empty
        # The labels carry pseudonyms and modality only.
        text = prom.client.get(f"http://127.0.0.1:{port}/metrics").text
        labels = {s["metric"].get("scanner") for s in prom.query("gateway_qc_scanner_outlier")}
        assert labels == set(names)
        for s in fleet:
            for value in (s.serial, s.station, s.manufacturer, s.model):
                assert value not in text
        for marker in PHI_MARKERS:
            assert marker not in text
