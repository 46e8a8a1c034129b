"""End to end on loopback: CT slices dropped into a running agent's inbox -> stored by Orthanc.

Prints, as a table:
  * agent throughput (files/s, drop -> stored in Orthanc) next to the best direct STOW-RS upload of
    the same, already de-identified files to a fresh Orthanc in the same run (4 modes);
  * the "durable floor": the best direct mode, but every file first copied durably (temp file,
    fsync, rename, folder fsync: the least that invariant 1 asks of any agent before it may
    delete an original). It does not de-identify, parse, queue or watch anything: about the
    most an agent can reach on the same machine next to the same server;
  * for each of those, the whole machine's CPU per file (/proc/stat: Orthanc, client or agent,
    kernel write-back): on 2 cores shared with Orthanc this is what sets the ceilings;
  * the periodic QC job's CPU share of one core while the 1000 files are ingested (the job's
    thread CPU from drop until it has processed every new row; --qc-interval, default 10 s
    instead of 300 s, so that passes fall into the run), and how many instances it sampled;
  * the drop-to-acknowledged latency of one file (renamed in, and written in place);
  * peak RSS of the agent with N files queued (destination down), main process and workers;
  * idle CPU of the agent (process + workers) over a quiet period.

Usage (from the repository root)::

    uv run python benchmarks/bench_e2e.py     # 1000 x 512x512, 10,000 queued, 60 s idle
    uv run python benchmarks/bench_e2e.py --files 200 --queued 2000 --idle-seconds 10   # quick
    uv run python benchmarks/bench_e2e.py --pairs 5   # only: direct vs durable floor, 5 pairs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._agent import AgentProcess, wait  # noqa: E402
from gateway_agent.agent.service.qcjob import NICE_INCREMENT  # noqa: E402
from gateway_agent.config import DeidSettings  # noqa: E402
from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret  # noqa: E402
from gateway_agent.dicom.files import atomic_write, copy_range  # noqa: E402
from gateway_agent.synthetic import make_ct_series, write_series  # noqa: E402
from tests._orthanc import OrthancServer, orthanc_available  # noqa: E402
from tests._procs import CLK, machine_busy  # noqa: E402


# ----------------------------------------------------------------------------- corpus
def make_corpus(directory: Path, n: int, size: int, seed: str) -> list[Path]:
    paths: list[Path] = []
    per = 100
    for i in range(0, n, per):
        dss = make_ct_series(min(per, n - i), rows=size, cols=size, study_seed=f"{seed}-{i // per}")
        paths += write_series(dss, directory / f"s{i // per:03d}")
    return paths


def deidentify_all(paths: Sequence[Path], secret: bytes, out: Path) -> list[Path]:
    engine = Deidentifier(secret, DeidOptions.from_settings(DeidSettings()))
    out.mkdir(parents=True, exist_ok=True)
    return [engine.deidentify_file(p, out).path for p in paths]


# ----------------------------------------------------------------------------- direct STOW
def _multipart(files: Sequence[Path], boundary: str) -> Iterator[bytes]:
    for f in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield f.read_bytes()
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def stow(client: httpx.Client, url: str, files: Sequence[Path]) -> None:
    boundary = uuid.uuid4().hex
    r = client.post(
        url + "/studies",
        content=_multipart(files, boundary),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    r.raise_for_status()


def direct_upload(server: OrthancServer, files: list[Path], per_post: int, clients: int) -> float:
    """Files/s of a plain STOW-RS upload (fresh server, files read inside the timed region)."""
    batches = [files[i : i + per_post] for i in range(0, len(files), per_post)]
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(auth=server.auth, timeout=120.0) as c:
            while True:
                with lock:
                    if not batches:
                        return
                    batch = batches.pop()
                stow(c, server.dicomweb_url, batch)

    dt = run_threads([worker] * clients)
    assert server.count_instances() == len(files)
    return len(files) / dt


def run_threads(targets: Sequence[Callable[[], object]]) -> float:
    """Run each target in a thread of its own until all are done; the wall seconds it took."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=target) for target in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def durable_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` as invariant 1 asks: temp file, fsync, rename, folder fsync."""
    fd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size

        def write(out: int) -> int:
            copy_range(fd, out, 0, size)
            return size

        atomic_write(dst, write)
    finally:
        os.close(fd)


