"""``anonymize`` start-up shortcuts: settings without pydantic, cached tables, lean parser, fork."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway_agent import config
from gateway_agent.cli import _command_of, build_parser, deid_cmds, main, settings_from_args
from gateway_agent.deid import keys as keys_module
from gateway_agent.deid.keys import Keys
from gateway_agent.deid.profile import DeidOptions, _parse_table, load_rows
from gateway_agent.dicom import dictionary, tablecache
from gateway_agent.synthetic import make_ct_series, write_series

FLAG_SETS: list[list[str]] = [
    [],
    ["--retain-uids", "--no-clean-descriptors"],
    ["--retain-long-full-dates"],  # with the default Modified Dates: Full Dates wins
    ["--no-retain-long-modified-dates", "--retain-safe-private", "--clean-graphics"],
    ["--allow-burned-in", "--station-name", "X1", "--secret-file", "k/s.key"],
    ["--station-name", ""],  # empty: the unit name
    ["--retain-device-identity", "--retain-institution-identity"],
    ["--retain-patient-characteristics", "--clean-structured-content"],
]
ENVIRONMENTS: list[dict[str, str]] = [
    {},
    {"GATEWAY_STATE_DIR": "/var/lib/gw"},
    {"gateway_state_dir": "rel/state"},
    {"GATEWAY_STATE_DIR": ""},
]


def _args(flags: list[str]) -> argparse.Namespace:
    return build_parser(only="deid").parse_args(["anonymize", "in", "-o", "out", *flags])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(var)


def test_option_defaults_match_the_settings() -> None:
    settings = config.DeidSettings()
    assert set(DeidOptions.FIELDS) <= set(type(settings).model_fields)
    for name in DeidOptions.FIELDS:
        assert getattr(DeidOptions(), name) == getattr(settings, name), name


def test_anonymize_defaults_match_the_settings(clean_env: None) -> None:
    settings = config.Settings()
    # Plain strings on the command's side (no pathlib there): equal as paths.
    assert Path(deid_cmds.DEFAULT_CONFIG_FILE) == config.DEFAULT_CONFIG_FILE
    assert settings.state_dir == Path(deid_cmds.DEFAULT_STATE_DIR)
    assert settings.unit_name == deid_cmds.DEFAULT_UNIT_NAME
    assert settings.secret_file == Path(deid_cmds.DEFAULT_STATE_DIR) / "secret.key"
    assert settings.station_name == deid_cmds.DEFAULT_UNIT_NAME


@pytest.mark.parametrize("env", ENVIRONMENTS)
@pytest.mark.parametrize("flags", FLAG_SETS)
def test_fast_settings_equal_load_settings(
    flags: list[str], env: dict[str, str], clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if config.DEFAULT_CONFIG_FILE.is_file():
        pytest.skip("a system config file is installed")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = _args(flags)
    overrides = deid_cmds._overrides(args)
    fast = deid_cmds._default_settings(args, overrides)
    assert fast is not None
    settings = settings_from_args(args, overrides)
    slow = (DeidOptions.from_settings(settings.deid), settings.secret_file, settings.station_name)
    assert (fast[0], Path(fast[1]), fast[2]) == slow


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        (["--station-name", "X" * 17], {}),  # invalid: load_settings reports it
        ([], {"GATEWAY_UNIT_NAME": "EDGE02"}),
        ([], {"GATEWAY_DEID__RETAIN_UIDS": "true"}),
        ([], {"GATEWAY_STATE_DIR": "a", "gateway_state_dir": "b"}),
    ],
)
def test_fast_settings_step_aside(
    flags: list[str], env: dict[str, str], clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = _args(flags)
    assert deid_cmds._default_settings(args, deid_cmds._overrides(args)) is None
    with_config = _args(flags)
    with_config.config = Path("x.toml")
    assert deid_cmds._default_settings(with_config, deid_cmds._overrides(with_config)) is None


def test_unit_name_from_the_environment_reaches_the_output(
    tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    write_series(make_ct_series(2, rows=16, cols=16), src)
    monkeypatch.setenv("GATEWAY_UNIT_NAME", "EDGE02")
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "state"))
    assert main(["anonymize", str(src), "-o", str(tmp_path / "out"), "-j", "1"]) == 0
    assert (tmp_path / "state" / "secret.key").is_file()
    out = next((tmp_path / "out").iterdir()).read_bytes()
    assert b"EDGE02" in out


def test_anonymize_process_stays_light(tmp_path: Path) -> None:
    """The console command imports neither pydantic nor any other heavy library.

    Nor typing and dataclasses (with inspect): together ~9 ms of every run's start-up; nor
    argparse for a plain command line (~4 ms with its gettext look-ups); nor pathlib (with
    urllib.parse and ipaddress, ~3 ms) and datetime.py (~1 ms; the C ``_datetime`` does).
    """
    if config.DEFAULT_CONFIG_FILE.is_file():
        pytest.skip("a system config file is installed")
    src = tmp_path / "in"
    write_series(make_ct_series(2, rows=16, cols=16), src)
    # The console command ends in os._exit (no interpreter teardown): report from there.
    code = (
        "import os, sys; from gateway_agent.cli import main; "
        f"sys.argv = ['gateway-agent', 'anonymize', {str(src)!r}, '-o', {str(tmp_path / 'o')!r}]; "
        "heavy = ('pydantic', 'pydantic_settings', 'structlog', 'numpy', 'pydicom', 'httpx', "
        "'sklearn', 'matplotlib', 'scipy', 'multiprocessing', 'tempfile', 'hashlib', 'json', "
        "'typing', 'dataclasses', 'inspect', 'argparse', 'pathlib', 'datetime'); "
        "exit_now = os._exit; "
        "os._exit = lambda status: (print(status, [m for m in heavy if m in sys.modules]), "
        "sys.stdout.flush(), exit_now(status)); "
        "main(); print('main returned')"
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["GATEWAY_STATE_DIR"] = str(tmp_path / "state")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    runs = []
    for _ in range(2):  # the first creates the secret and the cached tables, the second reads them
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        runs.append(
            (
                done.stdout.splitlines()[-1],
                {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()},
            )
        )
    assert len(runs[0][1]) == 2
    assert runs[1] == ("0 []", runs[0][1])
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "gateway-agent").iterdir())
    assert cached == ["annex", "dicom"]


# -- cached tables ----------------------------------------------------------------------------


def test_cached_table_rebuilds_when_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "source.txt"
    source.write_text("1")
    builds: list[int] = []

    def build() -> dict[int, Any]:
        builds.append(1)
        return {1: ("a", [2, 3]), 2: source.read_text()}

    first = tablecache.cached_table("t", [source], build)
    assert tablecache.cached_table("t", [source], build) == first
    assert len(builds) == 1
    source.write_text("22")
    assert tablecache.cached_table("t", [source], build)[2] == "22"
    assert len(builds) == 2
    entries = list((tmp_path / "cache" / "gateway-agent").glob("t-*.marshal"))
    assert len(entries) == 1  # the stale entry is gone
    entries[0].write_bytes(b"not marshal")
    assert tablecache.cached_table("t", [source], build)[2] == "22"
    assert len(builds) == 3
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("HOME")
    assert tablecache.cached_table("t", [source], build)[2] == "22"  # nowhere to cache: builds


def test_cached_tables_equal_their_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = dictionary._build_vr_tables()
    for _ in range(2):  # built, then read back
        dictionary._vr_tables.cache_clear()
        assert dictionary._vr_tables() == built
        assert (
            tablecache.cached_table(
                "annex-e-rows",
                [Path(dictionary.__file__)],
                _parse_table,
            )
            == _parse_table()
        )
    load_rows.cache_clear()
    assert len(load_rows()) == 621
    main_table, repeaters = dictionary._tables()
    for tag, entry in main_table.items():
        assert dictionary.vr_of(tag) == entry[0].split(" or ")[0]
        assert dictionary.is_known(tag)
    for mask, value, _ in repeaters:
        for fill in (0, 0x12345678, 0xFFFFFFFF):
            tag = value | (fill & ~mask & 0xFFFFFFFF)
            full = dictionary._entry(tag)
            assert dictionary._vr_entry(tag) == (full[0] if full else None)
    assert not dictionary.is_known(0x00091001)
    assert dictionary.vr_of(0x00090010) == "LO"


def test_keys_hmac_is_hmac_sha256() -> None:
    assert keys_module.sha256(b"abc").digest() == hashlib.sha256(b"abc").digest()
    for size in (16, 63, 64, 65, 200):
        secret = bytes(range(size % 256)) * (size // 256 + 1)
        secret = secret[:size] if len(secret) >= size else secret.ljust(size, b"x")
        for value in (b"", b"1.2.3", b"x" * 300):
            expected = hmac.new(secret, b"uid|" + value, hashlib.sha256).digest()
            assert Keys(secret).digest(b"uid", value) == expected


# -- parser -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["anonymize", "a", "b", "-o", "o", "-j", "3", "--retain-uids", "--audit", "x.jsonl"],
        ["--config", "c.toml", "anonymize", "a", "-o", "o", "--no-clean-descriptors"],
        ["--log-format=json", "inspect", "f.dcm", "--json"],
    ],
)
def test_lean_parser_parses_like_the_full_one(argv: list[str]) -> None:
    assert _command_of(argv) in ("anonymize", "inspect")
    assert vars(build_parser(only="deid").parse_args(argv)) == vars(build_parser().parse_args(argv))


_EVERY_FLAG = [flag for _, flag, _ in deid_cmds._OPTION_FLAGS]


@pytest.mark.parametrize(
    "words",
    [
        ["a", "-o", "o"],
        ["-o", "o", "a", "b", "c"],
        ["a", "b", "--output", "o", "--jobs", "3", "-j", "1"],  # the last value wins
        ["a", "-o", "", "--station-name", "", "--secret-file", "s.key", "--audit", "x.jsonl"],
        ["a", "-o", "o", "--fsync", "--allow-burned-in", "-j", " 2"],  # int() takes " 2"
        ["a", "-o", "o", *_EVERY_FLAG],
        ["a", "-o", "o", *("--no-" + f[2:] for f in _EVERY_FLAG)],
        ["a", "-o", "o", "--retain-uids", "--no-retain-uids", "--clean-graphics"],
        *(["x", "-o", "o", *flags] for flags in FLAG_SETS),
    ],
)
def test_plain_anonymize_line_parses_as_argparse_does(words: list[str]) -> None:
    """``main`` skips argparse for a plain ``anonymize`` line: the arguments are the same."""
    lean = deid_cmds.parse_anonymize(words)
    assert lean is not None
    assert vars(lean) == vars(build_parser().parse_args(["anonymize", *words]))


@pytest.mark.parametrize(
    "words",
    [
        [],
        ["a"],  # no -o: argparse reports it
        ["-o", "o"],  # no source
        ["a", "-o"],  # value missing
        ["a", "-o", "o", "b"],  # sources in two runs: argparse refuses "b"
        ["a", "--output=o"],
        ["a", "--out", "o"],  # an abbreviation
        ["a", "-oo"],
        ["a", "-o", "o", "-j", "two"],
        ["a", "-o", "o", "-j", "-1"],  # a value starting with "-"
        ["a", "-o", "o", "--bogus"],
        ["a", "-o", "o", "-h"],
        ["a", "-o", "o", "--"],
        ["", "-o", "o"],
        ["-", "-o", "o"],
    ],
)
def test_other_anonymize_lines_are_left_to_argparse(words: list[str]) -> None:
    assert deid_cmds.parse_anonymize(words) is None


def test_main_reports_a_bad_anonymize_line_as_argparse_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["anonymize", "a", "-o", "o", "-j", "two"])
    assert exc.value.code == 2
    assert "argument -j/--jobs: invalid int value: 'two'" in capsys.readouterr().err


def test_command_word() -> None:
    assert _command_of(["--config", "anonymize", "run"]) == "run"
    assert _command_of(["--conf", "x", "anonymize"]) is None  # abbreviations: the full parser
    assert _command_of(["-h"]) is None
    assert _command_of([]) is None


# -- forked workers -----------------------------------------------------------------------------


def test_forked_workers_give_the_single_process_result(tmp_path: Path) -> None:
    src = tmp_path / "in"
    write_series(make_ct_series(40, rows=16, cols=16), src)
    (src / "notes.txt").write_text("not dicom")
    secret = tmp_path / "s.key"
    outputs = {}
    for jobs in ("1", "3"):
        out = tmp_path / f"out{jobs}"
        audit = tmp_path / f"audit{jobs}.jsonl"
        argv = ["anonymize", str(src), "-o", str(out), "-j", jobs, "--secret-file", str(secret)]
        assert main([*argv, "--audit", str(audit)]) == 1  # notes.txt is quarantined
        outputs[jobs] = (
            {p.name: p.read_bytes() for p in out.iterdir()},
            [json.loads(line) for line in audit.read_text().splitlines()],
        )
    assert len(outputs["1"][0]) == 40
    assert outputs["3"] == outputs["1"]  # same files, audit lines in input order


def test_a_dead_worker_fails_its_chunk_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    write_series(make_ct_series(24, rows=16, cols=16), src)
    parent = os.getpid()
    real = deid_cmds._process

    def dies_in_child(paths: list[str], *rest: Any) -> Any:
        if os.getpid() != parent:
            os._exit(3)
        return real(paths, *rest)

    monkeypatch.setattr(deid_cmds, "_process", dies_in_child)
    from gateway_agent.deid import Deidentifier

    deid_cmds._init_worker(Deidentifier(b"k" * 32))
    files = sorted(str(p) for p in src.iterdir())
    results = deid_cmds._run_forked(
        files, str(tmp_path / "out"), 2, False, False, deid_cmds._Progress(len(files))
    )
    assert len(results) == len(files)
    failed = [r for r in results if r[0] == "failed"]
    assert all(r[1] == "worker_died" for r in failed)
    assert len(failed) in (0, 1)  # chunks of one file here; the child dies on its first
    assert sum(r[0] == "done" for r in results) == len(files) - len(failed)


# -- engine shortcuts ---------------------------------------------------------------------------


def test_one_pass_lookups_match_top() -> None:
    import random

    from gateway_agent.deid.engine import _top, _tops
    from gateway_agent.dicom.codec import Element

    rng = random.Random(7)
    tags = [0x00080005, 0x00080018, 0x00100010, 0x00100020, 0x00200010, 0x7FE00010]
    wanted = frozenset(tags[:4])
    for _ in range(500):  # sorted, unsorted and duplicated lists
        els = [Element(rng.choice(tags), "LO", b"%d" % i) for i in range(rng.randrange(8))]
        if rng.random() < 0.5:
            els.sort(key=lambda e: e.tag)
        found = _tops(els, wanted)
        for tag in wanted:
            assert found.get(tag) is _top(els, tag)


def test_token_separators_are_the_documented_class() -> None:
    import re

    from gateway_agent.deid.text import _TOKEN_SPLIT

    reference = re.compile(r"[^0-9A-Za-z\u00C0-\uFFFF]+")
    edges = [0x2F, 0x30, 0x39, 0x3A, 0x40, 0x41, 0x5A, 0x5B, 0x60, 0x61, 0x7A, 0x7B, 0xBF, 0xC0]
    probes = set(range(0x100)) | {0xD800, 0xFFFF, 0x10000, 0x10FFFF} | set(range(0, 0x110000, 97))
    for code in sorted(probes | set(edges)):
        char = chr(code)
        assert (_TOKEN_SPLIT.fullmatch(char) is None) == (reference.fullmatch(char) is None)
    text = "Dr. Müller-Łukasz, MRN#12345 / 1945-03-17 (東京)"
    assert _TOKEN_SPLIT.split(text) == reference.split(text)
