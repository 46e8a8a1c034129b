"""Fleet QC over a central archive: ``gateway-agent qc --dicomweb`` against a loopback Orthanc.

Run::

    uv run python benchmarks/bench_qc_archive.py [--series 2000] [--slices 3] [--size 256]

Loads ``--series`` de-identified CT series (``--slices`` instances of ``--size``² pixels each,
``--series-per-study`` series per study, six scanners behind three edge boxes, one scanner
detuned) into an empty Orthanc with its DICOMweb plugin (storage on /dev/shm when present), then
times, each in a fresh process:

* ``gateway-agent qc --dicomweb URL --report DIR`` (the first run: every series fetched);
* the same command again (nothing new: the listing only, features from the cache);
* what a user would do without it: retrieve every series whole (WADO-RS, 4 in parallel) into a
  folder, then ``gateway-agent qc DIR``.

It prints series per second, bytes fetched per series, requests, peak RSS (``wait4``) and the
rerun's time as a share of the first run's, side by side in one table, and checks that the
detuned scanner is the one flagged.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from gateway_agent.deid import Deidentifier
from gateway_agent.synthetic import make_fleet_series, synthetic_fleet
from tests._orthanc import OrthancServer

__all__ = ["main"]

SECRET = b"bench-site-secret-0123456789abcdef"
BOXES = ("EDGE01", "EDGE02", "EDGE03")
SCANNERS = 6


def _templates(slices: int, size: int) -> list[tuple[list[bytes], list[str], str]]:
    """Per scanner: its de-identified instances (bytes), the series' UIDs to vary per series
    (SOP instances and the series), and the study's."""
    out = []
    for i, scanner in enumerate(synthetic_fleet(SCANNERS)):
        deid = Deidentifier(SECRET, station_name=BOXES[i % len(BOXES)])
        files, uids = [], []
        for ds in make_fleet_series(scanner, 0, slices=slices, rows=size, cols=size):
            deid.deidentify_dataset(ds)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            files.append(buf.getvalue())
            uids.append(str(ds.SOPInstanceUID))
        uids.append(str(ds.SeriesInstanceUID))
        out.append((files, uids, str(ds.StudyInstanceUID)))
    return out


def _vary(data: bytes, uids: list[str], study: str, j: int, study_j: int) -> bytes:
    """The instance with its series and SOP UIDs made unique to series ``j``, and its study
    UID to study ``study_j``."""
    for uid, k in [*((u, j) for u in uids), (study, study_j)]:
        data = data.replace(uid.encode(), (uid[:-7] + f"{k:07d}").encode())
    return data


def load(
    server: OrthancServer, series: int, slices: int, size: int, per_study: int = 1
) -> tuple[int, float]:
    """Upload the fleet (native ``POST /instances``, 4 in parallel); returns (instances, MB).

    A study holds ``per_study`` series of one scanner."""
    templates = _templates(slices, size)
    client = httpx.Client(auth=server.auth, timeout=60)
    total = 0

    def one(j: int) -> int:
        study_j = j // per_study
        files, uids, study = templates[study_j % len(templates)]
        n = 0
        for data in files:
            varied = _vary(data, uids, study, j, study_j)
            r = client.post(server.base_url + "/instances", content=varied)
            r.raise_for_status()
            n += len(data)
        return n

    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(one, range(series)))
    client.close()
    return series * slices, total / 1e6


