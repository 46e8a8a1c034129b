"""The agent delivers an ultrasound image with burned-in identity cleaned (default policy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from gateway_agent.agent.intake.quarantine import Quarantine
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.cli import main
from gateway_agent.config import Settings
from gateway_agent.synthetic_pixels import FrameSpec, make_object, write_object

from ..deid.test_pixels_screens import dose_screen
from ._agent_util import agent_settings, files_under, running_daemon, wait_until

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _audit_of_the_one_sent(state_dir: Path) -> dict[str, Any]:
    """The audit record of the outbox's one ``sent`` row (there must be exactly one)."""
    outbox = Outbox(state_dir / "outbox.db")
    try:
        (row,) = outbox.rows("sent")
        return outbox.audit(row.id)
    finally:
        outbox.close()


def test_agent_delivers_a_cleaned_ultrasound_image(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    assert settings.deid.burned_in == "clean"
    obj = make_object(FrameSpec(seed=21, kind="us"), syntax="jpeg")
    write_object(obj, settings.inbox / "us" / "IMG0001.dcm")
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 120)
    delivered = files_under(settings.destination.folder)
    assert len(delivered) == 1
    ds = pydicom.dcmread(delivered[0])
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    image = ds.pixel_array
    for line in obj.frames[0].lines:  # every line of identity is black in the delivered pixels
        if line.phi and line.ink.any():
            x0, y0, x1, y1 = line.box
            assert (image[y0:y1, x0:x1][line.ink] == 0).all(axis=-1).mean() >= 0.99
    raw = delivered[0].read_bytes()
    for value in (obj.identity.family, obj.identity.patient_id, obj.identity.accession):
        assert value.encode() not in raw
    assert not files_under(settings.state_dir / "quarantine")
    audit = _audit_of_the_one_sent(settings.state_dir)
    assert audit["pixels"]["verified"] is True and audit["pixels"]["regions"] > 0
    assert np.isclose(sum(audit["pixels"]["detectors"].values()), audit["pixels"]["regions"])


def _drain(settings: Settings) -> None:
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 120)


def test_agent_cleans_or_quarantines_a_ct_dose_screen(tmp_path: Path) -> None:
    """A dose screen saved as a CT image (GE "Dose Report", ImageType SCREEN SAVE, stating
    BurnedInAnnotation NO) is delivered with its text painted out under "clean", and kept
    in the quarantine with the rule that caught it under "quarantine"."""
    for policy in ("clean", "quarantine"):
        settings = agent_settings(tmp_path / policy, **{"deid.burned_in": policy})
        obj, made = dose_screen(tmp_path / policy)
        made.rename(settings.inbox / "IMG0001.dcm")
        _drain(settings)
        delivered = files_under(settings.destination.folder)
        entries = Quarantine(settings.state_dir / "quarantine").entries()
        if policy == "quarantine":
            assert not delivered
            (entry,) = entries
            assert (entry.reason, entry.detail) == ("burned_in_annotation", "ImageType SCREEN SAVE")
            continue
        assert not entries
        (path,) = delivered
        ds = pydicom.dcmread(path)
        assert ds.Modality == "CT" and ds.BurnedInAnnotation == "NO"
        image = ds.pixel_array
        for line in obj.frames[0].lines:
            if line.phi and line.ink.any():
                x0, y0, x1, y1 = line.box
                assert (image[y0:y1, x0:x1][line.ink] == 0).mean() >= 0.99
        raw = path.read_bytes()
        for value in (obj.identity.family, obj.identity.patient_id, obj.identity.accession):
            assert value.encode() not in raw


def test_reviewed_object_is_released_once_with_allow_burned_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ultrasound image the engine cannot clean (big endian) is quarantined; the operator
    releases that one object with --allow-burned-in: it is delivered once, recorded in its
    audit; the same file dropped again is quarantined again."""
    settings = agent_settings(tmp_path)
    original = pydicom.dcmread(TEST_FILES / "SC_rgb_small_odd_big_endian.dcm")
    original.Modality = "US"
    settings.inbox.mkdir(parents=True, exist_ok=True)
    src = settings.inbox / "IMG0001.dcm"
    original.save_as(src)
    data = src.read_bytes()
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
    (entry,) = Quarantine(settings.state_dir / "quarantine").entries()
    assert entry.reason == "burned_in_undecodable"
    state = ["--state-dir", str(settings.state_dir), "--inbox", str(settings.inbox)]

    capsys.readouterr()
    assert main(["retry", "--quarantine", "--allow-burned-in", *state]) == 1  # ids required
    assert "one by one" in capsys.readouterr().err
    assert main(["retry", "--quarantine", "--reason", "burned_in_undecodable",
                 "--allow-burned-in", entry.id, *state]) == 0  # fmt: skip
    assert "released 1" in capsys.readouterr().out
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
    (delivered,) = files_under(settings.destination.folder)
    assert pydicom.dcmread(delivered).PatientIdentityRemoved == "YES"
    audit = _audit_of_the_one_sent(settings.state_dir)
    assert audit["burned_in_allowed"] is True
    assert audit["burned_in_released"] == {
        "quarantine_id": entry.id,
        "reason": "burned_in_undecodable",
        "refused_now": "burned_in_undecodable",
    }
    assert not files_under(settings.state_dir / "quarantine-released")

    (settings.inbox / "again.dcm").write_bytes(data)  # the release was used up
    with running_daemon(settings) as d:
        assert wait_until(lambda: d.drained() and not files_under(settings.inbox), 60)
    reasons = [e.reason for e in Quarantine(settings.state_dir / "quarantine").entries()]
    assert reasons == ["burned_in_undecodable"]
