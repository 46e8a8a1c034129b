"""Clean Pixel Data benchmark: gateway-agent vs CTP-style signature regions (and Presidio), one run.

Run::

    uv run python benchmarks/bench_pixels.py [--frames 60] [--cine-frames 200]

What it does, in one run on the same frames:

1. Generates the seeded corpus of ``gateway_agent.synthetic_pixels`` (``--frames`` frames, half
   640x480 and half 1024x768; ultrasound sectors and rectangles, screen captures; RGB and grey;
   a third passed through JPEG; identity in several spellings, fonts 8-35 px incl. aliased and
   bitmap; some of it drawn over the image) and wraps each frame as a US or SC object, cycling
   native, RLE and JPEG baseline (YBR_FULL_422) syntaxes, with the same identity in the header.
2. **gateway-agent**: ``Deidentifier.deidentify_file`` with the default policy (clean) on every
   object: delivered or quarantined (reason), CPU time per object (decode, signatures,
   detection, painting, verification, encoding, header), painted boxes.
3. **CTP signatures**: the regions of CTP's DicomPixelAnonymizer list as written (first match:
   the corpus devices match none) and, to be generous, every US region of the list whose Rows
   and Columns condition fits the frame.
4. **Presidio**: its DICOM image redactor is listed but not run (see the row for why); it is
   not a project dependency.
5. Measures on each approach's cleaned frames, with two readers that are not the detector:
   Tesseract on the whole frame upscaled 2x, and PaddleOCR's PP-OCRv4 recogniser on every
   ground-truth line box: PHI lines masked (>= 95 % of the line's drawn pixels painted), PHI
   lines still readable by each reader (on every cleaned frame, and on delivered objects only),
   share of the clinical image painted (all, and outside the drawn text), objects delivered.
6. A ``--cine-frames`` 640x480 JPEG ultrasound cine (a name shown in 3 frames only) through
   ``gateway-agent anonymize`` as a child process: wall and CPU time, peak RSS.

CPU times are per core (ONNX Runtime and Tesseract run one thread). The shared machine is
noisy: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE / ".bench-work" / "pixels"
SYNTAX_CYCLE = ("native", "rle", "jpeg")
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None


@dataclass
class Approach:
    """Results of one approach over the corpus."""

    name: str
    phi_lines: int = 0
    masked: int = 0
    readable_t: int = 0  # reader 1 (Tesseract 2x), every cleaned frame
    readable_r: int = 0  # reader 2 (PP-OCRv4 recogniser on ground-truth boxes)
    readable_delivered_t: int = 0
    readable_delivered_r: int = 0
    on_image: int = 0
    on_image_masked: int = 0
    clinical: int = 0
    clinical_painted: int = 0
    clinical_overpainted: int = 0
    delivered: int = 0
    objects: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)


def _mask(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    m = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        m[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    return m


def _score(
    a: Approach, frame: Any, ident: Any, painted: np.ndarray, delivered: bool, readers: Any
) -> None:
    from gateway_agent.synthetic_pixels import identity_values, readable

    tess, rec = readers
    cleaned = frame.pixels.copy()
    cleaned[painted] = 0
    texts = tess.read(cleaned) if tess is not None else []
    text_area = np.zeros_like(painted)
    for line in frame.lines:
        x0, y0, x1, y1 = line.box
        text_area[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = True
        if not line.phi or not line.ink.any():
            continue
        a.phi_lines += 1
        ink = line.ink
        covered = (painted[y0:y1, x0:x1] & ink).sum() / ink.sum()
        a.masked += covered >= 0.95
        if line.on_image:
            a.on_image += 1
            a.on_image_masked += covered >= 0.95
        values = identity_values(line, ident)
        by_t = readable(values, texts)
        by_r = rec is not None and readable(values, [rec.read_box(cleaned, line.box)])
        a.readable_t += by_t
        a.readable_r += by_r
        if delivered:
            a.readable_delivered_t += by_t
            a.readable_delivered_r += by_r
    clinical = frame.clinical
    a.clinical += int(clinical.sum())
    a.clinical_painted += int((painted & clinical).sum())
    a.clinical_overpainted += int((painted & clinical & ~text_area).sum())


def _ctp_boxes(rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """Every US region of CTP's list whose Rows/Columns condition fits the frame."""
    from gateway_agent.deid.pixels.signatures import load_signatures

    def sizes(node: dict[str, Any], out: dict[str, str]) -> None:
        if "op" in node:
            for arg in node.get("args", []):
                sizes(arg, out)
        elif node.get("keyword") in ("Rows", "Columns"):
            out[node["keyword"]] = node["value"]

    boxes = []
    for sig in load_signatures():
        found: dict[str, str] = {}
        sizes(sig.condition, found)
        if found.get("Rows") == str(rows) and found.get("Columns", str(cols)) == str(cols):
            boxes += [(x, y, x + w, y + h) for x, y, w, h in sig.regions]
    return boxes


