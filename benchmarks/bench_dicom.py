"""DICOM C-STORE on loopback, side by side with dcmtk in one run: sending to a PACS, receiving.

Send (N CT slices -> Orthanc's DICOM port, a fresh Orthanc for every run), once with Orthanc's
default maximum PDU length (16 kB, what most installations have) and once with 128 kB
(``MaximumPduLength``); every sender meets the same Orthanc settings:
  * ``storescu``: dcmtk sends the already de-identified files directly (one association);
  * the agent's sender alone (``StoreSCU``, in this process) sends the same files over one
    association, and over four (the agent's default ``parallel_requests``), 25 files a turn;
  * the agent: the original files are renamed into its inbox; it de-identifies them, commits
    them to its durable outbox and sends them over C-STORE (``run --destination-dicom``); timed
    from the drop until Orthanc holds all N. The ratio agent/storescu is the figure (target
    >= 0.8), with the CPU seconds per file of the sender's processes (storescu, the sender's
    threads, or the agent and its workers), of Orthanc, and of the whole machine.

Receive (``storescu`` sends the N original files):
  * ``storescp`` with fsync: each file written, then ``sync -d`` on it before the response
    (``-xcr 'sync -d #p/#f' -xs``), i.e. as durable as the agent's listener;
  * ``storescp`` without fsync, for reference (a power cut may lose what it acknowledged);
  * the agent's listener alone (``StoreSCP`` in this process, the same fsync, rename and folder
    fsync before each response, nothing de-identified or forwarded meanwhile): what receiving
    costs by itself, as ``storescp`` is measured;
  * the agent's listener (``run --listen-port``; destination: the same Orthanc over C-STORE):
    instances/s as ``storescu`` sees them, the ratio to storescp with fsync (target >= 0.8),
    and the time from the last C-STORE response to the last instance stored at Orthanc.

Usage (from the repository root)::

    uv run python benchmarks/bench_dicom.py                 # 1000 x 512x512, 3 rounds
    uv run python benchmarks/bench_dicom.py --only send --orthanc-pdu 16384   # default Orthanc
    uv run python benchmarks/bench_dicom.py --files 200 --pairs 1   # quick
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._agent import AgentProcess, wait  # noqa: E402
from gateway_agent.config import DeidSettings  # noqa: E402
from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret  # noqa: E402
from gateway_agent.dicom.files import read_file_meta  # noqa: E402
from gateway_agent.dicom.network import detach_socket  # noqa: E402
from gateway_agent.dicom.scp import StoreSCP, received_files  # noqa: E402
from gateway_agent.dicom.scu import AssociationError, StoreItem, StoreSCU  # noqa: E402
from gateway_agent.synthetic import make_ct_series, write_series  # noqa: E402
from tests._dcmtk import DCMTK_ENV, dcmtk_tool  # noqa: E402
from tests._orthanc import OrthancServer, free_port  # noqa: E402
from tests._procs import cpu_seconds, machine_busy  # noqa: E402

UNIT = "EDGE01"
SCANNER = "SCANNER"
#: Orthanc's default maximum PDU length, and the largest it (dcmtk) takes.
ORTHANC_PDUS = (16384, 131072)


def pid_cpu(pid: int | None) -> float:
    """CPU seconds of one process so far."""
    assert pid is not None, "the process has not started"
    return cpu_seconds([pid])


def own_cpu() -> float:
    """CPU seconds of this process so far (all its threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------- corpus
def make_corpus(directory: Path, n: int, size: int) -> list[Path]:
    paths: list[Path] = []
    for i in range(0, n, 100):
        dss = make_ct_series(min(100, n - i), rows=size, cols=size, study_seed=f"dicom-{i}")
        paths += write_series(dss, directory / f"s{i // 100:03d}")
    return paths


def deidentify_all(paths: Sequence[Path], secret: bytes, out: Path) -> list[Path]:
    engine = Deidentifier(secret, DeidOptions.from_settings(DeidSettings()), station_name=UNIT)
    out.mkdir(parents=True, exist_ok=True)
    return [engine.deidentify_file(p, out).path for p in paths]


def new_orthanc(max_pdu: int | None = None) -> OrthancServer:
    extra = {"MaximumPduLength": max_pdu} if max_pdu else None
    server = OrthancServer(
        auth=False, dicom=True, dicom_peers={UNIT: ("127.0.0.1", 11112)}, extra_config=extra
    )
    server.start()
    return server


# ----------------------------------------------------------------------------- dcmtk
def storescu(port: int, target: Path, aec: str, aet: str = SCANNER) -> tuple[float, float]:
    """(wall seconds, CPU seconds of storescu) to send every file under ``target``."""
    cmd = [dcmtk_tool("storescu"), "-aet", aet, "-aec", aec, "-pdu", "131072", "+sd", "+r"]
    cmd += ["127.0.0.1", str(port), str(target)]
    cpu0, t0 = children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu rc {done.returncode}: {done.stderr[-500:]}")
    return wall, children_cpu() - cpu0


class Storescp:
    def __init__(self, out: Path, fsync: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [dcmtk_tool("storescp"), "-aet", "STORESCP", "-od", str(out), "+xa", "-dhl"]
        cmd += ["-pdu", "131072"]
        if fsync:
            cmd += ["-xcr", "sync -d #p/#f", "-xs"]
        self.proc = subprocess.Popen(
            [*cmd, str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait(lambda: _port_open(self.port), 10)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ----------------------------------------------------------------------------- the agent
class Agent(AgentProcess):
    """The agent sending to ``pacs`` over C-STORE; with ``listen_port``, also listening."""

    def __init__(
        self,
        work: Path,
        pacs: OrthancServer,
        listen_port: int | None = None,
        *,
        confirm: bool = True,
    ) -> None:
        env = {
            "GATEWAY_UNIT_NAME": UNIT,
            "GATEWAY_QC__ENABLED": "false",
            "GATEWAY_DISK__MIN_FREE_MB": "1",
            "GATEWAY_DESTINATION__BACKOFF_CAP_SECONDS": "5",
            "GATEWAY_DESTINATION__CONFIRM_STORAGE": "true" if confirm else "false",
        }
        flags = ["--destination-dicom", f"{pacs.dicom_aet}@127.0.0.1:{pacs.dicom_port}"]
        self.listen_port = listen_port
        if listen_port is not None:
            flags += ["--listen-port", str(listen_port), "--listen-ae", UNIT]
        super().__init__(work, flags, env)

    def wait_ready(self) -> None:
        super().wait_ready()
        if self.listen_port is not None:
            wait(lambda: _port_open(self.listen_port or 0), 30)

    def proven(self) -> int:
        """Sent rows whose storage the destination proved (C-FIND)."""
        db = self.state / "outbox.db"
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            row = c.execute(
                "select count(*) from deliveries where state = 'sent' and confirmed = 1"
            ).fetchone()
            return int(row[0])
        finally:
            c.close()


# ----------------------------------------------------------------------------- runs
def send_storescu(deid_dir: Path, n: int, max_pdu: int) -> dict[str, float]:
    pacs = new_orthanc(max_pdu)
    try:
        busy0, orthanc0 = machine_busy(), pid_cpu(pacs.pid)
        wall, cpu = storescu(pacs.dicom_port, deid_dir, pacs.dicom_aet, aet=UNIT)
        busy, orthanc = machine_busy() - busy0, pid_cpu(pacs.pid) - orthanc0
        assert pacs.count_instances() == n, pacs.count_instances()
    finally:
        pacs.close()
    return {"seconds": wall, "cpu": cpu, "orthanc": orthanc, "machine": busy}


def send_bare(items: list[StoreItem], max_pdu: int, associations: int) -> dict[str, float]:
    """The agent's sender alone: ``associations`` threads, each sending 25 files a turn."""
    pacs = new_orthanc(max_pdu)
    scu = StoreSCU("127.0.0.1", pacs.dicom_port, pacs.dicom_aet, UNIT, idle_release=30)
    turns = [items[i : i + 25] for i in range(0, len(items), 25)]
    lock = threading.Lock()
    failed: list[object] = []
    lost: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if not turns:
                    return
                turn = turns.pop(0)
            for attempt in range(3):
                try:
                    results = scu.send(turn)
                    break
                except AssociationError as exc:  # lost: the uploader would send them again
                    lost.append(exc.reason)
                    if attempt == 2:
                        failed.append(exc)
                        return
            failed.extend(r for r in results if r.status != 0)

    try:
        cpu0, busy0, orthanc0 = time.process_time(), machine_busy(), pid_cpu(pacs.pid)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(associations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu, busy = time.process_time() - cpu0, machine_busy() - busy0
        orthanc = pid_cpu(pacs.pid) - orthanc0
        scu.close()
        assert not failed, failed[:3]
        assert pacs.count_instances() == len(items), pacs.count_instances()
        if lost:
            print(f"  ({len(lost)} association(s) lost and sent again: {lost[0]})", file=sys.stderr)
    finally:
        scu.close()
        pacs.close()
    return {"seconds": wall, "cpu": cpu, "orthanc": orthanc, "machine": busy}


def send_agent(
    src_dir: Path, work: Path, n: int, max_pdu: int, confirm: bool = True
) -> dict[str, float]:
    """Timed until Orthanc holds all N; then, with ``confirm``, until the agent proved all N
    stored (C-FIND), with the CPU of the agent, Orthanc and the machine until then."""
    pacs = new_orthanc(max_pdu)
    agent = Agent(work, pacs, confirm=confirm)
    try:
        agent.wait_ready()
        staged = work / "staged"
        shutil.copytree(src_dir, staged)
        cpu0, busy0, t0 = agent.cpu_seconds(), machine_busy(), time.perf_counter()
        orthanc0 = pid_cpu(pacs.pid)
        staged.rename(agent.inbox / "drop")
        wait(lambda: pacs.count_instances() >= n, 600, 0.05)
        wall = time.perf_counter() - t0
        if confirm:
            wait(lambda: agent.proven() >= n, 600, 0.05)
        proven = time.perf_counter() - t0
        cpu, busy = agent.cpu_seconds() - cpu0, machine_busy() - busy0
        orthanc = pid_cpu(pacs.pid) - orthanc0
        assert pacs.count_instances() == n
    finally:
        agent.stop()
        pacs.close()
    return {"seconds": wall, "cpu": cpu, "orthanc": orthanc, "machine": busy, "proven": proven}


def receive_storescp(src_dir: Path, work: Path, n: int, fsync: bool) -> dict[str, float]:
    out = work / "scp-out"
    scp = Storescp(out, fsync)
    try:
        busy0 = machine_busy()
        wall, _ = storescu(scp.port, src_dir, "STORESCP")
        busy = machine_busy() - busy0
    finally:
        scp.stop()
    got = sum(1 for p in out.iterdir() if p.is_file())
    assert got == n, got
    shutil.rmtree(out)
    return {"seconds": wall, "machine": busy, "drain": 0.0}


def receive_listener_alone(src_dir: Path, work: Path, n: int) -> dict[str, float]:
    """The agent's listener (:class:`StoreSCP`) alone in this process: fsync, rename, folder
    fsync before each response, nothing de-identified or forwarded meanwhile."""
    spool = work / "spool"
    scp = StoreSCP(spool, ae_title=UNIT, host="127.0.0.1", port=0)
    scp.start()
    try:
        busy0 = machine_busy()
        wall, _ = storescu(scp.port, src_dir, UNIT)
        busy = machine_busy() - busy0
    finally:
        scp.stop()
    got = sum(1 for _ in received_files(spool))
    assert got == n, got
    shutil.rmtree(spool)
    return {"seconds": wall, "machine": busy, "drain": 0.0}


def idle_associations(work: Path, count: int = 3, seconds: float = 10.0) -> float:
    """CPU of this process, in % of a core, while ``count`` associations to the listener
    (:class:`StoreSCP`, in this process) stay open and idle; the requestors' own threads are
    stopped first, so only the listener's side is counted."""
    scp = StoreSCP(work / "idle-spool", ae_title=UNIT, host="127.0.0.1", port=0, timeout=120)
    scp.start()
    socks = []
    try:
        for i in range(count):
            ae = AE(ae_title=f"IDLE{i}")
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", scp.port, ae_title=UNIT)
            assert assoc.is_established
            socks.append(detach_socket(assoc))
        time.sleep(0.5)
        cpu0, t0 = own_cpu(), time.perf_counter()
        time.sleep(seconds)
        cpu, wall = own_cpu() - cpu0, time.perf_counter() - t0
    finally:
        for sock in socks:
            sock.close()
        scp.stop()
    return 100.0 * cpu / wall


def receive_agent(src_dir: Path, work: Path, n: int) -> dict[str, float]:
    pacs = new_orthanc()
    port = free_port()
    agent = Agent(work, pacs, listen_port=port)
    try:
        agent.wait_ready()
        cpu0, busy0 = agent.cpu_seconds(), machine_busy()
        wall, _ = storescu(port, src_dir, UNIT)
        t_last_response = time.perf_counter()
        wait(lambda: pacs.count_instances() >= n, 600, 0.05)
        drain = time.perf_counter() - t_last_response
        cpu, busy = agent.cpu_seconds() - cpu0, machine_busy() - busy0
        assert pacs.count_instances() == n
    finally:
        agent.stop()
        pacs.close()
    return {"seconds": wall, "cpu": cpu, "machine": busy, "drain": drain}


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=3, help="rounds: every sender once a round")
    ap.add_argument(
        "--orthanc-pdu",
        type=lambda v: [int(x) for x in v.split(",")],
        default=list(ORTHANC_PDUS),
        help="Orthanc's MaximumPduLength for the send runs, comma-separated (default: "
        "16384,131072)",
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--only", choices=["send", "receive"], default=None)
    ap.add_argument(
        "--idle-seconds",
        type=float,
        default=10.0,
        help="how long the listener's CPU is measured with idle associations open",
    )
    args = ap.parse_args(argv)

    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        n = args.files
        src = work / "original"
        make_corpus(src, n, args.size)
        secret = load_or_create_secret(work / "secret.key")
        deid = work / "deid"
        deidentify_all(sorted(src.rglob("*.dcm")), secret, deid)
        mb = sum(p.stat().st_size for p in src.rglob("*.dcm")) / 1e6
        print(f"{n} CT slices {args.size}x{args.size} ({mb:.0f} MB), {args.pairs} round(s),")
        print(f"{os.cpu_count()} CPU(s); medians; every run against a fresh Orthanc / storescp.\n")

        def run(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
            scratch = work / "scratch"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            return fn()

        def med(rows: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in rows)

        if args.only in (None, "send"):
            items = [
                StoreItem(i, p, read_file_meta(p).sop_class_uid)
                for i, p in enumerate(sorted(deid.rglob("*.dcm")))
            ]
            for max_pdu in args.orthanc_pdu:
                rows: dict[str, list[dict[str, float]]] = {}
                runs: list[tuple[str, Callable[[], dict[str, float]]]] = [
                    ("storescu (de-identified files)", partial(send_storescu, deid, n, max_pdu)),
                    (
                        "agent's sender alone (de-identified files, 1 association)",
                        partial(send_bare, items, max_pdu, 1),
                    ),
                    (
                        "agent's sender alone (de-identified files, 4 associations)",
                        partial(send_bare, items, max_pdu, 4),
                    ),
                    (
                        "gateway-agent (inbox -> de-id -> outbox -> C-STORE)",
                        partial(send_agent, src, work / "scratch", n, max_pdu),
                    ),
                    (
                        "gateway-agent, confirm_storage = false",
                        partial(send_agent, src, work / "scratch", n, max_pdu, False),
                    ),
                ]
                for _ in range(args.pairs):
                    for name, fn in runs:
                        rows.setdefault(name, []).append(run(fn))
                which = " (its default)" if max_pdu == ORTHANC_PDUS[0] else ""
                print(f"Send to Orthanc over C-STORE, Orthanc MaximumPduLength {max_pdu}{which}")
                print(
                    "(the agent's CPU until all are stored, and with the proof of storage on, until"
                )
                print("all are proven by C-FIND, shown in its own column)")
                print("| sender | files/s | ratio | ratio in each round | all proven after s "
                      "| sender CPU ms/file | Orthanc CPU ms/file "
                      "| machine CPU ms/file |")  # fmt: skip
                print("|---|---|---|---|---|---|---|---|")
                first = rows[runs[0][0]]
                base = n / med(first, "seconds")
                for name, _fn in runs:
                    got = rows[name]
                    rate = n / med(got, "seconds")
                    # Each round runs the senders one after the other: on a shared machine the
                    # load moves between rounds, less within one.
                    pairs = zip(first, got, strict=True)
                    each = ", ".join(f"{a['seconds'] / b['seconds']:.2f}" for a, b in pairs)
                    proven = "-"
                    if "proven" in got[0] and "confirm_storage = false" not in name:
                        proven = f"{med(got, 'proven'):.1f}"
                    print(
                        f"| {name} | {rate:.1f} | {rate / base:.2f} x | {each} | {proven} "
                        f"| {1000 * med(got, 'cpu') / n:.2f} "
                        f"| {1000 * med(got, 'orthanc') / n:.2f} "
                        f"| {1000 * med(got, 'machine') / n:.2f} |"
                    )
                print()

        if args.only in (None, "receive"):
            sync: list[dict[str, float]] = []
            plain: list[dict[str, float]] = []
            alone: list[dict[str, float]] = []
            agent: list[dict[str, float]] = []
            for _ in range(args.pairs):
                sync.append(run(lambda: receive_storescp(src, work / "scratch", n, True)))
                plain.append(run(lambda: receive_storescp(src, work / "scratch", n, False)))
                alone.append(run(lambda: receive_listener_alone(src, work / "scratch", n)))
                agent.append(run(lambda: receive_agent(src, work / "scratch", n)))
            rate_s = n / med(sync, "seconds")
            print("Receive from storescu")
            print("| receiver | instances/s | ratio to storescp + fsync | machine CPU ms/file "
                  "| last response -> last stored at Orthanc |")  # fmt: skip
            print("|---|---|---|---|---|")
            for name, rows in (
                ("storescp + fsync (sync -d per file)", sync),
                ("storescp (no fsync)", plain),
                ("agent's listener alone (fsync + rename, nothing forwarded)", alone),
                ("gateway-agent listener (destination: Orthanc, C-STORE)", agent),
            ):
                rate = n / med(rows, "seconds")
                drain = f"{med(rows, 'drain'):.2f} s" if rows is agent else "-"
                print(
                    f"| {name} | {rate:.1f} | {rate / rate_s:.2f} x "
                    f"| {1000 * med(rows, 'machine') / n:.2f} | {drain} |"
                )
            idle = idle_associations(work / "scratch", seconds=args.idle_seconds)
            print(f"\nListener with 3 idle associations open: {idle:.3f} % of a core\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