def copy_all(
    files: list[Path],
    stage: Path,
    threads: int,
    on_copied: Callable[[Path], object] | None = None,
) -> None:
    """``durable_copy`` every file into ``stage`` with ``threads`` threads; ``on_copied(copy)``
    as each one is durable."""
    todo, lock = list(files), threading.Lock()

    def copier() -> None:
        while True:
            with lock:
                if not todo:
                    return
                src = todo.pop()
            durable_copy(src, stage / src.name)
            if on_copied is not None:
                on_copied(stage / src.name)

    run_threads([copier] * threads)


def durable_floor(server: OrthancServer, files: list[Path], stage: Path) -> float:
    """Files/s of the best direct mode (25 per POST, 4 clients) fed by 4 threads that first
    copy every file durably into ``stage`` (the project's ``atomic_write``: temp file, fsync,
    rename, folder fsync), pipelined: a client posts 25 copies as soon as they are durable.

    The cheapest pipeline that keeps invariant 1, with no de-identification, parsing, queue or
    watcher at all: about what an ideal agent could reach on this machine next to this server.
    """
    stage.mkdir(parents=True, exist_ok=True)
    done: queue.Queue[Path | None] = queue.Queue()
    fill = threading.Lock()
    state = {"open": True}

    def copiers() -> None:
        copy_all(files, stage, 4, done.put)
        done.put(None)

    def client() -> None:
        with httpx.Client(auth=server.auth, timeout=120.0) as c:
            while True:
                batch: list[Path] = []
                with fill:  # one client fills its batch at a time, as the agent's uploader
                    while len(batch) < 25 and state["open"]:
                        item = done.get()
                        if item is None:
                            state["open"] = False
                        else:
                            batch.append(item)
                if batch:
                    stow(c, server.dicomweb_url, batch)
                if not state["open"] and not batch:
                    return

    dt = run_threads([copiers] + [client] * 4)
    assert server.count_instances() == len(files)
    shutil.rmtree(stage)
    return len(files) / dt


def floor_pairs(
    n: int, files: list[Path], work: Path, new_server: Callable[[], OrthancServer]
) -> int:
    """Print ``n`` pairs (best direct mode, durable floor) and the durable copy alone.

    One unmeasured direct upload comes first: the first upload of a process to a fresh server
    costs more (3.5 against 2.5 ms of CPU per file here) and would flatter the first floor.
    """
    with new_server() as server:
        direct_upload(server, files, 25, 4)
    print("| pair | direct 25/POST x 4 | CPU/file | durable floor | CPU/file | floor / direct |")
    print("|--:|--:|--:|--:|--:|--:|")
    for i in range(n):
        with new_server() as server:
            busy0 = machine_busy()
            direct = direct_upload(server, files, 25, 4)
            direct_cpu = (machine_busy() - busy0) / len(files) * 1000
        with new_server() as server:
            busy0 = machine_busy()
            floor = durable_floor(server, files, work / "floor")
            floor_cpu = (machine_busy() - busy0) / len(files) * 1000
        print(
            f"| {i + 1} | {direct:.0f} files/s | {direct_cpu:.2f} ms | {floor:.0f} files/s "
            f"| {floor_cpu:.2f} ms | {floor / direct:.2f} x |",
            flush=True,
        )
    for threads in (1, 4):
        stage = work / "copy-alone"
        stage.mkdir(parents=True, exist_ok=True)
        os.sync()
        busy0, t0 = machine_busy(), time.perf_counter()
        copy_all(files, stage, threads)
        os.sync()  # the write-back of the copies is part of their cost
        dt, cpu = time.perf_counter() - t0, (machine_busy() - busy0) / len(files) * 1000
        print(
            f"- durable copy alone, {threads} thread(s): {len(files) / dt:.0f} files/s, "
            f"{cpu:.2f} ms of the machine's CPU per file (write-back included)"
        )
        shutil.rmtree(stage)
    return 0


# ----------------------------------------------------------------------------- the agent
class AgentProc(AgentProcess):
    """The agent uploading to a DICOMweb server with basic authentication."""

    def __init__(
        self, work: Path, url: str, auth: tuple[str, str], env_extra: dict[str, str]
    ) -> None:
        env = {
            "GATEWAY_DESTINATION__AUTH": "basic",
            "GATEWAY_DESTINATION__USERNAME": auth[0],
            "GATEWAY_DESTINATION__PASSWORD": auth[1],
            "GATEWAY_DESTINATION__BACKOFF_CAP_SECONDS": "5",
            "GATEWAY_DISK__MIN_FREE_MB": "1",
            **env_extra,
        }
        super().__init__(work, ["--destination-url", url], env)

    def qc_cpu_seconds(self) -> float:
        """CPU seconds of the QC job: the agent's threads at nice +10 or more.

        Python 3.11 does not name OS threads ("qc-job" is invisible in /proc), but the job's
        thread renices itself (and any thread it starts inherits that); nothing else does.
        """
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                f = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(f[16]) >= NICE_INCREMENT:
                total += int(f[11]) + int(f[12])
        return total / CLK

    def qc_progress(self) -> tuple[int, int, int]:
        """(newest outbox row id, QC's last processed row id, feature rows stored)."""
        c = sqlite3.connect(f"file:{self.state / 'outbox.db'}?mode=ro", uri=True, timeout=10)
        try:
            newest = c.execute("select coalesce(max(id), 0) from instances").fetchone()[0]
            try:
                last = c.execute("select last_outbox_id from qc_state").fetchone()[0]
                stored = c.execute("select count(*) from qc_features").fetchone()[0]
            except sqlite3.Error:  # QC tables not created yet
                last = stored = 0
            return int(newest), int(last), int(stored)
        finally:
            c.close()

    def wait_qc_idle(self, quiet: float = 1.0) -> tuple[float, float]:
        """Wait until QC has processed every outbox row and its CPU time stood still for
        ``quiet`` s; returns (QC CPU seconds, perf_counter) at its last change."""
        last = [self.qc_cpu_seconds(), time.perf_counter()]

        def idle() -> bool:
            newest, done, _ = self.qc_progress()
            cpu = self.qc_cpu_seconds()
            if cpu != last[0] or done < newest:
                last[:] = [cpu, time.perf_counter()]
                return False
            return time.perf_counter() - last[1] >= quiet

        wait(idle, 600, 0.1)
        return last[0], last[1]

    def log_events(self, event: str) -> list[dict[str, object]]:
        """The agent's JSON log lines whose ``event`` is ``event``."""
        self.log.flush()
        out = []
        for line in (self.work / "agent.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == event:
                    out.append(rec)
        return out

    def rss_mb(self, field: str = "VmRSS") -> tuple[float, float]:
        """(main process, sum of children) in MB."""
        main = kids = 0.0
        for pid in self.family():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field + ":"):
                        kb = float(line.split()[1]) / 1024
                        if pid == self.proc.pid:
                            main = kb
                        else:
                            kids += kb
            except OSError:
                continue
        return main, kids


def drop(src_dir: Path, inbox: Path, name: str) -> None:
    """Copy next to the inbox (untimed), then rename in: the timed drop is one rename."""
    staged = inbox.parent / f"staged-{name}"
    shutil.copytree(src_dir, staged)
    staged.rename(inbox / name)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--queued", type=int, default=10_000, help="files queued for the RSS test")
    ap.add_argument("--queued-size", type=int, default=64, help="matrix of the queued files")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--qc-interval",
        type=float,
        default=10.0,
        help="qc.interval_seconds of the ingest agent (default 10 s instead of 300 s, so that QC "
        "passes fall into the run)",
    )
    ap.add_argument(
        "--parallel", type=int, default=None, help="destination.parallel_requests (default: ours)"
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="only measure N pairs of (best direct mode, durable floor) on fresh servers, with "
        "the machine's CPU per file, and the durable copy alone; then exit",
    )
    ap.add_argument(
        "--orthanc-storage",
        choices=["shm", "disk"],
        default="shm",
        help="Orthanc's storage: tmpfs (CPU-bound server) or the work folder's disk "
        "(a disk-bound server, as on most real deployments)",
    )
    args = ap.parse_args(argv)
    if not orthanc_available():
        print("Orthanc with the DICOMweb plugin is required", file=sys.stderr)
        return 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    servers = iter(range(1_000_000))

    def new_server() -> OrthancServer:
        """A fresh, empty Orthanc; on disk under ``work`` when --orthanc-storage disk."""
        if args.orthanc_storage == "disk":
            return OrthancServer(workdir=work / f"orthanc-{next(servers)}")
        return OrthancServer()

    rows: list[tuple[str, str, str]] = []
    env_extra = {}
    if args.parallel is not None:
        env_extra["GATEWAY_DESTINATION__PARALLEL_REQUESTS"] = str(args.parallel)
    try:
        print(f"generating {args.files} CT slices {args.size}x{args.size} ...", file=sys.stderr)
        corpus = make_corpus(work / "corpus", args.files, args.size, "bench")
        mb = sum(p.stat().st_size for p in corpus) / 1e6
        secret = load_or_create_secret(work / "secret.key")
        deid = deidentify_all(corpus, secret, work / "deid")

        if args.pairs:
            return floor_pairs(args.pairs, deid, work, new_server)

        # Direct STOW of the de-identified files, 4 ways, each on a fresh Orthanc.
        best = 0.0
        for label, per_post, clients in (
            ("direct STOW, 1 file/POST, 1 client", 1, 1),
            ("direct STOW, 25 files/POST, 1 client", 25, 1),
            ("direct STOW, 1 file/POST, 4 clients", 1, 4),
            ("direct STOW, 25 files/POST, 4 clients", 25, 4),
        ):
            with new_server() as server:
                busy0 = machine_busy()
                fps = direct_upload(server, deid, per_post, clients)
                cpu = (machine_busy() - busy0) / len(deid) * 1000
            best = max(best, fps)
            note = f"{fps * mb / len(deid):.0f} MB/s; {cpu:.2f} ms CPU/file"
            rows.append((label, f"{fps:.0f} files/s", note))
            print(rows[-1], file=sys.stderr)
        with new_server() as server:
            busy0 = machine_busy()
            fps = durable_floor(server, deid, work / "floor")
            cpu = (machine_busy() - busy0) / len(deid) * 1000
        rows.append(
            (
                "durable floor: 4 threads copy + fsync, 4 clients post 25",
                f"{fps:.0f} files/s",
                f"{fps / best:.2f} x best direct; {cpu:.2f} ms CPU/file",
            )
        )
        print(rows[-1], file=sys.stderr)

        # The agent: drop -> all stored in Orthanc.
        with new_server() as server:
            agent_dir = work / "agent"
            qc_env = {"GATEWAY_QC__INTERVAL_SECONDS": f"{args.qc_interval:g}"}
            agent = AgentProc(agent_dir, server.dicomweb_url, server.auth, env_extra | qc_env)
            try:
                agent.wait_ready()
                staged = agent_dir / "staged"
                shutil.copytree(work / "corpus", staged)
                _, _, stored0 = agent.qc_progress()
                skipped0 = len(agent.log_events("qc_budget_exhausted"))
                qc0 = agent.qc_cpu_seconds()
                t0 = time.perf_counter()
                busy0 = machine_busy()
                drop_wall = time.time()
                staged.rename(agent.inbox / "drop")
                wait(lambda: server.count_instances() >= len(corpus), 1800, 0.1)
                dt = time.perf_counter() - t0
                cpu = (machine_busy() - busy0) / len(corpus) * 1000
                wait(lambda: agent.counts().get("sent", 0) >= len(corpus), 120)
                t_ack = time.perf_counter()
                fps = len(corpus) / dt
                rows.append(
                    (
                        "agent: drop -> stored in Orthanc",
                        f"{fps:.0f} files/s",
                        f"{fps / best:.2f} x best direct ({best:.0f} files/s); "
                        f"{cpu:.2f} ms CPU/file",
                    )
                )
                print(rows[-1], file=sys.stderr)

                # QC CPU during that ingest: from the drop until the job has processed every new
                # row (at least one QC interval after the last acknowledgement) and is idle again.
                time.sleep(max(0.0, t_ack + args.qc_interval - time.perf_counter()))
                qc1, t_qc = agent.wait_qc_idle()
                qc_cpu, qc_wall = qc1 - qc0, t_qc - t0
                _, _, stored1 = agent.qc_progress()
                skipped = sum(
                    int(str(e.get("skipped", 0)))
                    for e in agent.log_events("qc_budget_exhausted")[skipped0:]
                )
                rows.append(
                    (
                        "QC job CPU during ingest",
                        f"{qc_cpu / qc_wall * 100:.1f} % of 1 core",
                        f"{qc_cpu:.2f} s CPU over {qc_wall:.1f} s; {stored1 - stored0} sampled, "
                        f"{skipped} over budget; interval {args.qc_interval:g} s",
                    )
                )
                print(rows[-1], file=sys.stderr)

                # One file: drop-to-acknowledged latency.
                one = make_corpus(work / "one", 2, args.size, "latency")
                for how, path in (("renamed in", one[0]), ("written in place", one[1])):
                    before = agent.counts().get("sent", 0)
                    t0 = time.perf_counter()
                    if how == "renamed in":
                        tmp = agent.inbox / f".{path.name}.partial"
                        shutil.copyfile(path, tmp)
                        t0 = time.perf_counter()
                        tmp.rename(agent.inbox / path.name)
                    else:
                        shutil.copyfile(path, agent.inbox / path.name)
                    wait(lambda b=before: agent.counts().get("sent", 0) > b, 60, 0.002)
                    lat = time.perf_counter() - t0
                    rows.append((f"latency, one file {how}", f"{lat * 1000:.0f} ms", "to ack"))
                    print(rows[-1], file=sys.stderr)

                # Idle CPU, once the QC job has processed the files just received (the pass
                # over them is work, not idling); passes with nothing new stay in the window.
                report = agent.state / "qc" / "report.json"
                with contextlib.suppress(TimeoutError):
                    wait(lambda: report.exists() and report.stat().st_mtime > drop_wall, 120, 0.5)
                agent.wait_qc_idle()
                time.sleep(2.0)
                c0, t0 = agent.cpu_seconds(), time.perf_counter()
                time.sleep(args.idle_seconds)
                idle = (agent.cpu_seconds() - c0) / (time.perf_counter() - t0) * 100
                rows.append(
                    (
                        f"idle CPU over {args.idle_seconds:.0f} s",
                        f"{idle:.3f} %",
                        f"agent + workers, after the QC pass (QC every {args.qc_interval:g} s)",
                    )
                )
                print(rows[-1], file=sys.stderr)
            finally:
                agent.stop()

        # Peak RSS with many files queued: destination down, everything waits in the outbox.
        q_dir = work / "queued-corpus"
        print(f"generating {args.queued} small files ...", file=sys.stderr)
        make_corpus(q_dir, args.queued, args.queued_size, "queued")
        down = OrthancServer()  # never started: connection refused
        agent_dir = work / "agent-queued"
        agent = AgentProc(agent_dir, down.dicomweb_url, down.auth, env_extra)
        try:
            agent.wait_ready()
            drop(q_dir, agent.inbox, "drop")
            peak_main = peak_kids = 0.0

            def queued() -> bool:
                nonlocal peak_main, peak_kids
                m, k = agent.rss_mb()
                peak_main, peak_kids = max(peak_main, m), max(peak_kids, k)
                return agent.counts().get("queued", 0) + agent.counts().get(
                    "sending", 0
                ) >= args.queued and not any(agent.inbox.rglob("*.dcm"))

            wait(queued, 1800, 0.2)
            hwm_main, _ = agent.rss_mb("VmHWM")
            rows.append(
                (
                    f"peak RSS, {args.queued} files queued",
                    f"{max(hwm_main, peak_main):.0f} MB agent",
                    f"+ {peak_kids:.0f} MB in de-id workers (sampled)",
                )
            )
            print(rows[-1], file=sys.stderr)
        finally:
            agent.stop()
            down.close()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{args.files} CT slices {args.size}x{args.size} ({mb:.0f} MB), "
        f"Orthanc on loopback, storage on {args.orthanc_storage}"
    )
    print(f"| {'measure':44} | {'value':>16} | {'note':40} |")
    print(f"|{'-' * 46}|{'-' * 18}|{'-' * 42}|")
    for a, b, c in rows:
        print(f"| {a:44} | {b:>16} | {c:40} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
