"""S3 upload throughput and the cost of routing, side by side in one run.

Part 1: the same N de-identified-like CT files (512x512, about 0.5 MB each) uploaded to a fresh
prefix of a loopback SeaweedFS (storage on /dev/shm when present) by

* boto3's ``upload_file`` in a loop, and in 4 threads (what a user would script instead);
* the agent's S3 destination (its ``Uploader``, 4 workers, SHA-256 checksums sent and checked),
  with acknowledgements trusted, and with every object proven by a ``HEAD`` (``confirm``);
* the same agent with a folder destination (on the same tmpfs): the agent's own overhead.

Part 2 (routing): CPU time per file of the agent committing N instances to its outbox and
delivering them to 1, 2 and 3 destinations that take every instance and acknowledge at once
(no transfer: what remains is the agent's own work per destination: routing, claims, outcome
records), and what each extra destination adds.

    uv run python benchmarks/bench_s3.py --n 400 --reps 3
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway_agent.agent.outbox.routing import Route
from gateway_agent.agent.outbox.store import Outbox
from gateway_agent.agent.outbox.upkeep import row_from_file
from gateway_agent.agent.upload.destinations import destination_from_settings
from gateway_agent.agent.upload.destinations.folder import FolderDestination
from gateway_agent.agent.upload.uploader import Uploader
from gateway_agent.config import DestinationSettings
from gateway_agent.synthetic import make_ct_slice
from tests._s3 import ACCESS_KEY, SECRET_KEY, S3Server

BUCKET = "gateway"
WORKERS = 4


def make_corpus(directory: Path, n: int, size: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = make_ct_slice(
            study_seed="bench-s3",
            instance_number=i + 1,
            plant_phi=False,
            seed=i,
            rows=size,
            cols=size,
        )
        p = directory / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _scratch() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="bench-s3-", dir=base))


# -- part 1: S3 throughput ---------------------------------------------------------------------
def boto3_upload_file(threads: int) -> Callable[[S3Server, list[Path], str, Path], float]:
    def run(server: S3Server, paths: list[Path], prefix: str, _work: Path) -> float:
        client = server.client()
        keys = [f"{prefix}/{p.name}" for p in paths]
        t0 = time.perf_counter()
        if threads == 1:
            for p, k in zip(paths, keys, strict=True):
                client.upload_file(
                    str(p), BUCKET, k, ExtraArgs={"ContentType": "application/dicom"}
                )
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(
                    pool.map(
                        lambda pk: client.upload_file(
                            str(pk[0]),
                            BUCKET,
                            pk[1],
                            ExtraArgs={"ContentType": "application/dicom"},
                        ),
                        zip(paths, keys, strict=True),
                    )
                )
        elapsed = time.perf_counter() - t0
        client.close()
        return elapsed

    return run


def _outbox(work: Path, paths: list[Path], routes: Sequence[Route] = (Route("default"),)) -> Outbox:
    ob = Outbox(work / f"outbox-{secrets.token_hex(4)}.db", routes=routes)
    ob.add_many([row_from_file(p, {}) for p in paths])
    return ob


def _drain(ob: Outbox, uploaders: list[Uploader], n: int, *, proven: bool = False) -> float:
    """Seconds until every destination acknowledged the ``n`` instances (``proven``: and proved
    it holds every one)."""
    t0 = time.perf_counter()
    for up in uploaders:
        up.start()
    names = [up.name for up in uploaders]
    while any(ob.counts(name)["sent"] < n for name in names):
        time.sleep(0.005)
    while proven and any(ob.proof_summary(name)["pending"][0] for name in names):
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    for up in uploaders:
        up.stop(time.monotonic() + 10)
        up.destination.close()
    return elapsed


def agent_s3(confirm: bool) -> Callable[[S3Server, list[Path], str, Path], float]:
    def run(server: S3Server, paths: list[Path], prefix: str, work: Path) -> float:
        creds = work / "aws-credentials"
        creds.write_text(
            f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        settings = DestinationSettings(
            kind="s3",
            bucket=BUCKET,
            prefix=prefix,
            endpoint_url=server.endpoint,
            aws_credentials_file=creds,
            parallel_requests=WORKERS,
            confirm_storage=confirm,
        )
        ob = _outbox(work, paths)
        dest = destination_from_settings(settings)
        up = Uploader(ob, dest, settings, rng=random.Random(0))
        elapsed = _drain(ob, [up], len(paths), proven=confirm)
        if confirm and ob.proof_summary()["unproven"][0]:
            raise SystemExit("agent, s3: objects acknowledged without proof of storage")
        ob.close()
        return elapsed

    return run


def agent_folder(server: S3Server, paths: list[Path], prefix: str, work: Path) -> float:
    settings = DestinationSettings(kind="folder", parallel_requests=WORKERS)
    ob = _outbox(work, paths)
    target = work / f"folder-{prefix}"
    up = Uploader(ob, FolderDestination(target), settings, rng=random.Random(0))
    elapsed = _drain(ob, [up], len(paths))
    ob.close()
    shutil.rmtree(target, ignore_errors=True)
    return elapsed


# -- part 2: routing overhead ------------------------------------------------------------------
class _Acknowledging:
    """A destination that acknowledges every instance at once (no transfer)."""

    label = "null"

    def send(self, items: Any) -> Any:
        from gateway_agent.agent.upload.destinations import SendResult

        return SendResult(sent=[r.sop_instance_uid for r in items])

    def close(self) -> None:
        pass


def routing_cpu(paths: list[Path], k: int, work: Path) -> tuple[float, float]:
    """CPU seconds (every thread of this process) to commit ``paths`` with ``k`` destinations,
    and to deliver them to ``k`` destinations that acknowledge at once."""
    routes = [Route(f"d{i}") for i in range(k)]
    items = [row_from_file(p, {}) for p in paths]
    ob = Outbox(work / f"route-{secrets.token_hex(4)}.db", routes=routes)
    c0 = time.process_time()
    for i in range(0, len(items), 16):  # intake commits in groups
        ob.add_many(items[i : i + 16])
    c1 = time.process_time()
    uploaders = [
        Uploader(
            ob,
            _Acknowledging(),
            DestinationSettings(name=f"d{i}", kind="folder", parallel_requests=WORKERS),
            rng=random.Random(i),
        )
        for i in range(k)
    ]
    c2 = time.process_time()
    _drain(ob, uploaders, len(paths))
    c3 = time.process_time()
    ob.close()
    return c1 - c0, c3 - c2


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="files per mode")
    ap.add_argument("--size", type=int, default=512, help="rows and columns of each CT slice")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

    work = _scratch()
    server = S3Server()
    try:
        server.start()
        paths = make_corpus(work / "files", args.n, args.size)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        modes: list[tuple[str, Callable[[S3Server, list[Path], str, Path], float]]] = [
            ("boto3 upload_file, 1 thread", boto3_upload_file(1)),
            (f"boto3 upload_file, {WORKERS} threads", boto3_upload_file(WORKERS)),
            (f"agent, s3 ({WORKERS} workers, SHA-256)", agent_s3(confirm=False)),
            ("agent, s3, every object proven (HEAD)", agent_s3(confirm=True)),
            ("agent, folder destination (tmpfs)", agent_folder),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in modes}
        for rep in range(args.reps):  # round-robin: load from elsewhere hits every mode alike
            for name, fn in modes:
                prefix = f"r{rep}-{secrets.token_hex(3)}"
                secs = fn(server, paths, prefix, work)
                if not name.startswith("agent, folder"):
                    stored = server.objects(prefix=prefix + "/")
                    if len(stored) != args.n:
                        raise SystemExit(f"{name}: {len(stored)} objects, expected {args.n}")
                times[name].append(secs)
                print(f"  rep {rep + 1} {name}: {args.n / secs:.0f} files/s", file=sys.stderr)
        ref = min(statistics.median(times[name]) for name, _ in modes[:2])  # the better boto3
        print(
            f"\n{args.n} files of {args.size}x{args.size}, {mb:.1f} MB, median of {args.reps};"
            " SeaweedFS on loopback\n"
        )
        print(f"| {'mode':<40} | files/s | MB/s | x best boto3 |")
        print(f"|{'-' * 42}|--------:|-----:|-------------:|")
        for name, _ in modes:
            secs = statistics.median(times[name])
            fps = args.n / secs
            print(f"| {name:<40} | {fps:7.0f} | {mb / secs:4.0f} | {ref / secs:12.2f} |")

        print(
            f"\nRouting: the agent's CPU per file, {args.n} files, destinations that ack at once\n"
        )
        print("| destinations | commit ms/file | deliver ms/file | total ms/file | + per extra |")
        print("|-------------:|---------------:|----------------:|--------------:|------------:|")
        base = None
        for k in (1, 2, 3):
            runs = [routing_cpu(paths, k, work) for _ in range(args.reps)]
            commit = statistics.median(r[0] for r in runs) * 1000 / args.n
            deliver = statistics.median(r[1] for r in runs) * 1000 / args.n
            total = commit + deliver
            extra = "" if base is None else f"{(total - base) / (k - 1):.3f}"
            base = total if base is None else base
            print(f"| {k:12d} | {commit:14.3f} | {deliver:15.3f} | {total:13.3f} | {extra:>11} |")
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