def run_corpus(n: int, workdir: Path, readers: Any) -> tuple[list[Approach], dict[str, Any]]:
    from gateway_agent.deid import Deidentifier, DeidOptions

    deid = Deidentifier(b"bench-pixels-secret-0123456789ab", DeidOptions())
    ga = Approach("gateway-agent (clean)")
    ctp = Approach("CTP signatures as written")
    ctp_size = Approach("CTP US regions by frame size")
    inputs = workdir / "in"
    outputs = workdir / "out"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir(parents=True)
    sizes: dict[str, int] = {}
    # warm up (model loading is per process, not per object)
    from gateway_agent.deid.pixels.clean import engines

    engines()
    spy = _BoxSpy()
    try:
        _corpus_loop(n, deid, inputs, outputs, ga, ctp, ctp_size, sizes, readers, spy)
    finally:
        spy.close()
    return [ga, ctp, ctp_size], {"output_bytes_by_input_syntax": sizes}


def _corpus_loop(
    n: int,
    deid: Any,
    inputs: Path,
    outputs: Path,
    ga: Approach,
    ctp: Approach,
    ctp_size: Approach,
    sizes: dict[str, int],
    readers: Any,
    spy: _BoxSpy,
) -> None:
    from gateway_agent._exceptions import DeidError
    from gateway_agent.synthetic_pixels import corpus_specs, make_object, write_object

    for i, spec in enumerate(corpus_specs(n)):
        syntax = SYNTAX_CYCLE[i % 3]
        obj = make_object(spec, syntax=syntax)
        src = write_object(obj, inputs / f"{i:03d}_{syntax}.dcm")
        frame = obj.frames[0]
        rows, cols = frame.pixels.shape[:2]
        spy.boxes = []
        started = time.process_time()
        delivered = True
        try:
            result = deid.deidentify_file(src, outputs, fsync=False)
        except DeidError as exc:
            delivered = False
            ga.reasons[exc.reason] = ga.reasons.get(exc.reason, 0) + 1
        cpu = time.process_time() - started
        ga.cpu.setdefault(f"{cols}x{rows}", []).append(cpu)
        ga.objects += 1
        if delivered:
            ga.delivered += 1
            sizes[syntax] = sizes.get(syntax, 0) + result.size
            sizes[syntax + "_input"] = sizes.get(syntax + "_input", 0) + src.stat().st_size
        painted = _mask((rows, cols), spy.boxes)
        _score(ga, frame, obj.identity, painted, delivered, readers)
        for approach, boxes in ((ctp, []), (ctp_size, _ctp_boxes(rows, cols))):
            approach.objects += 1
            approach.delivered += 1
            _score(approach, frame, obj.identity, _mask((rows, cols), boxes), True, readers)


class _BoxSpy:
    """Records the boxes gateway-agent paints on the first frame of each object."""

    def __init__(self) -> None:
        import gateway_agent.deid.pixels.clean as clean

        self.boxes: list[tuple[int, int, int, int]] = []
        self._clean = clean
        self._original = clean.PixelJob.clean_frame
        spy = self

        def clean_frame(job: Any, index: int, frame: Any, anchor: Any) -> Any:
            result = spy._original(job, index, frame, anchor)
            if index == 0:
                spy.boxes = list(result[0].boxes)
            return result

        clean.PixelJob.clean_frame = clean_frame  # type: ignore[method-assign]

    def close(self) -> None:
        self._clean.PixelJob.clean_frame = self._original  # type: ignore[method-assign]


