"""Operators and accidents around the state folder: `status` and `retry` beside a running agent,
a second agent started by mistake, the site secret replaced or lost, a damaged database, SIGHUP,
and a corrected instance sent again.

Each case runs the real agent as a child process (``gateway-agent run``) and records its figures
for ``benchmarks/reliability.py``.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway_agent.synthetic import Patient
from tests._procs import deleted_fds

from ._accidents import CountingStow, Inputs, cli, ct_bytes, start_agent, status_json
from ._harness import AgentRun, assert_no_phi, phi_audit, record_figures, size, wait_until

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _stow_destination(stow: CountingStow, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "dicomweb",
        "url": stow.url,
        "timeout_seconds": 10.0,
        "backoff_base_seconds": 0.2,
        "backoff_cap_seconds": 1.0,
        **extra,
    }


# --------------------------------------------------------------------------- status and retry


def test_status_and_retry_beside_a_running_agent(agent_run) -> None:  # type: ignore[no-untyped-def]
    """Operator commands, many times, while files arrive; then kill -9: every row is there."""
    rounds, waves, per_wave = size(3, 100), size(3, 20), size(20, 50)
    run = agent_run()
    inputs = Inputs(run)
    names = [f"w{w}/PHIDOE_{i:03d}.dcm" for w in range(waves) for i in range(per_wave)]
    for n, name in enumerate(names):
        data = ct_bytes(n, study=f"ops-{n // per_wave}")
        inputs.add(name, data)
        (run.staging / name).parent.mkdir(parents=True, exist_ok=True)
        (run.staging / name).write_bytes(data)
    stop = threading.Event()

    def feed() -> None:
        for name in names:
            if stop.is_set():
                return
            run.feed(name)
            time.sleep(0.01)

    start_agent(run)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    deleted: list[str] = []
    failures = 0
    t0 = time.monotonic()
    try:
        for _ in range(rounds):
            for command in ("status", "retry"):
                done = cli(run, command)
                failures += done.returncode != 0
            deleted += deleted_fds(run.agent.pid, run.state)
        seconds = time.monotonic() - t0
        feeder.join(120)
        wait_until(lambda: not run.inbox_files(), 120, what="inbox drained")
        deleted += deleted_fds(run.agent.pid, run.state)
        rows_before = len(run.outbox_rows())
        run.agent.kill9()
    finally:
        stop.set()
    rows_after = {sop for sop, *_ in run.outbox_rows()}
    run.start()
    want = set(inputs.expected.values())
    wait_until(lambda: want <= run.delivered_uids(), 120, what="every instance delivered")
    run.agent.stop()
    figures = {
        "commands": 2 * rounds,
        "files": len(names),
        "failed_commands": failures,
        "deleted_fds": len(deleted),
        "rows_before_kill": rows_before,
        "rows_after_kill": len(rows_after),
        "lost": len(want - run.delivered_uids()),
        "command_s": round(seconds / (2 * rounds), 2),
    }
    record_figures("operators", figures)
    assert (failures, deleted) == (0, []), figures
    assert rows_after == want, figures


# --------------------------------------------------------------------------- two agents


def _start_and_drop(run: AgentRun, stow: CountingStow, n: int, study: str) -> Inputs:
    """``n`` CT inputs of ``study`` (the STOW server told their output UIDs), the agent started,
    then every input dropped into its inbox."""
    inputs = Inputs(run)
    for i in range(n):
        inputs.add(f"PHIDOE_{i:03d}.dcm", ct_bytes(i, study=study))
    stow.uids = {u.encode() for u in inputs.expected.values()}
    start_agent(run)
    for name, data in inputs.data.items():
        run.drop(name, data)
    return inputs


def test_a_second_agent_is_refused(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    """A second agent on a state folder in use, or on an inbox in use with another state folder,
    exits 2 with one line before touching anything; the first agent sends each instance once."""
    n = size(30, 300)
    with CountingStow(set()) as stow:
        stow.delay = 3.0  # uploads stay in flight (rows in "sending") while the second starts
        first = agent_run(tmp_path / "a", destination=_stow_destination(stow))
        inputs = _start_and_drop(first, stow, n, "two")
        wait_until(lambda: first.outbox_counts().get("sending", 0) > 0, 60, what="rows sending")
        (tmp_path / "b" / "inbox2").mkdir(parents=True)
        same_state = agent_run(
            tmp_path / "b",
            destination=_stow_destination(stow),
            overrides={"inbox": str(tmp_path / "b" / "inbox2"), "state_dir": str(first.state)},
        )
        same_inbox = agent_run(
            tmp_path / "c",
            destination=_stow_destination(stow),
            overrides={"inbox": str(first.inbox)},
        )
        outcomes: dict[str, Any] = {}
        for label, second in (("same_state", same_state), ("same_inbox", same_inbox)):
            sending = first.outbox_counts().get("sending", 0)
            second.start()
            assert second.agent.proc is not None
            try:
                rc = second.agent.proc.wait(timeout=60)
            except Exception:
                rc = None
            lines = second.agent.log_lines()
            outcomes[label] = {
                "exit": rc,
                "lines": len(lines),
                "requeued": any("outbox_requeued_stale" in ln for ln in lines),
                "sending_before": sending,
                "text": lines[-1][:300] if lines else "",
            }
            if second.agent.alive():
                second.agent.stop()
        stow.delay = 0.0
        stow.release.set()
        want = set(inputs.expected.values())
        wait_until(
            lambda: set(stow.counts) >= want and not first.inbox_files(), 120, what="delivered"
        )
        first.agent.stop()
        counts = dict(stow.counts)
    duplicated = sum(c - 1 for c in counts.values())
    figures = {
        "files": n,
        "second_exit": {k: v["exit"] for k, v in outcomes.items()},
        "second_requeued": sum(v["requeued"] for v in outcomes.values()),
        "duplicated": duplicated,
        "lost": len(want - set(counts)),
    }
    record_figures("two_agents", figures)
    for label, o in outcomes.items():
        assert o["exit"] == 2, (label, o)
        assert o["lines"] == 1 and "another agent" in o["text"], (label, o)
        assert not o["requeued"], (label, o)
    assert duplicated == 0 and figures["lost"] == 0, figures


# --------------------------------------------------------------------------- the site secret


def test_secret_replaced_or_missing_refuses_to_start(agent_run) -> None:  # type: ignore[no-untyped-def]
    """Rows queued under one secret: a replaced or missing secret stops the start-up with one line
    naming the fix; the restored secret delivers them; ``--new-secret`` accepts a new one."""
    n = size(10, 100)
    with CountingStow(set()) as stow:
        stow.down = True
        run = agent_run(destination=_stow_destination(stow))
        inputs = _start_and_drop(run, stow, n, "secret")
        wait_until(lambda: len(run.outbox_rows()) == n, 60, what="rows queued")
        assert run.agent.stop() == 0
        secret_file = run.state / "secret.key"
        original = secret_file.read_bytes()
        results: dict[str, Any] = {}

        def attempt(label: str) -> None:
            before = len(run.agent.log_lines())
            run.start()
            assert run.agent.proc is not None
            try:
                rc: int | None = run.agent.proc.wait(timeout=60)
            except Exception:
                rc = None
                run.agent.stop()
            new = run.agent.log_lines()[before:]
            results[label] = {"exit": rc, "lines": new}
            assert rc == 2, (label, new[-3:])

        secret_file.write_text(secrets.token_hex(32) + "\n")
        attempt("replaced")
        secret_file.unlink()
        attempt("missing")
        created_when_missing = secret_file.exists()
        secret_file.write_bytes(original)
        stow.down = False
        start_agent(run)
        want = set(inputs.expected.values())
        wait_until(lambda: set(stow.counts) >= want, 60, what="delivered with the restored secret")
        run.agent.stop()
        # Knowingly: a new secret with --new-secret starts (later instances get new UIDs).
        secret_file.write_text(secrets.token_hex(32) + "\n")
        run.agent.run_args = ["--new-secret"]
        start_agent(run)
        accepted = run.agent.alive()
        run.agent.stop()
        run.agent.run_args = []
        # ... and from then on the new secret is the recorded one.
        start_agent(run)
        remembered = run.agent.alive()
        run.agent.stop()
    figures = {
        "rows": n,
        "exit_replaced": results["replaced"]["exit"],
        "exit_missing": results["missing"]["exit"],
        "secret_created_when_missing": created_when_missing,
        "delivered_after_restore": len(set(stow.counts) & want),
        "new_secret_accepted": accepted,
    }
    record_figures("secret", figures)
    for label in ("replaced", "missing"):
        r = results[label]
        assert r["exit"] == 2, (label, r)
        assert len(r["lines"]) == 1, (label, r)
        assert "--new-secret" in r["lines"][0] and "backup" in r["lines"][0], (label, r)
    assert not created_when_missing
    assert figures["delivered_after_restore"] == n
    assert accepted and remembered


# --------------------------------------------------------------------------- a damaged database


def _damage(db: Path, how: str, rng: random.Random) -> None:
    data = bytearray(db.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 3]
    elif how == "header":
        data[:100] = rng.randbytes(100)
    else:  # random pages, the first (schema) page left alone
        page = 4096
        pages = len(data) // page
        for p in rng.sample(range(1, pages), k=max(1, pages // 4)):
            data[p * page : (p + 1) * page] = rng.randbytes(page)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "header", "pages"])
def test_damaged_database_is_rebuilt_from_the_outbox_files(agent_run, how: str) -> None:  # type: ignore[no-untyped-def]
    sent_first, queued = size(10, 100), size(20, 400)
    rng = random.Random(f"damage-{how}")
    with CountingStow(set()) as stow:
        run = agent_run(destination=_stow_destination(stow))
        inputs = Inputs(run)
        for i in range(sent_first + queued):
            inputs.add(f"PHIDOE_{i:04d}.dcm", ct_bytes(i, study=f"damage-{i % 3}"))
        stow.uids = {u.encode() for u in inputs.expected.values()}
        names = sorted(inputs.data)
        start_agent(run)
        for name in names[:sent_first]:
            run.drop(name, inputs.data[name])
        wait_until(lambda: len(stow.counts) == sent_first, 60, what="first part sent")
        stow.down = True
        for name in names[sent_first:]:
            run.drop(name, inputs.data[name])
        wait_until(lambda: len(run.outbox_rows()) == len(names), 60, what="rows committed")
        assert run.agent.stop() == 0
        db = run.state / "outbox.db"
        _damage(db, how, rng)
        stow.down = False
        run.start()
        want = set(inputs.expected.values())
        delivered = wait_until_ok(lambda: set(stow.counts) >= want, 120)
        alive = run.agent.alive()
        status = status_json(run) if alive else {}
        if alive:
            run.agent.stop()
        counts = dict(stow.counts)
    kept = sorted(p.name for p in run.state.iterdir() if p.name.startswith("outbox.db.damaged"))
    logged = [ln for ln in run.agent.log_lines() if '"outbox_damaged"' in ln]
    figures = {
        "damage": how,
        "rows": len(names),
        "lost": len(want - set(counts)),
        "resent": sum(c - 1 for c in counts.values()),
        "kept_aside": len(kept),
        "agent_alive": alive,
    }
    record_figures("damaged_db", figures)
    assert alive and delivered, (figures, run.agent.log_lines()[-5:])
    assert figures["lost"] == 0 and kept and logged, figures
    assert figures["resent"] <= sent_first, figures
    assert (status.get("outbox") or {}).get("damaged"), status


def wait_until_ok(predicate: Any, timeout: float) -> bool:
    try:
        wait_until(predicate, timeout)
    except AssertionError:
        return False
    return True


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_reloads_the_configuration(tmp_path: Path, agent_run) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP while files flow: nothing lost, the agent goes on, and a changed setting (here the
    destination folder) applies to what comes after."""
    n = size(20, 200)
    run = agent_run()
    inputs = Inputs(run)
    for i in range(2 * n):
        inputs.add(f"PHIDOE_{i:03d}.dcm", ct_bytes(i, study="hup"))
    names = sorted(inputs.data)
    start_agent(run)
    for name in names[:n]:
        run.drop(name, inputs.data[name])
        if name == names[n // 2]:
            os.kill(run.agent.pid, signal.SIGHUP)
    time.sleep(0.5)
    alive_after_first = run.agent.alive()
    first = {inputs.expected[nm] for nm in names[:n]}
    if alive_after_first:
        wait_until(lambda: first <= run.delivered_uids(), 60, what="first half delivered")
    # Change the destination and reload.
    new_dest = tmp_path / "destination-2"
    run.settings["destination"] = {"kind": "folder", "folder": str(new_dest)}
    from ._harness import write_config

    write_config(run.config, run.settings)
    if alive_after_first:
        os.kill(run.agent.pid, signal.SIGHUP)
        wait_until(
            lambda: sum('"agent_reloaded"' in ln for ln in run.agent.log_lines()) >= 2,
            60,
            what="reloaded",
        )
        for name in names[n:]:
            run.drop(name, inputs.data[name])
        second = {inputs.expected[nm] for nm in names[n:]}
        wait_until(
            lambda: {p.stem for p in new_dest.rglob("*.dcm")} >= second, 60, what="second half"
        )
    alive = run.agent.alive()
    rc = run.agent.stop() if alive else run.agent.proc.returncode  # type: ignore[union-attr]
    delivered = run.delivered_uids() | {p.stem for p in new_dest.rglob("*.dcm")}
    figures = {
        "files": 2 * n,
        "alive_after_sighup": alive_after_first,
        "lost": len(set(inputs.expected.values()) - delivered),
        "exit": rc,
    }
    record_figures("sighup", figures)
    assert alive_after_first, figures
    assert figures["lost"] == 0 and rc == 0, figures
    assert_no_phi("sighup", phi_audit(run))


# --------------------------------------------------------------------------- a corrected instance


def test_a_corrected_instance_is_sent_again(agent_run) -> None:  # type: ignore[no-untyped-def]
    """A second version of a delivered instance (same SOP Instance UID, corrected patient) is
    delivered too: the destination ends with the corrected bytes."""
    n = size(10, 100)
    run = agent_run()
    inputs = Inputs(run)
    wrong = Patient(patient_id="PHIMRN0001")
    right = Patient(patient_id="PHIMRN0002")
    first = {f"PHIDOE_{i:03d}.dcm": ct_bytes(i, study="fix", patient=wrong) for i in range(n)}
    second = {f"PHIDOE_{i:03d}.dcm": ct_bytes(i, study="fix", patient=right) for i in range(n)}
    uids = {name: inputs.add(name, data) for name, data in first.items()}
    assert all(inputs.add(name, data) == uids[name] for name, data in second.items())
    corrected = {uids[name]: inputs.output_of(data) for name, data in second.items()}
    start_agent(run)
    for name, data in first.items():
        run.drop(name, data)
    wait_until(lambda: run.delivered_uids() >= set(uids.values()), 60, what="first versions")
    for name, data in second.items():
        run.drop(name, data)
    wait_until(lambda: not run.inbox_files(), 60, what="second versions taken")

    def delivered_corrected() -> int:
        got = 0
        for p in run.dest.rglob("*.dcm"):
            if not p.name.startswith(".") and corrected.get(p.stem) == p.read_bytes():
                got += 1
        return got

    reached = wait_until_ok(lambda: delivered_corrected() == n, 30)
    logged = sum('"outbox_received_again"' in ln for ln in run.agent.log_lines())
    run.agent.stop()
    figures = {"instances": n, "corrected_delivered": delivered_corrected(), "logged": logged}
    record_figures("corrected", figures)
    assert reached and logged == n, figures
