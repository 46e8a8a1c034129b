"""Coverage-guided fuzz target for the header path: any bytes -> de-identified output or DeidError.

Run with atheris (libFuzzer), bounded::

    uv run python fuzz/fuzz_header.py -max_total_time=60 -timeout=10 -rss_limit_mb=2048 CORPUS_DIR

or, where atheris cannot be installed, with plain seeded random mutation of the same seeds::

    uv run python fuzz/fuzz_header.py --plain --seconds 60 --seed 1 CORPUS_DIR

The property: ``Deidentifier.deidentify_file`` either returns or raises ``IngestError``; any
other exception, or a temp file left in the output folder, is a crash (atheris writes the input
to ``crash-*``; plain mode to ``CORPUS_DIR/../plain-crash-*``). Per-input time is bounded by
atheris' ``-timeout``; in plain mode an input taking longer than ``--input-timeout`` seconds is
reported as a hang. With ``FUZZ_CHECK_PHI=1`` a planted PHI marker in the output *header* is a
crash too (off by default: the pixel bytes are copied as they are by design, and the known
free-text cleaning issue, see tests/reliability/test_hostile.py, would stop every run).
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

try:
    import atheris
except ImportError:  # plain mode still works
    atheris = None

if atheris is not None and "--plain" not in sys.argv:
    with atheris.instrument_imports(include=["gateway_agent", "pydicom"]):
        import pydicom  # noqa: F401

        from gateway_agent._exceptions import IngestError
        from gateway_agent.deid import Deidentifier
else:
    from gateway_agent._exceptions import IngestError
    from gateway_agent.deid import Deidentifier

import contextlib

from gateway_agent.synthetic import PHI_MARKERS

_SHM = "/dev/shm"  # noqa: S108 - a private mkdtemp inside it, for speed
_WORK = Path(tempfile.mkdtemp(prefix="gw-fuzz-", dir=_SHM if os.access(_SHM, os.W_OK) else None))
atexit.register(shutil.rmtree, _WORK, True)
_OUT = _WORK / "out"
_OUT.mkdir()
_IN = _WORK / "input.dcm"
_MARKERS = tuple(m.encode().lower() for m in PHI_MARKERS)
_DEID = Deidentifier(b"fuzz-secret-0123456789abcdef0123", None, station_name="FUZZ")
_CHECK_PHI = os.environ.get("FUZZ_CHECK_PHI", "") not in ("", "0")
_PIXEL_TAG = b"\xe0\x7f\x10\x00"


class PropertyViolationError(Exception):
    """The header path broke its contract for this input."""


def test_one_input(data: bytes) -> None:
    """One input: write it, de-identify it, check the contract, clean up."""
    _IN.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(IngestError):
            _DEID.deidentify_file(_IN, _OUT)
    left = list(_OUT.iterdir())
    for path in left:
        if path.name.startswith(".") or path.suffix in (".tmp", ".partial"):
            raise PropertyViolationError(f"temp file left in the output folder: {path.name}")
        if _CHECK_PHI:
            out = path.read_bytes()
            header = out[: out.rfind(_PIXEL_TAG)] if _PIXEL_TAG in out else out
            leaked = [m.decode() for m in _MARKERS if m in header.lower()]
            if leaked:
                raise PropertyViolationError(f"planted PHI in the output header: {leaked}")
        path.unlink()


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        op = rng.randrange(7)
        if not buf:
            buf = bytearray(rng.choice(seeds))
        pos = rng.randrange(len(buf))
        if op == 0:  # flip a bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # random byte
            buf[pos] = rng.randrange(256)
        elif op == 2:  # truncate
            del buf[pos:]
        elif op == 3:  # interesting 32-bit little-endian value
            val = rng.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x10000, len(buf)))
            buf[pos : pos + 4] = val.to_bytes(4, "little")
        elif op == 4:  # interesting 16-bit value
            buf[pos : pos + 2] = rng.choice((0, 0xFFFF, 0x8000, 1)).to_bytes(2, "little")
        elif op == 5:  # duplicate a slice
            end = min(len(buf), pos + rng.randrange(1, 256))
            buf[pos:pos] = buf[pos:end]
        else:  # splice in a piece of another seed
            other = rng.choice(seeds)
            if other:
                a = rng.randrange(len(other))
                buf[pos:pos] = other[a : a + rng.randrange(1, 512)]
    return bytes(buf)


def plain_fuzz(corpus: Path, seconds: float, seed: int, input_timeout: float) -> int:
    """Seeded random mutation of the corpus for ``seconds``; return the process exit status."""
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()] or [b""]
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    runs = 0
    slowest = 0.0
    while time.monotonic() < end:
        data = _mutate(rng, rng.choice(seeds), seeds)
        t0 = time.monotonic()
        try:
            test_one_input(data)
        except Exception as exc:
            crash = corpus.parent / f"plain-crash-{seed}-{runs}"
            crash.write_bytes(data)
            print(f"CRASH after {runs} runs: {type(exc).__name__}: {exc} (input: {crash})")
            return 1
        took = time.monotonic() - t0
        slowest = max(slowest, took)
        if took > input_timeout:
            crash = corpus.parent / f"plain-hang-{seed}-{runs}"
            crash.write_bytes(data)
            print(f"HANG: one input took {took:.1f} s (input: {crash})")
            return 1
        runs += 1
    print(f"plain fuzz: {runs} runs in {seconds:.0f} s, no crash, slowest input {slowest:.2f} s")
    return 0


def main() -> int:
    if "--plain" in sys.argv or atheris is None:
        p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        p.add_argument("--plain", action="store_true")
        p.add_argument("--seconds", type=float, default=20.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--input-timeout", type=float, default=10.0)
        p.add_argument("corpus", type=Path)
        args, _ = p.parse_known_args()
        return plain_fuzz(args.corpus, args.seconds, args.seed, args.input_timeout)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
