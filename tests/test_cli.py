"""The command line as a new user meets it: help, version, global options, operator errors."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_agent import __version__
from gateway_agent.cli import _commands, build_parser, main
from gateway_agent.synthetic import make_ct_series, write_series


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(var)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gateway-agent {__version__}"


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    return {p.prog.removeprefix("gateway-agent "): p for p in _commands(build_parser())}


def test_every_command_has_a_description_and_an_example() -> None:
    parsers = _command_parsers()
    assert {"run", "status", "retry", "anonymize", "inspect", "window", "cluster", "qc"} <= set(
        parsers
    )
    assert {"config show", "config check"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert parser.description, name
        assert "examples:\n  gateway-agent " in text, name
        example = text.split("examples:\n", 1)[1].splitlines()[0].split()
        assert example[1 : 1 + len(name.split())] == name.split(), name


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-format", "console", "run"],
        ["run", "--log-format", "console"],
        ["--config", "c.toml", "config", "show"],
        ["config", "show", "--config", "c.toml"],
        ["--config", "c.toml", "anonymize", "a", "-o", "o"],
        ["anonymize", "a", "-o", "o", "--config", "c.toml"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    given = {"--log-format": ("log_format", "console"), "--config": ("config", Path("c.toml"))}
    for flag, (attr, value) in given.items():
        assert getattr(args, attr) == (value if flag in argv else None)


def test_an_option_after_the_command_wins() -> None:
    args = build_parser().parse_args(["--log-format", "json", "status", "--log-format", "console"])
    assert args.log_format == "console"


def test_inspect_a_missing_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "no" / "such.dcm")]) == 1
    assert "no such file" in capsys.readouterr().err


# -- retry ------------------------------------------------------------------------------------


def test_retry_of_an_unknown_row_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway_agent.agent.outbox.store import Outbox

    Outbox(tmp_path / "state" / "outbox.db").close()
    assert main(["retry", "4242", "--state-dir", str(tmp_path / "state")]) == 1
    assert "no outbox row #4242" in capsys.readouterr().err


def test_retry_with_an_unknown_reason_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main(["retry", "--reason", "burnt_in", *state]) == 1
    err = capsys.readouterr().err
    assert "unknown reason 'burnt_in'" in err and "burned_in_annotation" in err
    assert main(["retry", "--quarantine", "--reason", "burned_in_annotation", *state]) == 0


def test_retry_of_a_quarantine_id_without_quarantine_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retry", "q-abc", "--state-dir", str(tmp_path / "state")]) == 1
    assert "--quarantine" in capsys.readouterr().err


# -- anonymize: the site secret and the report -------------------------------------------------


def test_anonymize_uses_one_per_user_key_whatever_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    write_series(make_ct_series(2, rows=16, cols=16), src)
    outputs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        assert main(["anonymize", str(src), "-o", "out", "-j", "1"]) == 0
        outputs.append(sorted(p.name for p in (tmp_path / folder / "out").iterdir()))
        assert not (tmp_path / folder / "state").exists()  # nothing created in the folder
    assert outputs[0] == outputs[1]  # the same key: the same new UIDs
    key = Path(os.environ["XDG_DATA_HOME"]) / "gateway-agent" / "secret.key"
    assert key.is_file()
    err = capsys.readouterr().err
    assert err.count(f"created the site secret {key}") == 1


def test_anonymize_with_a_configured_state_folder_uses_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    write_series(make_ct_series(1, rows=16, cols=16), src)
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "state"))
    assert main(["anonymize", str(src), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "state" / "secret.key").is_file()
    assert "created the site secret" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["report.csv", "report.jsonl"])
def test_anonymize_report_names_each_input_and_its_outcome(tmp_path: Path, name: str) -> None:
    src = tmp_path / "in"
    write_series(make_ct_series(3, rows=16, cols=16), src)
    (src / "notes.txt").write_text("not dicom")
    report = tmp_path / name
    argv = ["anonymize", str(src), "-o", str(tmp_path / "out"), "-j", "2", "--report", str(report)]
    assert main(argv) == 1
    if name.endswith(".csv"):
        with report.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in report.read_text().splitlines()]
    by_input = {Path(r["input"]).name: r for r in rows}
    assert len(rows) == 4
    assert by_input["notes.txt"]["outcome"] == "quarantined"
    assert by_input["notes.txt"]["reason"] == "not_dicom"
    outputs = {r["output"] for r in rows if r["outcome"] == "done"}
    assert outputs == {p.name for p in (tmp_path / "out").iterdir()}


def test_console_script_help_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway_agent", "anonymize", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "examples:" in done.stdout


def test_status_imports_no_plotting_or_learning_library(tmp_path: Path) -> None:
    """`status` answers in well under a second: no matplotlib, SciPy or scikit-learn."""
    code = (
        "import sys; from gateway_agent.cli import main; "
        f"status = main(['status', '--state-dir', {str(tmp_path / 'state')!r}]); "
        "print(status, [m for m in ('matplotlib', 'scipy', 'sklearn') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert done.stdout.splitlines()[-1] == "0 []"
