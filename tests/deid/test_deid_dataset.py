"""``anonymize_dataset`` as a library user calls it: shared key, in-memory datasets, errors."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway_agent import REASONS, DeidError, anonymize_dataset
from gateway_agent._exceptions import IngestError
from gateway_agent.synthetic import make_ct_series


def _in_memory(patient_id: str = "12345", sop: str | None = None) -> FileDataset:
    """A Dataset built as the seed's walkthrough builds one: UIDs only in the file meta."""
    meta = pydicom.Dataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^John"
    ds.PatientID = patient_id
    ds.StudyDate = "20230601"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
    return ds


def test_calls_without_a_key_share_one_key() -> None:
    first, second = make_ct_series(2, rows=8, cols=8)
    anonymize_dataset(first)
    anonymize_dataset(second)
    assert first.PatientID == second.PatientID
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID


def test_in_memory_dataset_takes_its_uids_from_the_file_meta() -> None:
    sop = generate_uid()
    ds = anonymize_dataset(_in_memory(sop=sop), secret=b"s" * 32)
    assert ds.SOPInstanceUID != sop and ds.SOPInstanceUID.startswith("2.25.")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID.startswith("2.25.") and ds.SeriesInstanceUID.startswith("2.25.")
    assert ds.PatientIdentityRemoved == "YES"


def test_generated_study_and_series_uids_are_keyed_and_deterministic() -> None:
    a = anonymize_dataset(_in_memory(), secret=b"s" * 32)
    b = anonymize_dataset(_in_memory(), secret=b"s" * 32)  # another slice of the same study
    other_key = anonymize_dataset(_in_memory(), secret=b"t" * 32)
    other_patient = anonymize_dataset(_in_memory(patient_id="999"), secret=b"s" * 32)
    assert (a.StudyInstanceUID, a.SeriesInstanceUID) == (b.StudyInstanceUID, b.SeriesInstanceUID)
    assert a.StudyInstanceUID != other_key.StudyInstanceUID
    assert a.StudyInstanceUID != other_patient.StudyInstanceUID


def test_a_dataset_without_any_sop_instance_uid_is_refused_with_a_detail() -> None:
    ds = _in_memory()
    del ds.file_meta.MediaStorageSOPInstanceUID
    with pytest.raises(DeidError) as exc:
        anonymize_dataset(ds)
    assert exc.value.reason == "no_sop_instance_uid"
    assert exc.value.detail


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_every_refusal_has_a_detail(reason: str) -> None:
    assert DeidError(reason).detail == REASONS[reason]
    assert str(DeidError(reason)) == f"{reason}: {REASONS[reason]}"
    assert IngestError("something_new").detail == "something new"
    assert DeidError(reason, "more").detail == "more"


#: Python lines that write ``n`` small synthetic CT slices into a new temporary folder ``d``.
_SERIES_IN_D = (
    "from gateway_agent.synthetic import make_ct_series, write_series\n"
    "import pathlib, tempfile\n"
    "d = pathlib.Path(tempfile.mkdtemp())\n"
    "write_series(make_ct_series({n}, rows=32, cols=32), d)\n"
)


def _in_a_fresh_interpreter(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in a new process; it must succeed (its output is returned)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def test_used_as_a_library_nothing_is_printed(tmp_path: object) -> None:
    """run_qc in a fresh interpreter (no logging configured): stdout and stderr stay empty."""
    code = (
        "from gateway_agent import run_qc, anonymize_dataset\n"
        + _SERIES_IN_D.format(n=4)
        + "records, matrix, labels, s = run_qc(d, n_clusters=2)\n"
        "assert len(records) == 4\n"
    )
    done = _in_a_fresh_interpreter(code)
    assert (done.stdout, done.stderr) == ("", "")


def test_library_events_go_to_the_standard_logging_tree(tmp_path: object) -> None:
    """With logging configured by the application, the events arrive on ``gateway_agent``."""
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s %(levelname)s %(message)s')\n"
        "from gateway_agent import run_qc\n"
        + _SERIES_IN_D.format(n=2)
        + "run_qc(d, n_clusters=1)\n"
    )
    done = _in_a_fresh_interpreter(code)
    assert done.stdout == ""
    assert "gateway_agent INFO event='qc_scanned'" in done.stderr
    assert logging.getLogger("gateway_agent").level == logging.NOTSET  # nothing set on import