def _run(argv: list[str]) -> tuple[float, float, str]:
    """Run a command in a fresh process: ``(wall s, peak RSS MB, stdout)``; the peak comes from
    :data:`_WRAPPER` (``wait4`` of that one child, not the maximum over every child so far)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(argv[:4])}... failed ({proc.returncode}):\n{err[-2000:]}")
    match = re.search(r"^peak_rss_kb=(\d+)$", err, re.MULTILINE)
    rss = int(match.group(1)) / 1024 if match else float("nan")
    return wall, rss, out


_WRAPPER = (
    "import os, sys, resource\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(f'peak_rss_kb={usage.ru_maxrss}', file=sys.stderr)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def _measured(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", _WRAPPER, *argv]


def retrieve_all(server: OrthancServer, folder: Path) -> tuple[int, int]:
    """Every series whole (WADO-RS ``/studies/{st}/series/{se}``), 4 in parallel: (requests,
    bytes). The parts are written as files for ``gateway-agent qc DIR``."""
    client = httpx.Client(auth=server.auth, timeout=120)
    listing = []
    offset = 0
    while True:
        page = client.get(
            server.dicomweb_url + "/series", params={"limit": 1000, "offset": offset}
        ).json()
        listing += [(s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]) for s in page]
        if len(page) < 1000:
            break
        offset += len(page)

    def one(item: tuple[str, str]) -> int:
        study, series = item
        r = client.get(
            f"{server.dicomweb_url}/studies/{study}/series/{series}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        r.raise_for_status()
        boundary = r.headers["content-type"].split("boundary=")[1].strip('"')
        parts = r.content.split(b"--" + boundary.encode())
        target = folder / series
        target.mkdir(parents=True)
        for k, part in enumerate(p for p in parts if b"\r\n\r\n" in p):
            body = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
            (target / f"{k}.dcm").write_bytes(body)
        return len(r.content)

    with ThreadPoolExecutor(4) as pool:
        total = sum(pool.map(one, listing))
    client.close()
    return len(listing) + 1, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--series", type=int, default=2000)
    p.add_argument("--slices", type=int, default=3, help="instances per series in the archive")
    p.add_argument("--size", type=int, default=256, help="rows and columns of each image")
    p.add_argument("--series-per-study", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--no-baseline", action="store_true", help="skip retrieve-all + qc DIR")
    args = p.parse_args(argv)
    exe = [sys.executable, "-m", "gateway_agent"]
    with OrthancServer() as server, tempfile.TemporaryDirectory(prefix="bench-qca-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        instances, mb = load(server, args.series, args.slices, args.size, args.series_per_study)
        print(
            f"archive: {args.series} series in {-(-args.series // args.series_per_study)} "
            f"studies, {instances} instances ({args.size}x{args.size}), "
            f"{mb:.0f} MB, loaded in {time.perf_counter() - t0:.0f} s; Orthanc storage "
            f"{'on tmpfs' if str(server.workdir).startswith('/dev/shm') else 'on disk'}\n"
        )
        password = work / "password"
        password.write_text(server.auth[1])
        qc = [
            *exe, "qc", "--dicomweb", server.dicomweb_url, "--auth", "basic",
            "--username", server.auth[0], "--password-file", str(password),
            "--report", str(work / "report"), "--no-progress", "--workers", str(args.workers),
        ]  # fmt: skip
        rows = []
        for name in ("first run", "rerun, nothing new"):
            wall, rss, out = _run(_measured(qc))
            report = json.loads((work / "report" / "report.json").read_text())
            got = re.search(r"(\d+) requests, ([\d.]+) (B|kB|MB|GB) in", out)
            assert got is not None, out
            requests = int(got.group(1))
            nbytes = float(got.group(2)) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[got.group(3)]
            rows.append(
                (
                    f"gateway-agent qc --dicomweb ({name})",
                    wall,
                    args.series / wall,
                    nbytes / args.series,
                    requests,
                    rss,
                )
            )
            flagged = {s for s, d in report["scanners"].items() if d["outlier_series"]}
            detuned = [s for s, d in report["scanners"].items() if "air_mean" in d["reasons"]]
            print(f"{name}: {out.splitlines()[0]}")
        if not args.no_baseline:
            folder = work / "all"
            t0 = time.perf_counter()
            requests, nbytes = retrieve_all(server, folder)
            fetch = time.perf_counter() - t0
            wall, rss, _out = _run(
                _measured([*exe, "qc", str(folder), "--report", str(work / "r2"), "--no-progress"])
            )
            rows.append(
                (
                    "WADO-RS every series whole + qc DIR",
                    fetch + wall,
                    args.series / (fetch + wall),
                    nbytes / args.series,
                    requests,
                    rss,
                )
            )
    print()
    print("| way | wall s | series/s | bytes per series | requests | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, wall, rate, per, requests, rss in rows:
        print(f"| {name} | {wall:.1f} | {rate:.1f} | {per:,.0f} | {requests} | {rss:.0f} |")
    share = rows[1][1] / rows[0][1]
    print(f"\nrerun with nothing new: {100 * share:.1f} % of the first run's time (target < 5 %)")
    print(f"peak RSS of the first run: {rows[0][5]:.0f} MB (target < 300 MB)")
    print(f"detuned scanner flagged: {sorted(detuned)} of {len(flagged)} scanners with outliers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
