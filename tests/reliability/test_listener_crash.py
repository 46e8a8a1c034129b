"""kill -9 of the agent while scanners push over C-STORE: every 0x0000 is delivered, exactly once.

Three "modalities" (pynetdicom SCUs, one association each at a time) send their share of M
instances to the agent's listener and, as a modality does, send again whatever did not get
0x0000 (refused, association lost, listener down) until everything is acknowledged. Meanwhile the
agent is killed with SIGKILL at seeded random instants and started again. Its destination is
Orthanc over C-STORE. At the end every instance is at Orthanc once under the output UID the
agent's own engine gives it, the outbox holds one row per instance, and the spool is empty.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

import gateway_agent.dicom.network  # noqa: F401  (pynetdicom closes refused sockets)
from tests._orthanc import start_orthanc

from ._harness import AgentRun, free_port, reached, record_figures, size

pytestmark = [pytest.mark.reliability, pytest.mark.orthanc, pytest.mark.slow]

SEED = 20261205
SENDERS = 3
#: Seconds between two instances of one modality: sending spans the kills (a scanner
#: reconstructing images sends at about this pace).
PACE = 0.1


class Modality(threading.Thread):
    """Sends ``files`` until each got 0x0000; counts what it saw."""

    def __init__(self, name: str, port: int, files: list[Path], deadline: float) -> None:
        super().__init__(name=name, daemon=True)
        self.ae_title = name
        self.port = port
        self.todo = list(files)
        self.acked: list[Path] = []
        self.statuses: dict[int, int] = {}
        self.lost_associations = 0
        self.deadline = deadline
        self.in_association = threading.Event()

    def run(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        while self.todo and time.monotonic() < self.deadline:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="EDGE01")
            if not assoc.is_established:
                time.sleep(0.1)  # the listener is down (killed, starting): try again soon
                continue
            self.in_association.set()
            try:
                for path in list(self.todo):
                    time.sleep(PACE)
                    try:
                        rsp = assoc.send_c_store(path)
                    except RuntimeError:  # the association died between two instances
                        rsp = None
                    status = getattr(rsp, "Status", None)
                    if status is None:
                        self.lost_associations += 1
                        break
                    self.statuses[int(status)] = self.statuses.get(int(status), 0) + 1
                    if status == 0x0000:
                        self.todo.remove(path)
                        self.acked.append(path)
            finally:
                self.in_association.clear()
                if assoc.is_established:
                    assoc.release()


def test_kill9_while_receiving_every_acknowledged_instance_is_delivered_once(
    tmp_path: Path,
) -> None:
    pacs = start_orthanc(dicom=True, dicom_peers={"EDGE01": ("127.0.0.1", 11112)})
    run: AgentRun | None = None
    try:
        port = free_port()
        run = AgentRun(
            tmp_path,
            destination={
                "kind": "dicom",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "called_ae": pacs.dicom_aet,
                "backoff_cap_seconds": 2.0,
            },
            overrides={
                "unit_name": "EDGE01",
                "listener": {"enabled": True, "host": "127.0.0.1", "port": port},
            },
        )
        n = size(150, 450)
        engine = run.engine()
        files: list[Path] = []
        expected: set[str] = set()
        scratch = tmp_path / "expected"
        for i in range(n):
            path = run.stage_ct(
                f"{i:05d}.dcm",
                i,
                study=f"listener-crash-{i // 30}",
                patients_every=30,
                mrn="PHIMRN",
            )
            files.append(path)
            expected.add(engine.deidentify_file(path, scratch).sop_instance_uid)
        assert len(expected) == n

        run.start()
        deadline = time.monotonic() + 600
        modalities = [Modality(f"CT{k}", port, files[k::SENDERS], deadline) for k in range(SENDERS)]
        for m in modalities:
            m.start()
        rng = random.Random(SEED)
        kills = size(5, 12)
        for _ in range(kills):
            # Once a modality is in an association, kill within half a second: mid-association.
            assert reached(lambda: any(m.in_association.is_set() for m in modalities), 120)
            time.sleep(rng.uniform(0.05, 0.5))
            run.agent.kill9()
            time.sleep(rng.uniform(0.0, 0.5))
            run.start()
        for m in modalities:
            m.join(timeout=max(1.0, deadline - time.monotonic()))
        assert all(not m.todo for m in modalities), [len(m.todo) for m in modalities]
        acked = sum(len(m.acked) for m in modalities)
        assert acked == n

        assert reached(lambda: pacs.count_instances() >= n, 240), pacs.count_instances()
        time.sleep(1.0)
        delivered = pacs.sop_uids()
        assert sorted(delivered) == sorted(expected)  # each once, none other
        rows = run.outbox_rows()
        assert len(rows) == n and {state for _, state, _, _ in rows} == {"sent"}
        received = run.state / "received"
        assert not [p for p in received.rglob("*") if p.is_file()], "spool not drained"
        run.agent.stop()
        record_figures(
            "listener_kill9",
            {
                "instances": n,
                "kills": kills,
                "statuses": {
                    f"0x{k:04X}": sum(m.statuses.get(k, 0) for m in modalities)
                    for k in sorted({s for m in modalities for s in m.statuses})
                },
                "associations_lost": sum(m.lost_associations for m in modalities),
                "orphans": run.agent.orphans,
            },
        )
        assert run.agent.orphans == 0
        assert sum(m.lost_associations for m in modalities) >= kills // 2  # kills hit sending
    finally:
        if run is not None and run.agent.alive():
            run.agent.kill9()
        pacs.close()
