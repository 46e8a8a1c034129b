"""The burned-in policy's cost per file (``header_risk``): memo hits and misses, with and
without the device signatures' pre-filter, side by side in one run.

Run::

    uv run python benchmarks/bench_policy.py [--slices 1000] [--repeat 15]

For an acquired 512x512 CT slice of each signature vendor (``gateway_agent.synthetic``, read
back with the agent's own header reader), it times ``header_risk`` over one series of
``--slices`` slices (the same header values: every call after the first is a memo hit) and over
``--slices`` distinct series (SeriesDescription and WindowWidth differ: every call is a miss, as
for an MR series windowed per image). "no pre-filter" runs the 52 signatures on every miss.
Figures are the best of ``--repeat`` passes, in µs per call.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from gateway_agent.deid.pixels import policy, signatures
from gateway_agent.dicom.codec import Element
from gateway_agent.dicom.files import SourceFile
from gateway_agent.synthetic import make_ct_slice, write_series

__all__ = ["main"]

VENDORS = (
    ("GE MEDICAL SYSTEMS", "Revolution CT"),
    ("SIEMENS", "SOMATOM Force"),
    ("TOSHIBA", "Aquilion ONE"),
    ("Philips", "iCT 256"),
)
Top = Mapping[int, Element]


def _top(path: Path) -> dict[int, Element]:
    with SourceFile(path) as source:
        header = source.read_header()
    top: dict[int, Element] = {}
    for el in header.elements:
        top.setdefault(el.tag, el)
    return top


def _text(tag: int, vr: str, value: str) -> Element:
    raw = value.encode("ascii")
    return Element(tag, vr, raw + b" " * (len(raw) % 2))


def _per_call(tops: list[Top], repeat: int) -> float:
    """Best of ``repeat`` passes over ``tops`` (memo emptied first), µs per call."""
    best = float("inf")
    for _ in range(repeat):
        policy._memo.clear()
        start = time.perf_counter_ns()
        for top in tops:
            policy.header_risk(top, None)
        best = min(best, (time.perf_counter_ns() - start) / len(tops) / 1000)
    return best


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=1000, help="slices, and series (1000)")
    parser.add_argument("--repeat", type=int, default=15, help="passes; the best is shown")
    args = parser.parse_args(argv)
    with_filter: Callable[[signatures._Values], bool] = signatures._may_match
    print(f"header_risk, µs per call, best of {args.repeat} passes of {args.slices} calls\n")
    print(
        "| vendor (acquired CT slice) | hits, pre-filter | hits, none "
        "| misses, pre-filter | misses, none | misses: none / pre-filter |"
    )
    print("|---|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for manufacturer, model in VENDORS:
            ds = make_ct_slice(rows=512, cols=512, manufacturer=manufacturer, model=model)
            (path,) = write_series([ds], Path(tmp) / manufacturer.split()[0])
            base = _top(path)
            assert policy.header_risk(base, None) is None, manufacturer  # header-only
            series: list[Top] = [base] * args.slices
            distinct: list[Top] = []
            for i in range(args.slices):
                top = dict(base)
                top[0x0008103E] = _text(0x0008103E, "LO", f"Axial {i} 1.25mm")
                top[0x00281051] = _text(0x00281051, "DS", str(300 + i))
                distinct.append(top)
            cells: dict[str, float] = {}
            try:
                for name, may_match in (("pre", with_filter), ("none", lambda _v: True)):
                    signatures._may_match = may_match  # type: ignore[assignment]
                    cells[f"hits {name}"] = _per_call(series, args.repeat)
                    cells[f"misses {name}"] = _per_call(distinct, args.repeat)
            finally:
                signatures._may_match = with_filter  # type: ignore[assignment]
            ratio = cells["misses none"] / cells["misses pre"]
            print(
                f"| {manufacturer} {model} | {cells['hits pre']:.1f} | {cells['hits none']:.1f} "
                f"| {cells['misses pre']:.1f} | {cells['misses none']:.1f} | {ratio:.1f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
