"""Clean Pixel Data benchmark: gateway-agent vs CTP-style signature regions (and Presidio), one run.

Run::

    uv run python benchmarks/bench_pixels.py [--frames 60] [--cine-frames 200] \
        [--presidio /tmp/presidio-venv/bin/python]

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
4. **Presidio** (only with ``--presidio PYTHON``, the python of a separate venv with
   ``presidio-image-redactor``; it is not a project dependency): its DICOM image redactor on the
   same object files, in a child process (``presidio_child.py``; inside a network namespace
   without interfaces when ``unshare -n`` works, so nothing can be downloaded), with its NLP
   engine set up offline (a blank spaCy pipeline: its pattern recognizers and the deny list it
   builds from the header); its reported boxes are the painted area, its output objects are read
   back (delivered = written and decodable at the same size). Without the option the row says how
   to measure it. Make the venv once (Debian ``tesseract-ocr`` provides its OCR program)::

       uv venv /tmp/presidio-venv --python 3.11
       uv pip install --no-config --python /tmp/presidio-venv/bin/python presidio-image-redactor
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
PRESIDIO_NAME = "Presidio DICOM image redactor"
PRESIDIO_HOWTO = (
    f"| {PRESIDIO_NAME} | not measured: add `--presidio /tmp/presidio-venv/bin/python` "
    "(a venv with presidio-image-redactor, and the Debian tesseract-ocr program; see "
    "docs/performance.md) "
    "| | | | | | |"
)


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


def run_corpus(
    n: int, workdir: Path, readers: Any, presidio: str | None = None
) -> tuple[list[Approach], dict[str, Any]]:
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
    kept: list[tuple[Path, Any, Any]] | None = [] if presidio else None
    try:
        _corpus_loop(n, deid, inputs, outputs, ga, ctp, ctp_size, sizes, readers, spy, kept)
    finally:
        spy.close()
    approaches = [ga, ctp, ctp_size]
    extra: dict[str, Any] = {"output_bytes_by_input_syntax": sizes}
    if presidio and kept is not None:
        pres, extra["presidio"] = run_presidio(presidio, workdir, kept, readers)
        approaches.append(pres)
    return approaches, extra


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
    kept: list[tuple[Path, Any, Any]] | None,
) -> None:
    from gateway_agent._exceptions import DeidError
    from gateway_agent.synthetic_pixels import corpus_specs, make_object, write_object

    for i, spec in enumerate(corpus_specs(n)):
        syntax = SYNTAX_CYCLE[i % 3]
        obj = make_object(spec, syntax=syntax)
        src = write_object(obj, inputs / f"{i:03d}_{syntax}.dcm")
        frame = obj.frames[0]
        rows, cols = frame.pixels.shape[:2]
        if kept is not None:
            kept.append((src, frame, obj.identity))
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


def run_presidio(
    python: str, workdir: Path, kept: list[tuple[Path, Any, Any]], readers: Any
) -> tuple[Approach, dict[str, Any]]:
    """Presidio's DICOM image redactor on the same object files (child process, offline)."""
    import pydicom

    outdir = workdir / "presidio_out"
    shutil.rmtree(outdir, ignore_errors=True)
    command = [python, str(HERE / "presidio_child.py"), str(workdir), str(outdir)]
    command += [str(src) for src, _, _ in kept]
    isolated = shutil.which("unshare") is not None and (
        subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0
    )
    if isolated:  # no network interface at all: a download attempt fails instead of happening
        command = ["unshare", "-n", *command]
    env = {**os.environ, "OMP_THREAD_LIMIT": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    head = next((x for x in lines if "versions" in x), {})
    records = {x["name"]: x for x in lines if "name" in x}
    if not records:
        raise RuntimeError(f"Presidio child failed ({done.returncode}): {done.stderr[-2000:]}")
    version = head.get("versions", {}).get("presidio-image-redactor", "?")
    a = Approach(f"{PRESIDIO_NAME} {version} (offline: blank spaCy, patterns, header deny list)")
    altered: list[str] = []
    for src, frame, identity in kept:
        rows, cols = frame.pixels.shape[:2]
        record = records.get(src.name, {"boxes": [], "error": "no result", "cpu_s": None})
        boxes = [(x, y, x + w, y + h) for x, y, w, h in record["boxes"]]
        painted = _mask((rows, cols), boxes)
        if record["error"] is None:
            try:
                after = pydicom.dcmread(outdir / src.name).pixel_array
            except Exception as exc:  # an unreadable output is not delivered
                record["error"] = f"unreadable output: {type(exc).__name__}"
            else:
                if after.shape[:2] != (rows, cols):
                    record["error"] = f"output of another size: {after.shape}"
                elif _changed_outside(pydicom.dcmread(src).pixel_array, after, painted) > 0.005:
                    altered.append(src.name)
        delivered = record["error"] is None
        if not delivered:
            reason = str(record["error"]).split(":")[0]
            a.reasons[reason] = a.reasons.get(reason, 0) + 1
        if record.get("cpu_s") is not None:
            a.cpu.setdefault(f"{cols}x{rows}", []).append(float(record["cpu_s"]))
        a.objects += 1
        a.delivered += delivered
        _score(a, frame, identity, painted, delivered, readers)
    return a, {"versions": head.get("versions"), "network_namespace": isolated,
               "altered_outside_boxes": altered, "stderr_tail": done.stderr[-500:]}  # fmt: skip


def _changed_outside(before: np.ndarray, after: np.ndarray, painted: np.ndarray) -> float:
    """Share of the pixels outside ``painted`` that differ (by more than 8) after the redactor."""
    if before.shape != after.shape:
        return 1.0
    diff = np.abs(before.astype(np.int32) - after.astype(np.int32))
    changed = diff.reshape(*diff.shape[:2], -1).max(axis=-1) > 8
    return float((changed & ~painted).sum() / max(1, (~painted).sum()))


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


def print_table(
    approaches: list[Approach], cine: dict[str, Any] | None, extra: dict[str, Any] | None = None
) -> None:
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
    if not any(a.name.startswith(PRESIDIO_NAME) for a in approaches):
        print(PRESIDIO_HOWTO)
    presidio = (extra or {}).get("presidio")
    if presidio:
        altered = presidio["altered_outside_boxes"]
        print()
        print(
            f"Presidio: {len(altered)} delivered objects with > 0.5 % of the pixels outside "
            f"its boxes changed ({', '.join(altered) or 'none'}); child in a network namespace "
            f"without interfaces: {presidio['network_namespace']}; {presidio['versions']}"
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
    parser.add_argument(
        "--presidio",
        metavar="PYTHON",
        help="python of a venv with presidio-image-redactor: measure its DICOM redactor too",
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from gateway_agent.synthetic_pixels import RecogniserReader, TesseractReader

    readers = (None, None) if args.no_readers else (TesseractReader(), RecogniserReader())
    approaches, extra = run_corpus(args.frames, args.workdir, readers, args.presidio)
    cine = run_cine(args.cine_frames, args.workdir) if args.cine_frames else None
    print_table(approaches, cine, extra)
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
