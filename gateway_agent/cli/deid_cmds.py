"""The de-identification commands: ``anonymize`` (files, folders, in parallel) and ``inspect``."""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["register"]

#: The ten Annex E options: (settings field, flag, help).
_OPTION_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("retain_safe_private", "--retain-safe-private", "keep the known-safe private attributes"),
    ("retain_uids", "--retain-uids", "keep original UIDs"),
    ("retain_device_identity", "--retain-device-identity", "keep device identity"),
    ("retain_institution_identity", "--retain-institution-identity", "keep institution identity"),
    (
        "retain_patient_characteristics",
        "--retain-patient-characteristics",
        "keep sex, age, size, weight...",
    ),
    ("retain_long_full_dates", "--retain-long-full-dates", "keep dates unmodified"),
    (
        "retain_long_modified_dates",
        "--retain-long-modified-dates",
        "shift dates by a keyed per-patient offset (default on)",
    ),
    (
        "clean_descriptors",
        "--clean-descriptors",
        "scrub identifiers from descriptions (default on)",
    ),
    (
        "clean_structured_content",
        "--clean-structured-content",
        "clean SR content instead of dummies",
    ),
    ("clean_graphics", "--clean-graphics", "clean graphic annotations and curves"),
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``anonymize`` and ``inspect``."""
    p = sub.add_parser(
        "anonymize",
        help="de-identify DICOM files and folders (PS3.15 Annex E) into a folder",
        description=(
            "De-identify files (folders recursively) into OUT/<new SOP Instance UID>.dcm. "
            "Options default to the [deid] section of the configuration. Exit status 1 when "
            "any input was quarantined or failed; inputs are reported by reason, never by name."
        ),
    )
    p.add_argument("src", nargs="+", type=Path, metavar="SRC", help="files or folders")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output folder")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: cores)",
    )
    p.add_argument(
        "--secret-file", type=Path, default=None, help="site secret (default from config)"
    )
    for field, flag, text in _OPTION_FLAGS:
        p.add_argument(
            flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=text
        )
    p.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="do not quarantine objects that may carry burned-in text (flagged in the audit)",
    )
    p.add_argument("--station-name", default=None, help="StationName for outputs (SH, <=16)")
    p.add_argument(
        "--fsync", action="store_true", help="fsync every output file (default: atomic rename only)"
    )
    p.add_argument("--audit", type=Path, default=None, help="write one JSON audit line per output")
    p.set_defaults(func=_anonymize)

    q = sub.add_parser(
        "inspect",
        help="show a DICOM file's key metadata; mark attributes that identify a person",
    )
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_inspect)


# -- anonymize ---------------------------------------------------------------------------------


def _iter_files(sources: Iterable[Path]) -> Iterator[Path]:
    for src in sources:
        if src.is_dir():
            for root, dirs, files in os.walk(src):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield src


_WORKER: Any = None


def _init_worker(deid: Any) -> None:
    global _WORKER
    _WORKER = deid


def _process(
    paths: list[str], out_dir: str, fsync: bool, with_audit: bool
) -> list[tuple[str, str, int, dict[str, Any] | None]]:
    """Worker: de-identify a chunk; returns (status, reason, size, audit) per input."""
    from .._exceptions import DeidError

    deid = _WORKER
    out = Path(out_dir)
    results: list[tuple[str, str, int, dict[str, Any] | None]] = []
    for p in paths:
        try:
            r = deid.deidentify_file(Path(p), out, fsync=fsync)
        except DeidError as exc:
            results.append(("quarantined", exc.reason, 0, None))
        except OSError as exc:
            import errno

            results.append(("failed", errno.errorcode.get(exc.errno or 0, "OSError"), 0, None))
        except Exception as exc:  # never let one input stop the run; the name is not reported
            results.append(("failed", type(exc).__name__, 0, None))
        else:
            results.append(("done", "", r.size, r.audit if with_audit else None))
    return results


class _Progress:
    """A one-line progress bar on stderr, only on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.enabled = sys.stderr.isatty() and total > 0
        self.start = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {rate:6.0f} files/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _anonymize(args: argparse.Namespace) -> int:
    from ..deid import Deidentifier, DeidOptions, load_or_create_secret
    from . import settings_from_args

    overrides: dict[str, Any] = {
        f"deid.{field}": getattr(args, field) for field, _, _ in _OPTION_FLAGS
    }
    if args.allow_burned_in:
        overrides["deid.burned_in"] = "allow"
    overrides["deid.station_name"] = args.station_name
    overrides["deid.secret_file"] = args.secret_file
    settings = settings_from_args(args, overrides)
    options = DeidOptions.from_settings(settings.deid)
    secret = load_or_create_secret(settings.secret_file)
    deid = Deidentifier(secret, options, station_name=settings.station_name)

    files = [str(p) for p in _iter_files(args.src)]
    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = max(1, args.jobs if args.jobs is not None else (os.cpu_count() or 1))
    jobs = min(jobs, max(1, len(files)))
    with_audit = args.audit is not None

    started = time.perf_counter()
    progress = _Progress(len(files))
    results: list[tuple[str, str, int, dict[str, Any] | None]] = []
    if jobs == 1 or len(files) < 8:
        _init_worker(deid)
        step = 16
        for i in range(0, len(files), step):
            chunk = _process(files[i : i + step], str(out_dir), args.fsync, with_audit)
            results.extend(chunk)
            progress.advance(len(chunk))
    else:
        results = _run_pool(deid, files, out_dir, jobs, args.fsync, with_audit, progress)
    progress.close()
    elapsed = time.perf_counter() - started

    if args.audit is not None:
        with args.audit.open("w", encoding="utf-8") as fh:
            for _, _, _, audit in results:
                if audit is not None:
                    fh.write(json.dumps(audit, sort_keys=True) + "\n")
    status = Counter(r[0] for r in results)
    reasons = Counter((r[0], r[1]) for r in results if r[0] != "done")
    size = sum(r[2] for r in results)
    rate = len(files) / elapsed if elapsed > 0 else 0.0
    print(
        f"anonymized {status['done']} of {len(files)} files into {out_dir} "
        f"({size / 1e6:.1f} MB, {elapsed:.2f} s, {rate:.0f} files/s, {jobs} jobs)"
    )
    for kind in ("quarantined", "failed"):
        if status[kind]:
            detail = ", ".join(
                f"{reason}: {n}" for (k, reason), n in sorted(reasons.items()) if k == kind
            )
            print(f"{kind}: {status[kind]} ({detail})")
    return 0 if status["done"] == len(files) else 1


def _run_pool(
    deid: Any,
    files: list[str],
    out_dir: Path,
    jobs: int,
    fsync: bool,
    with_audit: bool,
    progress: _Progress,
) -> list[tuple[str, str, int, dict[str, Any] | None]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Small chunks keep all workers busy to the end; big enough to amortise the IPC.
    chunk = max(1, min(64, len(files) // (jobs * 6) or 1))
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    ordered: list[list[tuple[str, str, int, dict[str, Any] | None]]] = [[] for _ in chunks]
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(deid,)
    ) as pool:
        futures = {
            pool.submit(_process, c, str(out_dir), fsync, with_audit): i
            for i, c in enumerate(chunks)
        }
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            i = futures[fut]
            try:
                ordered[i] = fut.result()
            except Exception as exc:  # a worker died (e.g. killed): count its chunk as failed
                ordered[i] = [("failed", type(exc).__name__, 0, None)] * len(chunks[i])
            progress.advance(len(ordered[i]))
    return [r for part in ordered for r in part]


# -- inspect -----------------------------------------------------------------------------------

_SUMMARY = (
    ("patient", "PatientName", 0x00100010),
    ("patient", "PatientID", 0x00100020),
    ("patient", "PatientBirthDate", 0x00100030),
    ("patient", "PatientSex", 0x00100040),
    ("study", "StudyDate", 0x00080020),
    ("study", "StudyDescription", 0x00081030),
    ("study", "AccessionNumber", 0x00080050),
    ("study", "StudyInstanceUID", 0x0020000D),
    ("series", "SeriesNumber", 0x00200011),
    ("series", "SeriesDescription", 0x0008103E),
    ("series", "Modality", 0x00080060),
    ("series", "SeriesInstanceUID", 0x0020000E),
    ("instance", "SOPClassUID", 0x00080016),
    ("instance", "SOPInstanceUID", 0x00080018),
    ("instance", "Rows", 0x00280010),
    ("instance", "Columns", 0x00280011),
    ("instance", "NumberOfFrames", 0x00280008),
)
_NUMERIC = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}


def _display(el: Any, codec: str | None, little: bool) -> str | int | float | list[Any]:
    from ..dicom.codec import decode_text

    vr = el.vr
    if vr == "SQ":
        return f"<{len(el.items)} item(s)>"
    raw: bytes = el.raw
    fmt = _NUMERIC.get(vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        if raw and len(raw) % size == 0 and len(raw) <= 64:
            values = struct.unpack(("<" if little else ">") + fmt * (len(raw) // size), raw)
            return values[0] if len(values) == 1 else list(values)
        return f"<{len(raw)} bytes>"
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return f"<{len(raw)} bytes>"
    text = decode_text(raw, codec)
    return text if len(text) <= 200 else text[:200] + "..."


def _inspect(args: argparse.Namespace) -> int:
    from .._exceptions import DeidError
    from ..deid.profile import DeidOptions, profile_for
    from ..dicom import SourceFile, keyword_of, name_of, text_codec

    path: Path = args.file
    try:
        with SourceFile(path) as source:
            header = source.read_header()
            size = source.size
    except DeidError as exc:
        print(f"gateway-agent inspect: cannot read the file: {exc.reason}", file=sys.stderr)
        return 1
    elements = header.elements
    top = {el.tag: el for el in elements}
    charset = top.get(0x00080005)
    codec = text_codec(charset.raw if charset else None)
    little = header.encoding.little
    profile = profile_for(DeidOptions())

    def identifying(el: Any) -> bool:
        group = el.tag >> 16
        if group & 1:
            return True
        letter = profile.letters.get(el.tag)
        if letter is None:
            return keyword_of(el.tag) == "" or el.vr == "PN"
        return letter != "K"

    def walk(els: list[Any], depth: int) -> Iterator[dict[str, Any]]:
        for el in els:
            yield {
                "tag": f"{el.tag >> 16:04X},{el.tag & 0xFFFF:04X}",
                "keyword": keyword_of(el.tag) or name_of(el.tag),
                "vr": el.vr,
                "depth": depth,
                "identifying": identifying(el),
                "value": _display(el, codec, little),
            }
            for item in el.items:
                yield from walk(item, depth + 1)

    summary: dict[str, dict[str, Any]] = {"patient": {}, "study": {}, "series": {}, "instance": {}}
    for section, keyword, tag in _SUMMARY:
        el = top.get(tag)
        if el is not None:
            summary[section][keyword] = _display(el, codec, little)
    file_info = {
        "size": size,
        "transfer_syntax": header.transfer_syntax,
        "pixel_data_bytes": (header.pixels.end - header.pixels.start) if header.pixels else 0,
    }
    attributes = list(walk(elements, 0))
    if args.json:
        print(json.dumps({**summary, "file": file_info, "attributes": attributes}, indent=2))
        return 0
    for section in ("patient", "study", "series", "instance"):
        print(f"{section.capitalize()}:")
        for key, value in summary[section].items():
            print(f"  {key:<20} {value}")
    print("File:")
    print(f"  {'Size':<20} {size} bytes")
    print(f"  {'TransferSyntax':<20} {header.transfer_syntax}")
    print("Attributes (* = identifies a person; changed by de-identification):")
    for a in attributes:
        mark = "*" if a["identifying"] else " "
        indent = "  " * a["depth"]
        print(f" {mark} {indent}({a['tag']}) {a['vr']} {a['keyword']:<36} {a['value']}")
    return 0
