"""Hostile files: seeded mutants of real DICOM, first straight through the engine, then dropped
into a running agent. Figures: exceptions other than IngestError, PHI in outputs, daemon crashes,
hangs (no progress for 10 s), files unaccounted for (neither sent nor quarantined), peak memory."""

from __future__ import annotations

import collections
import hashlib
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from gateway_agent._exceptions import IngestError

from ._harness import (
    AgentRun,
    assert_no_phi,
    phi_audit,
    phi_hits,
    record_figures,
    size,
)
from ._mutants import Mutant, generate

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

HANG_SECONDS = 10.0


def _engine(tmp_path: Path) -> Any:
    from gateway_agent.config import DeidSettings
    from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret

    secret = load_or_create_secret(tmp_path / "secret.key")
    return Deidentifier(secret, DeidOptions.from_settings(DeidSettings()), station_name="RELIAB")


def _run_one(engine: Any, path: Path, out: Path) -> tuple[str, Any, float]:
    """``("ok", result) | ("ingest", reason) | ("other", "Type: message")`` and seconds.

    Warnings are recorded, not raised: that is how the daemon runs (pytest makes them errors).
    """
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            result = engine.deidentify_file(path, out)
        except IngestError as exc:
            return "ingest", exc.reason, time.perf_counter() - t0
        except Exception as exc:
            return "other", f"{type(exc).__name__}: {str(exc)[:120]}", time.perf_counter() - t0
    return "ok", result, time.perf_counter() - t0


def _sweep(n: int, work: Path) -> dict[str, Any]:
    """Every mutant through one Deidentifier; outcomes, exceptions and PHI in outputs."""
    engine = _engine(work)
    src_dir, out = work / "in", work / "out"
    src_dir.mkdir()
    out.mkdir()
    repro = work / "repro"
    kinds: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    other: list[str] = []
    new_leaks: list[str] = []
    slow: list[str] = []
    ok = 0
    slowest = 0.0
    for m in generate(n, seed=1, large_mb=size(32, 256)):
        kinds[m.kind] += 1
        path = src_dir / m.name
        m.write(path)
        outcome, value, took = _run_one(engine, path, out)
        slowest = max(slowest, took)
        if took > HANG_SECONDS:
            slow.append(f"{m.name} {took:.1f}s")
        if outcome == "ok":
            ok += 1
        elif outcome == "ingest":
            reasons[str(value)] += 1
        else:
            other.append(f"{m.name}: {value}")
            repro.mkdir(exist_ok=True)
            shutil.copyfile(path, repro / m.name)
        for p in out.iterdir():
            if p.name.startswith(".") or p.suffix in (".tmp", ".partial"):
                new_leaks.append(f"{m.name}: temp file left: {p.name}")
            elif found := phi_hits(p.read_bytes()):
                new_leaks.append(f"{m.name}: {found}")
            p.unlink()
        path.unlink()
    figures = {
        "inputs": n,
        "ok": ok,
        "ingest_errors": sum(reasons.values()),
        "other_exceptions": len(other),
        "phi_in_outputs": len(new_leaks),
        "slow_inputs": len(slow),
        "slowest_s": round(slowest, 2),
        "by_kind": dict(kinds),
        "reasons": dict(reasons),
    }
    return {"figures": figures, "other": other, "new": new_leaks, "slow": slow}


@pytest.fixture(scope="module")
def engine_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _sweep(size(1000, 10000), tmp_path_factory.mktemp("sweep"))


def test_every_mutant_through_the_engine_raises_only_ingest_error(
    engine_sweep: dict[str, Any],
) -> None:
    record_figures("hostile_direct", engine_sweep["figures"])
    other, new, slow = engine_sweep["other"], engine_sweep["new"], engine_sweep["slow"]
    assert other == [], f"{len(other)} inputs escaped as non-IngestError:\n" + "\n".join(other[:30])
    assert new == [], "PHI (or temp files) in outputs:\n" + "\n".join(new[:30])
    assert slow == [], slow


# --------------------------------------------------------------------------- focused cases


def _ct_bytes(**changes: Any) -> bytes:
    import io

    from gateway_agent.synthetic import make_ct_slice

    ds = make_ct_slice(rows=16, cols=16)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deid_bytes(tmp_path: Path, data: bytes) -> bytes:
    src = tmp_path / "in.dcm"
    src.write_bytes(data)
    (tmp_path / "out").mkdir(exist_ok=True)
    result = _engine(tmp_path).deidentify_file(src, tmp_path / "out")
    return bytes(result.path.read_bytes())


def test_descriptions_cleaned_when_patient_identifiers_are_absent(tmp_path: Path) -> None:
    out = _deid_bytes(tmp_path, _ct_bytes(PatientName=None, PatientID=None))
    assert phi_hits(out) == []


