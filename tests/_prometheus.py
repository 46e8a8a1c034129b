"""A real Prometheus (Debian's binary) on a free loopback port with a throw-away TSDB, for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests._procs import free_port, log_tail, stop_process, wait_ready

__all__ = [
    "PROMETHEUS_BIN",
    "PROMTOOL_BIN",
    "RULES",
    "PrometheusServer",
    "prometheus_available",
    "promtool",
]

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN", shutil.which("prometheus") or "prometheus")
PROMTOOL_BIN = os.environ.get("PROMTOOL_BIN", shutil.which("promtool") or "promtool")
ROOT = Path(__file__).resolve().parents[1]
RULES = [
    ROOT / "deploy" / "prometheus" / "recording.rules.yml",
    ROOT / "deploy" / "prometheus" / "alerts.rules.yml",
]


def prometheus_available() -> bool:
    return shutil.which(PROMETHEUS_BIN) is not None and shutil.which(PROMTOOL_BIN) is not None


def promtool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL_BIN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class PrometheusServer:
    """One Prometheus process: ``start()`` then ``stop()`` (by its recorded PID).

    ``scrape`` maps job names to ``host:port`` targets (scraped every ``scrape_interval``);
    ``rule_files`` are evaluated every ``evaluation_interval``. ``rewrite_rules`` maps text to
    replace in copies of the rule files (tests shorten ``for:`` durations this way).
    """

    def __init__(
        self,
        *,
        scrape: dict[str, Sequence[str]] | None = None,
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        rewrite_rules: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gw-prometheus-"))
        self._own_workdir = workdir is None
        self.data = self.workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        rules = []
        for i, path in enumerate(rule_files):
            text = path.read_text()
            for old, new in (rewrite_rules or {}).items():
                text = text.replace(old, new)
            copy = self.workdir / f"{i}-{path.name}"
            copy.write_text(text)
            rules.append(str(copy))
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": scrape_interval,
                "evaluation_interval": evaluation_interval,
            },
            "rule_files": rules,
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets)}]}
                for job, targets in (scrape or {}).items()
            ],
        }
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.client = httpx.Client(base_url=self.url, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        log = (self.workdir / "prometheus.log").open("ab")
        self._proc = subprocess.Popen(
            [
                PROMETHEUS_BIN,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=30d",
                "--query.lookback-delta=5m",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        if wait_ready(self._proc, self._ready, timeout, step=0.1):
            return self
        tail = log_tail(self.workdir / "prometheus.log")
        self.stop()
        raise RuntimeError(f"Prometheus did not start on port {self.port}:\n{tail}")

    def _ready(self) -> bool:
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout=30)

    def close(self) -> None:
        self.stop()
        self.client.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the HTTP API --------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``: its ``data``; an AssertionError with Prometheus' error."""
        r = self.client.get(f"/api/v1/{path}", params=params)
        body = r.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        result = data["result"]
        return result if isinstance(result, list) else [{"value": result}]

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts
