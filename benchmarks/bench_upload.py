"""Upload throughput on loopback: direct STOW-RS modes vs the agent's Uploader draining an outbox.

Every mode uploads the same N already de-identified-like CT files (512x512, no PHI) to a fresh,
empty Orthanc (storage on /dev/shm when present), reads the files inside the timed region and is
checked with /statistics. Prints a table with files/s, MB/s and the ratio to the best direct mode.
The uploader runs twice with its defaults: storage proven by QIDO-RS (the default) and with
``confirm_storage = false`` (acknowledgements trusted); the last column of those two rows is the
cost of the proof.

    uv run python benchmarks/bench_upload.py --n 500 [--reps 3] [--sweep]
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.upload.destinations.dicomweb import DicomWebDestination
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.config import DestinationSettings
from gateway_agent.synthetic import make_ct_slice
from tests._orthanc import OrthancServer
from tests._procs import cpu_seconds


def make_corpus(directory: Path, n: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = make_ct_slice(study_seed="bench", instance_number=i + 1, plant_phi=False, seed=i)
        p = directory / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _stow(client: httpx.Client, url: str, paths: Sequence[Path]) -> None:
    boundary = "b" + secrets.token_hex(8)
    chunks = []
    for p in paths:
        chunks += [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            p.read_bytes(),
            b"\r\n",
        ]
    chunks.append(f"--{boundary}--\r\n".encode())
    r = client.post(
        url + "/studies",
        content=b"".join(chunks),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    r.raise_for_status()


def direct(per_post: int, clients: int) -> Callable[[OrthancServer, list[Path], Path], None]:
    def run(server: OrthancServer, paths: list[Path], _work: Path) -> None:
        batches = [paths[i : i + per_post] for i in range(0, len(paths), per_post)]
        with httpx.Client(auth=server.auth, timeout=120) as client:
            if clients == 1:
                for b in batches:
                    _stow(client, server.dicomweb_url, b)
            else:
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(lambda b: _stow(client, server.dicomweb_url, b), batches))

    return run


def _fill_outbox(work: Path, paths: list[Path]) -> Outbox:
    ob = Outbox(work / f"outbox-{secrets.token_hex(4)}.db")
    for p in paths:
        ob.add_file(p, audit={})
    return ob


def uploader(
    batch: int, parallel: int, confirm: bool = True
) -> Callable[[OrthancServer, list[Path], Path], tuple[float, float]]:
    """Returns ``(seconds until all acknowledged, seconds until all proven stored)``, timed
    itself (filling the outbox is intake's work, not timed)."""

    def run(server: OrthancServer, paths: list[Path], work: Path) -> tuple[float, float]:
        ob = _fill_outbox(work, paths)
        settings = DestinationSettings(
            kind="dicomweb",
            url=server.dicomweb_url,
            batch_max_instances=batch,
            parallel_requests=parallel,
            confirm_storage=confirm,
        )
        dest = DicomWebDestination(
            server.dicomweb_url,
            auth=httpx.BasicAuth(*server.auth),
            max_connections=parallel + 2,
            confirm_storage=confirm,
        )
        up = Uploader(ob, dest, settings, rng=random.Random(0))
        t0 = time.perf_counter()
        up.start()
        while ob.counts()["sent"] < len(paths):
            time.sleep(0.005)
        acknowledged = time.perf_counter() - t0
        while ob.proof_summary()["pending"][0]:
            time.sleep(0.005)
        proven = time.perf_counter() - t0
        if confirm and ob.proof_summary()["unproven"][0]:
            raise SystemExit("uploader: rows sent without proof of storage")
        up.stop(time.monotonic() + 10)
        dest.close()
        ob.close()
        return acknowledged, proven

    return run


def run_once(
    name: str, fn: Callable[..., object], paths: list[Path], work: Path
) -> tuple[float, float, float, float]:
    """``(seconds until acknowledged, client CPU s, Orthanc CPU s, seconds until proven)`` of
    one mode on a fresh Orthanc (a direct upload proves nothing: both times are the same)."""
    with OrthancServer() as server:
        assert server.pid is not None
        server_cpu = cpu_seconds([server.pid])
        client_cpu = time.process_time()
        t0 = time.perf_counter()
        got = fn(server, paths, work)
        elapsed = time.perf_counter() - t0
        acknowledged, proven = got if isinstance(got, tuple) else (elapsed, elapsed)
        client_cpu = time.process_time() - client_cpu
        server_cpu = cpu_seconds([server.pid]) - server_cpu
        n = server.count_instances()
        if n != len(paths):
            raise SystemExit(f"{name}: Orthanc holds {n} instances, expected {len(paths)}")
    return acknowledged, client_cpu, server_cpu, proven


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="also try other Uploader batch/parallel")
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only

    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        work = Path(tmp)
        paths = make_corpus(work / "files", args.n)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        modes: list[tuple[str, Callable[..., object], bool]] = [
            ("direct: 1 file/POST, sequential", direct(1, 1), True),
            ("direct: 25 files/POST, sequential", direct(25, 1), True),
            ("direct: 4 clients, 1 file/POST", direct(1, 4), True),
            ("direct: 4 clients x 25 files/POST", direct(25, 4), True),
            ("Uploader (defaults: 25/POST, 4 workers)", uploader(25, 4), False),
            ("Uploader, confirm_storage = false", uploader(25, 4, confirm=False), False),
        ]
        if args.sweep:
            for batch, par in ((1, 4), (10, 4), (25, 2), (50, 4)):
                modes.append(
                    (f"Uploader ({batch}/POST, {par} workers)", uploader(batch, par), False)
                )
        # Round-robin over the modes, so that load from elsewhere hits every mode alike.
        times: dict[str, list[tuple[float, ...]]] = {name: [] for name, _, _ in modes}
        for rep in range(args.reps):
            for name, fn, _ in modes:
                got = run_once(name, fn, paths, work)
                times[name].append(got)
                print(f"  rep {rep + 1} {name}: {args.n / got[0]:.0f} files/s", file=sys.stderr)

        def median(name: str, i: int) -> float:
            return statistics.median(t[i] for t in times[name])

        best = max(args.n / median(name, 0) for name, _, d in modes if d)
        print(f"\n{args.n} files, {mb:.1f} MB, median of {args.reps}; Orthanc storage on tmpfs\n")
        print(
            f"| {'mode':<42} | files/s | MB/s | x best direct | all proven after s "
            "| client CPU ms/file | Orthanc CPU ms/file |"
        )
        print(
            f"|{'-' * 44}|--------:|-----:|--------------:|-------------------:"
            f"|-------------------:|{'-' * 20}:|"
        )
        for name, _, direct_mode in modes:
            secs = median(name, 0)
            fps = args.n / secs
            client, server = (1000 * median(name, i) / args.n for i in (1, 2))
            proven = "-" if direct_mode else f"{median(name, 3):.1f}"
            print(
                f"| {name:<42} | {fps:7.0f} | {mb / secs:4.0f} | {fps / best:13.2f} "
                f"| {proven:>18} | {client:18.2f} | {server:19.2f} |"
            )
        with_proof = "Uploader (defaults: 25/POST, 4 workers)"
        trusted = "Uploader, confirm_storage = false"
        print(
            f"\nProof of storage (QIDO-RS, one query per study and 40 instances, off the upload "
            f"path): {median(with_proof, 0) / median(trusted, 0) - 1:+.0%} time to acknowledge "
            f"all, {median(with_proof, 3) / median(trusted, 3) - 1:+.0%} time until all are "
            f"proven (or, without proof, acknowledged), "
            f"{1000 * (median(with_proof, 1) - median(trusted, 1)) / args.n:+.2f} ms client CPU "
            f"and {1000 * (median(with_proof, 2) - median(trusted, 2)) / args.n:+.2f} ms Orthanc "
            "CPU per file."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