def test_descriptions_cleaned_when_patient_name_is_undecodable(tmp_path: Path) -> None:
    data = _ct_bytes(SpecificCharacterSet="ISO_IR 192")
    # The name as a mis-encoded scanner would write it: invalid UTF-8 inside the family name.
    tag = b"\x10\x00\x10\x00PN\x0e\x00"  # (0010,0010) PN, length 14
    assert tag + b"PHIDOE^PHIJANE" in data
    data = data.replace(tag + b"PHIDOE^PHIJANE", tag + b"PHIDO\xc3^PHIJANE", 1)
    out = _deid_bytes(tmp_path, data)
    assert phi_hits(out) == []


def test_image_truncated_before_pixel_data_is_refused(tmp_path: Path) -> None:
    data = _ct_bytes()
    cut = data.index(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) Pixel Data tag
    with pytest.raises(IngestError) as err:
        _deid_bytes(tmp_path, data[:cut])
    assert err.value.reason == "truncated"


# --------------------------------------------------------------------------- into the daemon


def _expectations(run: AgentRun, mutants: list[Mutant]) -> dict[str, tuple[str, str | None, str]]:
    """name -> (sha256, expected output SOP UID or None if it must be quarantined, kind)."""
    engine = run.engine()
    scratch = run.root / "expected"
    scratch.mkdir()
    out: dict[str, tuple[str, str | None, str]] = {}
    for m in mutants:
        path = run.staging / m.name
        m.write(path)
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
        outcome, value, _took = _run_one(engine, path, scratch)
        uid = value.sop_instance_uid if outcome == "ok" else None
        out[m.name] = (h.hexdigest(), uid, m.kind)
        for p in scratch.iterdir():
            p.unlink()
    shutil.rmtree(scratch)
    return out


def test_mutants_dropped_into_a_running_agent(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    n = size(500, 10000)
    mutants = list(generate(n, seed=2, large_mb=size(48, 400), n_large=size(1, 2)))
    run = agent_run(overrides={"settle_seconds": 0.5})
    expect = _expectations(run, mutants)
    names = list(expect)
    crashes = hangs = 0
    run.start()
    t0 = time.monotonic()
    fed = 0
    last_progress, last_state = time.monotonic(), (-1, -1, -1)
    deadline = t0 + size(240, 3600)
    metrics = ""
    while time.monotonic() < deadline:
        if fed < len(names):
            for name in names[fed : fed + 100]:
                (run.staging / name).replace(run.inbox / name)
            fed = min(len(names), fed + 100)
        time.sleep(0.25)
        run.sample()
        if not run.agent.alive():
            crashes += 1
            run.agent.exit_codes.append(run.agent.proc.returncode if run.agent.proc else -1)
            run.start()
            continue
        inbox = len(run.inbox_files())
        counts = run.outbox_counts()
        state = (inbox, sum(counts.values()), counts.get("sent", 0))
        if state != last_state:
            last_state, last_progress = state, time.monotonic()
        elif inbox and time.monotonic() - last_progress > HANG_SECONDS:
            hangs += 1
            last_progress = time.monotonic()
        if (
            fed == len(names)
            and inbox == 0
            and counts.get("queued", 0) + counts.get("sending", 0) == 0
        ):
            break
    seconds = round(time.monotonic() - t0, 1)
    if run.agent.alive():
        metrics = run.metrics_text()
    rc = run.agent.stop()
    delivered = run.delivered_uids()
    quarantined = run.quarantined()
    left = {p.name for p in run.inbox_files()}
    unaccounted: list[str] = []
    disagreements = 0
    rows = {sop: state for sop, state, _path, _size in run.outbox_rows()}
    dead = 0
    for name, (sha, uid, kind) in expect.items():
        if name in left:
            unaccounted.append(f"{name} ({kind}): still in the inbox")
        elif uid is not None and uid in delivered:
            continue
        elif uid is not None and rows.get(uid) == "dead":
            dead += 1  # refused by the destination: dead-lettered with its reason (retryable)
            continue
        elif sha in quarantined:
            disagreements += uid is not None
            continue
        else:
            unaccounted.append(f"{name} ({kind}): neither sent nor quarantined")
    figures = {
        "inputs": n,
        "crashes": crashes,
        "hangs": hangs,
        "unaccounted": len(unaccounted),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "peak_tree_rss_mb": round(run.peak_tree_rss_mb, 1),
        "seconds": seconds,
        "sent": len(delivered),
        "quarantined": len(quarantined),
        "dead_lettered": dead,
        "engine_vs_daemon_disagreements": disagreements,
        "exit": rc,
    }
    record_figures("hostile_daemon", figures)
    assert (crashes, hangs, unaccounted) == (0, 0, []), (figures, unaccounted[:30])
    assert run.peak_rss_mb < 300, figures
    assert rc == 0

    assert_no_phi("hostile", phi_audit(run, metrics=metrics))