def run_cine(frames: int, workdir: Path) -> dict[str, Any]:
    """A ``frames``-frame 640x480 JPEG cine through ``gateway-agent anonymize`` (child)."""
    from gateway_agent.synthetic_pixels import FrameSpec, make_object, write_object

    spec = FrameSpec(seed=4242, kind="us", rows=480, cols=640, rgb=True)
    src = workdir / f"cine_{frames}.dcm"
    if not src.exists():
        shown = tuple(range(frames // 2, frames // 2 + 3))
        write_object(make_object(spec, frames=frames, syntax="jpeg", only_frames={0: shown}), src)
    out = workdir / "cine_out"
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    audit = workdir / "cine_audit.jsonl"
    key = workdir / "secret.key"
    command = [sys.executable, "-m", "gateway_agent", "anonymize", str(src), "-o", str(out),
               "-j", "1", "--secret-file", str(key), "--audit", str(audit)]  # fmt: skip
    # GNU time reports the child's own peak RSS (getrusage of the children can include pages of
    # this big process, shared at fork before the exec).
    rss_file = workdir / "cine_rss.txt"
    if GNU_TIME:
        command = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = (
        json.loads(audit.read_text().splitlines()[0])
        if audit.exists() and audit.read_text()
        else {}
    )
    return {
        "frames": frames,
        "delivered": done.returncode == 0,
        "summary": done.stdout.strip().splitlines()[-1]
        if done.stdout.strip()
        else done.stderr[-300:],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(int(rss_file.read_text().split()[-1]) / 1024)
        if GNU_TIME and rss_file.exists()
        else round(after.ru_maxrss / 1024),
        "frames_verified": record.get("pixels", {}).get("frames_verified"),
    }


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f} %" if b else "n/a"


def print_table(approaches: list[Approach], cine: dict[str, Any] | None) -> None:
    print(
        "| approach | PHI lines masked | PHI readable after (Tesseract 2x / PP-OCRv4 rec) "
        "| same, delivered objects | text over the image masked | clinical area painted "
        "(outside text) | delivered / objects | CPU ms per frame 640x480 / 1024x768 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for a in approaches:
        cpu = " / ".join(
            f"{1000 * float(np.median(a.cpu[k])):.0f}" if a.cpu.get(k) else "-"
            for k in ("640x480", "1024x768")
        )
        quarantined = ", ".join(f"{k} {v}" for k, v in sorted(a.reasons.items()))
        print(
            f"| {a.name} | {a.masked}/{a.phi_lines} ({_pct(a.masked, a.phi_lines)}) "
            f"| {a.readable_t} / {a.readable_r} | {a.readable_delivered_t} / "
            f"{a.readable_delivered_r} | {a.on_image_masked}/{a.on_image} "
            f"| {_pct(a.clinical_painted, a.clinical)} "
            f"({_pct(a.clinical_overpainted, a.clinical)}) "
            f"| {a.delivered}/{a.objects}{' (' + quarantined + ')' if quarantined else ''} "
            f"| {cpu} |"
        )
    print(
        "| Presidio DICOM image redactor | not measured: presidio-image-redactor 0.0.62 "
        "brings 635 MB (spaCy, OpenCV, python-gdcm), its OCR needs the tesseract program and "
        "its default NLP engine downloads a spaCy model (none on PyPI) | | | | | | |"
    )
    if cine:
        print()
        print(
            f"cine: {cine['frames']} frames 640x480 JPEG -> delivered={cine['delivered']}, "
            f"{cine['frames_verified']} frames read by the verifier, wall {cine['wall_s']} s, "
            f"CPU {cine['cpu_s']} s, peak RSS {cine['peak_rss_mb']} MB ({cine['summary']})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--cine-frames", type=int, default=200, help="0: skip the cine run")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--no-readers", action="store_true", help="skip the readers (fast)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from gateway_agent.synthetic_pixels import RecogniserReader, TesseractReader

    readers = (None, None) if args.no_readers else (TesseractReader(), RecogniserReader())
    approaches, extra = run_corpus(args.frames, args.workdir, readers)
    cine = run_cine(args.cine_frames, args.workdir) if args.cine_frames else None
    print_table(approaches, cine)
    results = {
        "approaches": [a.__dict__ for a in approaches],
        "cine": cine,
        **extra,
    }
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
