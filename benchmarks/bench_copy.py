"""How to copy the pixel bytes into a new file: the kernel's ways side by side, on one folder.

The de-identification path writes every output as a new file holding the input's pixel data
element byte for byte. This times the candidate system-call sequences for that copy over the
benchmark's 200 CT slices (512 x 512, 525 kB each), interleaved, with ``os.sync()`` before each
round, and prints CPU and wall time per round (medians):

* ``copy_file_range``, ``sendfile``;
* ``pread`` into a reused 1 MiB buffer + ``write`` (what gateway-agent uses);
* each of those after one ``posix_fallocate`` of the whole output.

Usage (from the repository root)::

    uv run python benchmarks/bench_copy.py [--rounds 7] [--slices 200] [--workdir DIR]

The input is the one ``benchmarks/bench_deid.py`` generates in the same ``--workdir`` (default
``benchmarks/.bench-work``; generated here if missing); the copies go to ``WORKDIR/copy``, on
the filesystem the de-identification benchmark writes to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_deid import ensure_input, warm  # noqa: E402

_BUF = bytearray(1 << 20)


def _cfr(src: int, dst: int, size: int) -> None:
    left, offset = size, 0
    while left > 0:
        n = os.copy_file_range(src, dst, left, offset)
        left, offset = left - n, offset + n


def _sendfile(src: int, dst: int, size: int) -> None:
    offset = 0
    while offset < size:
        offset += os.sendfile(dst, src, offset, size - offset)


def _pread_write(src: int, dst: int, size: int) -> None:
    view, offset = memoryview(_BUF), 0
    while offset < size:
        n = os.preadv(src, [view[: min(size - offset, len(_BUF))]], offset)
        os.write(dst, view[:n])
        offset += n


def _fallocated(copy: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
    def run(src: int, dst: int, size: int) -> None:
        os.posix_fallocate(dst, 0, size)
        copy(src, dst, size)

    return run


MODES: dict[str, Callable[[int, int, int], None]] = {
    "copy_file_range": _cfr,
    "sendfile": _sendfile,
    "pread + write (1 MiB buffer)": _pread_write,
    "fallocate + copy_file_range": _fallocated(_cfr),
    "fallocate + sendfile": _fallocated(_sendfile),
    "fallocate + pread + write (gateway-agent)": _fallocated(_pread_write),
}


def one_round(
    files: list[Path], out: Path, copy: Callable[[int, int, int], None]
) -> tuple[float, float]:
    """(wall ms, CPU ms) of copying every file into a fresh ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for i, path in enumerate(files):
        src = os.open(path, os.O_RDONLY)
        dst = os.open(out / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            copy(src, dst, os.fstat(src).st_size)
        finally:
            os.close(src)
            os.close(dst)
    return (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".bench-work")
    args = ap.parse_args(argv)
    src = ensure_input(args.workdir, args.slices)
    out = args.workdir / "copy"
    files = sorted(p for p in src.iterdir() if p.is_file())
    warm(src)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in MODES}
    names = list(MODES)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(one_round(files, out, MODES[name]))
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"Copying {len(files)} files ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB) "
        f"into {out}, median of {args.rounds} interleaved rounds"
    )
    print()
    print("| way | wall ms | CPU ms | CPU µs per file |")
    print("|---|--:|--:|--:|")
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {cpu / len(files) * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
