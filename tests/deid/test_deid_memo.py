"""Per-engine memos (dispatch, keyed values, scrub results) never carry one file into another."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gateway_agent.deid import Deidentifier, DeidOptions
from gateway_agent.synthetic import Patient, make_ct_slice, write_series

SECRET = b"m" * 32


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_engine_gives_what_fresh_engines_give(tmp_path: Path) -> None:
    """Files of two patients, interleaved through one engine, equal one engine per file."""
    alice = Patient(name="ALPHA^ANNE", patient_id="ALPHA0001", birth_date="19600101")
    bob = Patient(name="BRAVO^BERT", patient_id="BRAVO0002", birth_date="19700202")
    datasets = [
        make_ct_slice(patient=p, study_seed=p.patient_id, instance_number=i, rows=8, cols=8)
        for i in (1, 2)
        for p in (alice, bob)
    ]
    for ds in datasets:  # the same text in both patients' files: each scrubs its own name
        ds.SeriesDescription = "ALPHA BRAVO"
    inputs = write_series(datasets, tmp_path / "in")
    options = DeidOptions(burned_in="allow")
    shared = Deidentifier(SECRET, options, station_name="EDGE01")
    for round_ in range(2):  # the second round runs on warm memos
        for i, src in enumerate(inputs):
            got = shared.deidentify_file(src, tmp_path / f"shared{round_}-{i}", fsync=False)
            fresh = Deidentifier(SECRET, options, station_name="EDGE01").deidentify_file(
                src, tmp_path / f"fresh{round_}-{i}", fsync=False
            )
            assert _digest(got.path) == _digest(fresh.path)
            assert got.audit == fresh.audit
            own = alice if i % 2 == 0 else bob
            data = got.path.read_bytes()
            for word in (own.name.split("^")[0], own.patient_id):
                assert word.encode() not in data
