"""The helpers scripts/container-test runs inside containers: the Orthanc stand-in's environment
mapping (the orthancteam image's convention) and the de-identification check of the outputs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.container import dicomcheck

HERE = Path(__file__).resolve().parent


def load_entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "orthanc_entrypoint", HERE / "orthanc" / "entrypoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_orthanc_standin_maps_the_compose_environment() -> None:
    cfg = load_entrypoint().config(
        {
            "DICOM_WEB_PLUGIN_ENABLED": "true",
            "ORTHANC__NAME": "gateway-agent-orthanc",
            "ORTHANC__AUTHENTICATION_ENABLED": "true",
            "ORTHANC__REGISTERED_USERS": '{"gateway": "s3cret"}',
            "ORTHANC__DICOM_WEB__ENABLE": "true",
            "ORTHANC__DICOM_WEB__ROOT": "/dicom-web/",
            "PATH": "/usr/bin",
        }
    )
    assert cfg["Name"] == "gateway-agent-orthanc"
    assert cfg["AuthenticationEnabled"] is True
    assert cfg["RegisteredUsers"] == {"gateway": "s3cret"}
    assert cfg["DicomWeb"] == {"Enable": True, "Root": "/dicom-web/"}
    assert cfg["Plugins"] == ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"]
    assert "Path" not in cfg
    assert load_entrypoint().config({})["Plugins"] == []


def test_dicomcheck_passes_deidentified_files_and_catches_phi(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    dicomcheck.make(raw, 3, "T")
    found = dicomcheck.problems(raw, 3, [])
    assert any("PHIMRN4711" in p for p in found)
    assert any("PatientIdentityRemoved" in p for p in found)

    out = tmp_path / "out"
    secret = tmp_path / "secret"
    secret.write_bytes(b"k" * 32)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway_agent",
            "anonymize",
            str(raw),
            "-o",
            str(out),
            "-j",
            "1",
            "--secret-file",
            str(secret),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert dicomcheck.problems(out, 3, []) == []
    assert dicomcheck.main(["check", str(out), "3"]) == 0
    assert any("expected 4" in p for p in dicomcheck.problems(out, 4, []))
    log = tmp_path / "agent.log"
    log.write_text('{"event": "x", "name": "PHIDOE"}\n')
    assert dicomcheck.problems(out, 3, [log]) == ["agent.log: PHI marker PHIDOE"]
    assert dicomcheck.main(["nonsense"]) == 2
