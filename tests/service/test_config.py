"""Configuration: precedence of the layers, error messages, `config show` sources and masking,
`config check` exit status, and the annotated example file kept in sync with Settings."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway_agent._exceptions import ConfigError
from gateway_agent.cli import main
from gateway_agent.cli.config_cmds import config_problems
from gateway_agent.config import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway-agent.toml"
SECRET = "hunter2-s3cr3t-value"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(var)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every setting; a list of sections (``[[destinations]]``) is one key."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += leaves(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


# --- precedence ------------------------------------------------------------------------------


def test_precedence_default_file_env_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = write(tmp_path, "", "empty.toml")
    assert load_settings(empty).metrics.port == 9464  # default
    cfg = write(tmp_path, "[metrics]\nport = 1001\n")
    assert load_settings(cfg).metrics.port == 1001  # file beats default
    monkeypatch.setenv("GATEWAY_METRICS__PORT", "1002")
    assert load_settings(cfg).metrics.port == 1002  # env beats file
    assert load_settings(cfg, {"metrics.port": 1003}).metrics.port == 1003  # flag beats env
    assert load_settings(cfg, {"metrics.port": None}).metrics.port == 1002  # unset flag: no-op


def test_layers_merge_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, '[destination]\nkind = "dicomweb"\nurl = "http://127.0.0.1:1/dw"\n')
    monkeypatch.setenv("GATEWAY_DESTINATION__TIMEOUT_SECONDS", "5")
    s = load_settings(cfg, {"destination.batch_max_instances": 7})
    assert (s.destination.kind, s.destination.url) == ("dicomweb", "http://127.0.0.1:1/dw")
    assert s.destination.timeout_seconds == 5.0
    assert s.destination.batch_max_instances == 7


# --- error messages --------------------------------------------------------------------------


def test_one_clear_line_per_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path,
        'unit_nam = "X"\n[destination]\nkind = "ftp"\ntimeout_seconds = -1\n'
        f'password = "{SECRET}"\n[metrics]\nport = 70000\n',
    )
    monkeypatch.setenv("GATEWAY_LOG__LEVEL", "loud")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, {"qc.n_clusters": 0})
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 6, lines
    text = str(info.value)
    kind = "destination.kind: Input should be 'folder', 'dicomweb', 'dicom' or 's3'"
    assert f"{kind} (got 'ftp') [from the config file]" in text
    assert "destination.timeout_seconds: Input should be greater than 0 (got -1)" in text
    assert "metrics.port: Input should be less than or equal to 65535 (got 70000)" in text
    assert (
        "qc.n_clusters: Input should be greater than or equal to 1 (got 0) [from the command line]"
        in text
    )
    assert "(got 'loud') [from GATEWAY_LOG__LEVEL]" in text
    assert re.search(r"unit_nam: unknown setting \(allowed here: inbox, state_dir, unit_name", text)
    assert SECRET not in text


def test_cross_field_rules(tmp_path: Path) -> None:
    empty = write(tmp_path, "")
    cases = {
        "destination.kind": ("dicomweb", "destination.url is required"),
        "destination.auth": ("basic", "needs destination.username and destination.password"),
        "originals": ("archive", "archive_dir is required"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_settings(empty, {key: value})
    with pytest.raises(ConfigError, match=r"needs destination\.token"):
        load_settings(empty, {"destination.auth": "bearer"})
    with pytest.raises(ConfigError, match="not both"):
        load_settings(empty, {"destination.password": "x", "destination.password_file": "/x"})


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(write(tmp_path, "[metrics\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


# --- config show -----------------------------------------------------------------------------


def test_show_sources_and_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(tmp_path, '[destination]\nauth = "basic"\nusername = "u"\n[qc]\nn_clusters = 3\n')
    monkeypatch.setenv("GATEWAY_DESTINATION__PASSWORD", SECRET)
    monkeypatch.setenv("GATEWAY_DESTINATION", json.dumps({"timeout_seconds": 9}))
    assert main(["--config", str(cfg), "--log-format", "json", "config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    doc = json.loads(out)
    assert doc["config_file"] == str(cfg)
    table = doc["settings"]
    assert set(table) == set(leaves(Settings))
    assert table["destination.password"] == {
        "value": "********",
        "source": "env",
        "env": "GATEWAY_DESTINATION__PASSWORD",
    }
    assert table["destination.timeout_seconds"]["source"] == "env"  # from a JSON section value
    assert table["destination.timeout_seconds"]["value"] == 9.0
    assert table["qc.n_clusters"] == {"value": 3, "source": "file"}
    assert table["log.format"] == {"value": "json", "source": "flag"}
    assert table["metrics.port"] == {"value": 9464, "source": "default"}

    assert main(["--config", str(cfg), "config", "show"]) == 0
    text = capsys.readouterr().out
    assert SECRET not in text
    assert re.search(
        r'^destination\.password += "\*{8}" +# env GATEWAY_DESTINATION__PASSWORD$', text, re.M
    )
    assert re.search(r"^qc\.n_clusters += 3 +# file$", text, re.M)


def test_url_credentials_are_refused_without_echoing_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            write(tmp_path, ""),
            {"destination.kind": "dicomweb", "destination.url": f"https://u:{SECRET}@pacs/dw"},
        )
    assert "must not carry credentials" in str(exc.value)
    assert SECRET not in str(exc.value)


def test_show_invalid_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, "[metrics]\nport = -5\n")
    assert main(["--config", str(cfg), "config", "show"]) == 2
    assert "metrics.port" in capsys.readouterr().err


# --- config check ----------------------------------------------------------------------------


def test_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(
        tmp_path,
        f'inbox = "{tmp_path / "inbox"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[destination]\nfolder = "{tmp_path / "out"}"\n',
    )
    assert main(["--config", str(cfg), "config", "check"]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_check_invalid_exits_2_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(tmp_path, '[destination]\nkind = "ftp"\n[metrics]\nport = 70000\n')
    assert main(["--config", str(cfg), "config", "check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "gateway-agent: invalid configuration:"
    assert [line.split(":")[0].strip() for line in err[1:]] == ["destination.kind", "metrics.port"]


def test_check_environment_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "inbox").write_text("not a folder")
    state = tmp_path / "state"
    state.mkdir()
    secret = state / "secret.key"
    secret.write_bytes(b"k" * 32)
    secret.chmod(0o644)
    cfg = write(
        tmp_path,
        f'inbox = "{tmp_path / "inbox"}"\nstate_dir = "{state}"\n'
        f'[destination]\nfolder = "{tmp_path / "out"}"\nauth = "basic"\nusername = "u"\n'
        f'password_file = "{tmp_path / "missing-password"}"\n',
    )
    assert main(["--config", str(cfg), "config", "check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "gateway-agent: configuration has 3 problem(s):"
    assert err[1].strip().startswith("inbox: ") and "is not a folder" in err[1]
    assert err[2].strip().startswith("destination.password_file: ") and "does not exist" in err[2]
    assert err[3].strip().startswith("deid.secret_file: ") and "mode 0644" in err[3]
    secret.chmod(0o600)
    s = load_settings(cfg)
    assert len(config_problems(s)) == 2


# --- the annotated example -------------------------------------------------------------------


def test_example_config_is_valid_and_documents_every_setting() -> None:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    load_settings(EXAMPLE)  # valid as shipped
    # Every key, set or shown commented out, under its own [section].
    section = ""
    seen: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"^\[([\w.]+)\]", line)
        if m:
            section = m.group(1) + "."
            continue
        if re.match(r"^# \[\[destinations\]\]", line):
            seen.add("destinations")  # shown by example, with the keys of [destination]
            break
        m = re.match(r"^#? ?(\w+) = ", line)
        if m:
            seen.add(section + m.group(1))
    missing = sorted(set(leaves(Settings)) - seen)
    assert not missing, f"config/gateway-agent.toml does not document: {missing}"
    unknown = sorted(seen - set(leaves(Settings)))
    assert not unknown, f"config/gateway-agent.toml documents unknown settings: {unknown}"
    assert "password" not in doc.get("destination", {})  # no secret in the example


def test_run_refuses_to_start_half_configured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write(tmp_path, '[destination]\nkind = "dicomweb"\n')  # url missing
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    args = ["--config", str(cfg), "run", "--state-dir", str(state), "--inbox", str(inbox)]
    assert main(args) == 2
    assert "destination.url is required" in capsys.readouterr().err
    assert not state.exists() and not inbox.exists()  # nothing was started or created


# --- the first hour: what `run` refuses, `config check` refuses, in one line each ------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GATEWAY_DESTINATION": "{bad json"}, "GATEWAY_DESTINATION: not valid JSON"),
        (
            {"GATEWAY_INBX": "/srv/in"},
            "GATEWAY_INBX: unknown setting [from the environment] (did you mean GATEWAY_INBOX?)",
        ),
        (
            {
                "GATEWAY_DESTINATION__URL": f"https://u:{SECRET}@pacs/dw",
                "GATEWAY_DESTINATION__KIND": "dicomweb",
            },
            "must not carry credentials",
        ),
        ({"GATEWAY_DESTINATION__TOKEN": SECRET}, "destination.token is set but destination.auth"),
    ],
)
@pytest.mark.parametrize("command", [["config", "check"], ["run"], ["status"]])
def test_environment_mistakes_exit_2_with_one_line(
    env: dict[str, str],
    expected: str,
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and SECRET not in err
