"""Prometheus rules and the Grafana dashboard that ship in deploy/: `promtool check rules`, the
rules' unit tests (`promtool test rules`), the dashboard's structure, and every dashboard query
and variable run through the HTTP API of a real Prometheus holding synthetic fleet data."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._prometheus import RULES, PrometheusServer, prometheus_available, promtool
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-agent-fleet.json"

#: Raw metric names the dashboard and the rules may use: the agent's (see agent/metrics.py,
#: agent/health.py) and Prometheus' own.
AGENT_METRICS = {
    "gateway_qc_scanner_noise",
    "gateway_qc_scanner_air_mean",
    "gateway_qc_scanner_snr",
    "gateway_qc_scanner_density",
    "gateway_qc_scanner_measured_instances",
    "gateway_qc_scanner_outlier",
    "gateway_qc_scanner_outlier_reason",
    "gateway_qc_scanner_last_measurement_timestamp_seconds",
    "gateway_outbox_depth",
    "gateway_outbox_oldest_waiting_age_seconds",
    "gateway_state_disk_free_bytes",
    "gateway_intake_paused",
    "gateway_upload_attempts_total",
    "gateway_bytes_sent_total",
    "gateway_deidentified_total",
    "gateway_files_received_total",
    "gateway_quarantined_total",
    "gateway_deid_seconds_bucket",
}
PROMETHEUS_METRICS = {"up", "ALERTS"}
#: Grafana's built-in variables, and the values the queries run with here.
BUILTINS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
PANEL_TYPES = {"row", "stat", "table", "timeseries", "gauge", "bargauge", "text"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan", "le",
}  # fmt: skip


def _recorded() -> set[str]:
    names = set()
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names.update(r["record"] for r in group["rules"] if "record" in r)
    return names


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _targets(dash: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


def _variables(dash: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dash["templating"]["list"]}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers not followed by "(" nor inside {})."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_matchers = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_ranges = re.sub(r"\[[^\]]*\]", "[]", no_matchers)
    no_ranges = re.sub(r"\b\d+(\.\d+)?(ms|[smhdwy])?\b", "0", no_ranges)  # numbers, durations
    no_groupings = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", no_ranges
    )
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", no_groupings):
        word = m.group(0)
        rest = no_groupings[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if no_groupings[max(0, m.start() - 1)] == "$":
            continue
        names.add(word)
    return names


def _substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in sorted(BUILTINS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


# -- promtool ---------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    require(prometheus_available(), "promtool and prometheus (Debian package prometheus)")
    done = promtool("check", "rules", *map(str, RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("SUCCESS") == len(RULES)


def test_example_prometheus_config() -> None:
    require(prometheus_available(), "promtool and prometheus (Debian package prometheus)")
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    done = promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = [j["job_name"] for j in yaml.safe_load(config.read_text())["scrape_configs"]]
    assert jobs == ["gateway-agent"]  # what GatewayEdgeBoxDown matches
    assert 'up{job="gateway-agent"}' in RULES[1].read_text()


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(tests: Path) -> None:
    require(prometheus_available(), "promtool and prometheus (Debian package prometheus)")
    done = promtool("test", "rules", str(tests))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_and_a_summary() -> None:
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested.update(
                t["alertname"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]
            )
    alerts = set()
    for group in yaml.safe_load(RULES[1].read_text())["groups"]:
        for rule in group["rules"]:
            alerts.add(rule["alert"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert alerts == tested, alerts ^ tested


def test_rules_use_only_agent_metrics_and_recorded_series() -> None:
    known = AGENT_METRICS | PROMETHEUS_METRICS | _recorded()
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = _metric_names(rule["expr"]) - known
                assert not unknown, (rule.get("record") or rule.get("alert"), unknown)


# -- the dashboard's structure ----------------------------------------------------------------
def test_dashboard_schema() -> None:
    dash = _dashboard()
    assert dash["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dash["uid"])
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert {"from", "to"} <= set(dash["time"])
    variables = _variables(dash)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
            assert var["query"]["query"].startswith("label_values("), name
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    for panel in dash["panels"]:
        title = panel["title"]
        assert title and panel["type"] in PANEL_TYPES, title
        assert panel["id"] not in ids, title
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["h"] > 0 and 0 < pos["w"] <= 24 and pos["x"] >= 0 and pos["y"] >= 0, title
        assert pos["x"] + pos["w"] <= 24, title
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{title} overlaps {cells.get((x, y))}"
                cells[(x, y)] = title
        if panel["type"] == "row":
            assert panel.get("panels") == [] and not panel.get("collapsed"), title
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["description"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), title
    known = AGENT_METRICS | PROMETHEUS_METRICS | _recorded()
    for title, target in _targets(dash):
        expr = target["expr"]
        assert expr.strip(), title
        for var in re.findall(r"\$\{?(\w+)", expr):
            assert var in variables or f"$__{var[2:]}" in BUILTINS, (title, var)
        unknown = _metric_names(expr) - known
        assert not unknown, (title, unknown)
    # The three parts the dashboard promises.
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Fleet overview", "Per-scanner trends", "Upload pipeline"]


# -- every query against a real Prometheus ----------------------------------------------------
BOXES = ("box1:9464", "box2:9464")
#: scanner -> (edge boxes, air mean): SCN-...D is detuned, SCN-...M is a mobile scanner.
SCANNERS = {
    "SCN-00000000000A": (("box1:9464",), -1000.0),
    "SCN-00000000000B": (("box1:9464",), -1001.0),
    "SCN-00000000000C": (("box2:9464",), -999.0),
    "SCN-00000000000D": (("box2:9464",), -880.0),
    "SCN-00000000000M": (BOXES, -1002.0),
}


def _openmetrics(now: int) -> str:
    """Two hours of an edge-box fleet's metrics, and 8 days of recorded per-scanner values."""
    start = now - 7200
    raw = range(start, now + 1, 60)
    families: dict[str, tuple[str, list[tuple[str, str, Any]]]] = {}

    def add(family: str, kind: str, sample: str, labels: str, value: Any) -> None:
        families.setdefault(family, (kind, []))[1].append((sample, labels, value))

    def rising(per_second: float) -> Any:
        return lambda t: per_second * (t - start)

    for scanner, (boxes, air) in SCANNERS.items():
        for box in boxes:
            labels = f'job="gateway-agent",instance="{box}",scanner="{scanner}",modality="CT"'
            for feature, value in (
                ("noise", 12.0),
                ("snr", 85.0),
                ("density", -120.0),
                ("air_mean", air),
                ("measured_instances", 30),
                ("outlier", int(air > -900)),
                ("last_measurement_timestamp_seconds", now - 600 * (1 + BOXES.index(box))),
            ):
                name = f"gateway_qc_scanner_{feature}"
                add(name, "gauge", name, labels, value)
            if air > -900:
                name = "gateway_qc_scanner_outlier_reason"
                add(name, "gauge", name, labels + ',reason="air_mean"', 1)
    for box in BOXES:
        inst = f'job="gateway-agent",instance="{box}"'
        add("up", "gauge", "up", inst, 1)
        for state, n in (("queued", 12), ("sending", 2), ("sent", 900), ("dead", 1)):
            add(
                "gateway_outbox_depth",
                "gauge",
                "gateway_outbox_depth",
                f'{inst},state="{state}"',
                n,
            )
        for name, value in (
            ("gateway_outbox_oldest_waiting_age_seconds", 42),
            ("gateway_state_disk_free_bytes", 5e9),
            ("gateway_intake_paused", 0),
        ):
            add(name, "gauge", name, inst, value)
        for result, rate in (("sent", 2.0), ("retry", 0.1)):
            name = "gateway_upload_attempts"
            add(name, "counter", name + "_total", f'{inst},result="{result}"', rising(rate))
        for name, rate in (
            ("gateway_bytes_sent", 1e6),
            ("gateway_deidentified", 2.0),
            ("gateway_files_received", 2.0),
        ):
            add(name, "counter", name + "_total", inst, rising(rate))
        name = "gateway_quarantined"
        add(name, "counter", name + "_total", f'{inst},reason="not_dicom"', rising(1 / 600))
        name = "gateway_deid_seconds"
        for le, rate in (("0.01", 1.0), ("0.1", 1.9), ("+Inf", 2.0)):
            add(name, "histogram", name + "_bucket", f'{inst},le="{le}"', rising(rate))
        add(name, "histogram", name + "_count", inst, rising(2.0))
        add(name, "histogram", name + "_sum", inst, rising(0.03))
    lines: list[str] = []
    for family, (kind, series) in families.items():
        lines.append(f"# TYPE {family} {kind}")
        for sample, labels, value in series:
            for t in raw:
                v = value(t) if callable(value) else value
                lines.append(f"{sample}{{{labels}}} {float(v)} {t}")
    # What the recording rules would have recorded over the past week (for the baselines); the
    # live rules record the last two hours themselves.
    history = range((now - 8 * 86400 - 3600) // 600 * 600, start, 600)  # hour-aligned
    for feature, value in (("noise", 12.0), ("snr", 85.0), ("density", -120.0), ("air_mean", None)):
        name = f"scanner:gateway_qc_scanner_{feature}:current"
        lines.append(f"# TYPE {name} gauge")
        for scanner, (_boxes, air) in SCANNERS.items():
            v = air if value is None else value
            lines.extend(f'{name}{{scanner="{scanner}",modality="CT"}} {v} {t}' for t in history)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fleet_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    require(prometheus_available(), "promtool and prometheus (Debian package prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    server = PrometheusServer(rule_files=RULES, workdir=work)
    now = int(time.time())
    metrics = work / "fleet.om"
    metrics.write_text(_openmetrics(now))
    done = promtool("tsdb", "create-blocks-from", "openmetrics", str(metrics), str(server.data))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    server.start()
    try:
        deadline = time.monotonic() + 60
        ready = (
            "scanner:gateway_qc_scanner_air_mean:fleet_mads"
            " and scanner:gateway_qc_scanner_noise:median7d_1d_ago"
        )
        while not server.query(ready):
            assert time.monotonic() < deadline, "the rules recorded nothing"
            time.sleep(0.5)
        yield server
    finally:
        server.close()


def test_every_dashboard_query_returns_data(fleet_prometheus: PrometheusServer) -> None:
    dash = _dashboard()
    everything = {"modality": ".*", "scanner": ".*", "instance": ".*", "datasource": "prometheus"}
    # Rule groups are evaluated one after another: on a loaded machine a recorded series may
    # appear a few evaluations after the first ones the fixture waited for.
    deadline = time.monotonic() + 90
    for title, target in _targets(dash):
        expr = _substitute(target["expr"], everything)
        while not fleet_prometheus.query(expr) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert fleet_prometheus.query(expr), (title, target["refId"], expr)
        end = time.time()
        matrix = fleet_prometheus.api("query_range", query=expr, start=end - 3600, end=end, step=60)
        assert matrix["result"], (title, target["refId"], expr)
    one = {**everything, "scanner": "SCN-00000000000D"}
    for _title, target in _targets(dash):
        if "$scanner" in target["expr"]:
            for series in fleet_prometheus.query(_substitute(target["expr"], one)):
                assert series["metric"].get("scanner", "SCN-00000000000D") == "SCN-00000000000D"


def test_dashboard_variables_list_the_fleet(fleet_prometheus: PrometheusServer) -> None:
    values = {}
    for name, var in _variables(_dashboard()).items():
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
        assert m, name
        selector = _substitute(m.group(1), {"modality": ".*"})
        values[name] = fleet_prometheus.api(f"label/{m.group(2)}/values", **{"match[]": selector})
    assert values == {"modality": ["CT"], "scanner": sorted(SCANNERS), "instance": list(BOXES)}


def test_the_detuned_scanner_stands_out_in_the_recorded_series(
    fleet_prometheus: PrometheusServer,
) -> None:
    mads = {
        s["metric"]["scanner"]: float(s["value"][1])
        for s in fleet_prometheus.query("scanner:gateway_qc_scanner_air_mean:fleet_mads")
    }
    assert mads["SCN-00000000000D"] == pytest.approx(30.0)  # 120 HU / a 4 HU floor
    assert max(v for k, v in mads.items() if k != "SCN-00000000000D") <= 1.0
