"""``anonymize``: settings without pydantic, what its process imports, forked workers."""

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
from gateway_agent.cli import build_parser, deid_cmds, main
from gateway_agent.deid.keys import Keys
from gateway_agent.deid.profile import DeidOptions, load_rows
from gateway_agent.dicom import dictionary
from gateway_agent.synthetic import make_ct_series, write_series

FLAG_SETS: list[list[str]] = [
    [],
    ["--retain-uids", "--no-clean-descriptors"],
    ["--retain-long-full-dates"],  # with the default Modified Dates: Full Dates wins
    ["--no-retain-long-modified-dates", "--retain-safe-private", "--clean-graphics"],
    ["--allow-burned-in", "--station-name", "X1", "--secret-file", "k/s.key"],
    ["--station-name", ""],  # empty: the unit name
    ["--burned-in", "quarantine"],
    ["--burned-in", "allow", "--retain-uids"],
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
    return build_parser().parse_args(["anonymize", "in", "-o", "out", *flags])


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
    assert deid_cmds.DEFAULT_CONFIG_FILE == config.DEFAULT_CONFIG_FILE
    assert settings.unit_name == deid_cmds.DEFAULT_UNIT_NAME
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
    assert fast == deid_cmds._loaded_settings(args, overrides)


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


def test_anonymize_process_imports_no_heavy_library(tmp_path: Path) -> None:
    """The start-up shortcuts that stay (each saves more than 3 % of a 1,000-slice run).

    pydantic (the settings, when no configuration is given), pydicom and numpy (the header-only
    path reads the data dictionary module alone), and the imaging, QC and upload libraries.
    """
    if config.DEFAULT_CONFIG_FILE.is_file():
        pytest.skip("a system config file is installed")
    src = tmp_path / "in"
    write_series(make_ct_series(2, rows=16, cols=16), src)
    heavy = ["pydantic", "numpy", "pydicom", "httpx", "sklearn", "matplotlib", "scipy"]
    code = (
        "import sys; from gateway_agent.cli import main; "
        f"status = main(['anonymize', {str(src)!r}, '-o', {str(tmp_path / 'o')!r}]); "
        f"print(status, [m for m in {heavy!r} if m in sys.modules])"
    )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    env["GATEWAY_STATE_DIR"] = str(tmp_path / "state")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.splitlines()[-1] == "0 []"
    assert len(list((tmp_path / "o").iterdir())) == 2


def test_dictionary_equals_pydicoms() -> None:
    from pydicom.datadict import DicomDictionary, keyword_for_tag

    for tag, entry in DicomDictionary.items():
        assert dictionary.vr_of(tag) == entry[0].split(" or ")[0]
        assert dictionary.keyword_of(tag) == entry[4]
        assert dictionary.is_known(tag)
    for tag in (0x60003000, 0x601E0010, 0x50000005, 0x50023000, 0x10000000):
        assert dictionary.keyword_of(tag) == keyword_for_tag(tag)
    assert not dictionary.is_known(0x00091001)
    assert dictionary.vr_of(0x00090010) == "LO"
    assert len(load_rows()) == 621


def test_keys_hmac_is_hmac_sha256() -> None:
    for size in (16, 63, 64, 65, 200):
        secret = bytes(range(size % 256)) * (size // 256 + 1)
        secret = secret[:size] if len(secret) >= size else secret.ljust(size, b"x")
        for value in (b"", b"1.2.3", b"x" * 300):
            expected = hmac.new(secret, b"uid|" + value, hashlib.sha256).digest()
            assert Keys(secret).digest(b"uid", value) == expected


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

    def dies_in_child(paths: list[Path], *rest: Any) -> Any:
        if os.getpid() != parent:
            os._exit(3)
        return real(paths, *rest)

    monkeypatch.setattr(deid_cmds, "_process", dies_in_child)
    from gateway_agent.deid import Deidentifier

    deid_cmds._init_worker(Deidentifier(b"k" * 32))
    files = sorted(src.iterdir())
    results = deid_cmds._run_forked(
        files, tmp_path / "out", 2, False, False, deid_cmds._Progress(len(files))
    )
    assert len(results) == len(files)
    failed = [r for r in results if r.outcome == "failed"]
    assert all(r.reason == "worker_died" for r in failed)
    assert len(failed) in (0, 1)  # chunks of one file here; the child dies on its first
    assert sum(r.outcome == "done" for r in results) == len(files) - len(failed)


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
