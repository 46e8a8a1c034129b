"""The de-identification commands: ``anonymize`` (files, folders, in parallel) and ``inspect``."""

from __future__ import annotations

import argparse
import csv
import errno
import gc
import json
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ._help import add_command

if TYPE_CHECKING:
    from ..deid import Deidentifier
    from ..deid.profile import DeidOptions

__all__ = ["default_secret_file", "register"]

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
    p = add_command(
        sub,
        "anonymize",
        summary="de-identify DICOM files and folders (PS3.15 Annex E) into a folder",
        description=(
            "Folders are read recursively; each output is OUT/<new SOP Instance UID>.dcm. "
            "Options default to the [deid] section of the configuration. The site secret is "
            "the configured one (deid.secret_file, else state_dir/secret.key) when a "
            "configuration names it, else the per-user key "
            "$XDG_DATA_HOME/gateway-agent/secret.key; it is created on first use and its "
            "location printed. Exit status 1 when any input was quarantined or failed; the "
            "summary counts inputs by reason, and --report names them."
        ),
        examples=[
            "gateway-agent anonymize scans/ -o anon/",
            "gateway-agent anonymize scans/ -o anon/ --secret-file site.key --report report.csv",
        ],
    )
    p.add_argument("src", nargs="+", type=Path, metavar="SRC", help="files or folders")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: cores)",
    )
    p.add_argument(
        "--secret-file", type=Path, default=None, metavar="FILE", help="site secret (see above)"
    )
    for field, flag, text in _OPTION_FLAGS:
        p.add_argument(
            flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=text
        )
    p.add_argument(
        "--burned-in",
        choices=("clean", "quarantine", "allow"),
        default=None,
        help="objects whose pixels may carry burned-in text: clean them (paint text out, "
        "verify, quarantine what stays readable; the default), quarantine them all, or "
        "allow them as they are (flagged in the audit)",
    )
    p.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="the same as --burned-in allow",
    )
    p.add_argument("--station-name", default=None, help="StationName for outputs (SH, <=16)")
    p.add_argument(
        "--fsync", action="store_true", help="fsync every output file (default: atomic rename only)"
    )
    p.add_argument(
        "--audit", type=Path, default=None, metavar="FILE", help="one JSON audit line per output"
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="FILE",
        help="one line per input: path, outcome, reason, output name (CSV when FILE ends in "
        ".csv, else JSON lines); names inputs, so keep it local",
    )
    p.set_defaults(func=_anonymize)

    q = add_command(
        sub,
        "inspect",
        summary="show a DICOM file's key metadata; mark attributes that identify a person",
        examples=["gateway-agent inspect scan.dcm", "gateway-agent inspect scan.dcm --json"],
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
                    yield Path(root, name)
        else:
            yield src


class _Result(NamedTuple):
    """What happened to one input (the output fields are empty unless ``outcome`` is done)."""

    input: str
    outcome: str  # "done", "quarantined" or "failed"
    reason: str  # why it was not done: a quarantine reason, an errno name, an exception name
    output: str  # the output's file name
    size: int
    audit: str | None  # the audit record as a JSON line, with --audit


_WORKER: Deidentifier | None = None


def _init_worker(deid: Deidentifier) -> None:
    global _WORKER
    _WORKER = deid


def _process(paths: list[Path], out_dir: Path, fsync: bool, with_audit: bool) -> list[_Result]:
    """Worker: de-identify a chunk; one :class:`_Result` per input."""
    from .._exceptions import DeidError

    deid = _WORKER
    assert deid is not None
    results: list[_Result] = []
    for p in paths:
        try:
            r = deid.deidentify_file(p, out_dir, fsync=fsync)
        except DeidError as exc:
            results.append(_Result(str(p), "quarantined", exc.reason, "", 0, None))
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, "OSError")
            results.append(_Result(str(p), "failed", reason, "", 0, None))
        except Exception as exc:  # never let one input stop the run; the name is not reported
            results.append(_Result(str(p), "failed", type(exc).__name__, "", 0, None))
        else:
            audit = json.dumps(r.audit, sort_keys=True) if with_audit else None
            results.append(_Result(str(p), "done", "", r.name, r.size, audit))
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


def default_secret_file(environ: Mapping[str, str] = os.environ) -> Path:
    """The per-user site secret of ``anonymize`` when no configuration names one.

    ``$XDG_DATA_HOME/gateway-agent/secret.key``, by default
    ``~/.local/share/gateway-agent/secret.key``: one key per user, whatever the current folder.
    """
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gateway-agent" / "secret.key"


#: The defaults of ``Settings`` that ``anonymize`` reads (tests/deid/test_deid_fastpath.py checks
#: them against ``gateway_agent.config``).
DEFAULT_CONFIG_FILE = Path("/etc/gateway-agent/config.toml")
DEFAULT_UNIT_NAME = "EDGE01"
_STATE_DIR_VAR = "GATEWAY_STATE_DIR"


class _Setup(NamedTuple):
    """What ``anonymize`` needs from the settings."""

    options: DeidOptions
    secret_file: Path
    station_name: str


def _default_settings(
    args: argparse.Namespace, overrides: dict[str, Any], environ: Mapping[str, str] = os.environ
) -> _Setup | None:
    """What ``anonymize`` needs from the settings, without pydantic, when that is certain.

    Importing pydantic and the settings model costs about 0.13 s, a fifth of a 1,000-slice run
    (0.6 s on 2 cores; ``benchmarks/bench_deid.py --slices 1000``): far above the 3 % a
    start-up shortcut must save to stay. So when no config file is given or installed, no
    ``GATEWAY_*`` variable other than ``GATEWAY_STATE_DIR`` is set and every flag value is
    valid as it is, the result is computed here; it equals what ``load_settings`` gives
    (tests/deid/test_deid_fastpath.py compares both). Otherwise None: the caller loads
    ``Settings``, with its validation errors.
    """
    from ..deid.profile import DeidOptions

    if getattr(args, "config", None) is not None:
        return None
    state_dir: Path | None = None
    for var, value in environ.items():
        if var.upper().startswith("GATEWAY_"):
            if var.upper() != _STATE_DIR_VAR or state_dir is not None:
                return None
            state_dir = Path(value)
    if DEFAULT_CONFIG_FILE.is_file():
        return None
    options: dict[str, Any] = {}
    for key, value in overrides.items():
        name = key.removeprefix("deid.")
        if value is None:
            continue
        if name == key:
            return None  # not a [deid] setting
        if name == "station_name":
            if not isinstance(value, str) or len(value) > 16:
                return None
        elif name == "secret_file":
            if not isinstance(value, Path):
                return None
        elif name == "burned_in":
            if value not in ("clean", "quarantine", "allow"):
                return None
            options[name] = value
        elif isinstance(value, bool):
            options[name] = value
        else:
            return None
    secret_file: Path | None = overrides.get("deid.secret_file")
    if secret_file is None:
        secret_file = (
            default_secret_file(environ) if state_dir is None else state_dir / "secret.key"
        )
    station_name: str = overrides.get("deid.station_name") or DEFAULT_UNIT_NAME
    return _Setup(DeidOptions(**options), secret_file, station_name)


def _settings_for(args: argparse.Namespace, overrides: dict[str, Any]) -> _Setup:
    """(options, secret file, station name) from the configuration layers and the flags.

    The secret is the configured one when the configuration names a state folder or a secret
    file (config file, ``GATEWAY_*`` variable, flag), else :func:`default_secret_file`.
    """
    return _default_settings(args, overrides) or _loaded_settings(args, overrides)


def _loaded_settings(args: argparse.Namespace, overrides: dict[str, Any]) -> _Setup:
    """:func:`_settings_for` through ``load_settings`` (pydantic)."""
    from ..deid.profile import DeidOptions
    from . import settings_from_args

    settings = settings_from_args(args, overrides)
    configured = settings.deid.secret_file is not None or "state_dir" in settings.model_fields_set
    secret_file = settings.secret_file if configured else default_secret_file()
    return _Setup(DeidOptions.from_settings(settings.deid), secret_file, settings.station_name)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        f"deid.{field}": getattr(args, field) for field, _, _ in _OPTION_FLAGS
    }
    if args.burned_in is not None:
        overrides["deid.burned_in"] = args.burned_in
    if args.allow_burned_in:
        overrides["deid.burned_in"] = "allow"
    overrides["deid.station_name"] = args.station_name
    overrides["deid.secret_file"] = args.secret_file
    return overrides


def _write_report(path: Path, results: list[_Result]) -> None:
    """``--report``: one line per input, CSV (``.csv``) or JSON lines."""
    fields = ("input", "outcome", "reason", "output")
    with path.open("w", encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            writer = csv.writer(fh)
            writer.writerow(fields)
            writer.writerows((r.input, r.outcome, r.reason, r.output) for r in results)
        else:
            for r in results:
                record = {"input": r.input, "outcome": r.outcome}
                record["reason" if r.reason else "output"] = r.reason or r.output
                fh.write(json.dumps(record, sort_keys=True) + "\n")


def _refuse_to_replace_an_agents_secret(secret_file: Path) -> None:
    """A missing secret beside an agent's record of it was lost, not never made: creating a new
    one would make this run's outputs (and the agent's, next) unlinkable to the earlier ones."""
    from .._exceptions import ConfigError
    from ..agent.service.secretguard import FINGERPRINT_NAME

    if (secret_file.parent / FINGERPRINT_NAME).exists():
        raise ConfigError(
            f"the site secret {secret_file} is missing, but the agent's state folder beside it "
            "holds instances made with one: restore it from your backup (see "
            "docs/operations.md), or give another --secret-file"
        )


def _anonymize(args: argparse.Namespace) -> int:
    from ..deid import Deidentifier, load_or_create_secret

    options, secret_file, station_name = _settings_for(args, _overrides(args))
    existed = secret_file.exists()
    if not existed:
        _refuse_to_replace_an_agents_secret(secret_file)
    secret = load_or_create_secret(secret_file)
    if not existed:
        print(
            f"created the site secret {secret_file} (keep it, and back it up: the same "
            "secret gives the same pseudonyms and UIDs)",
            file=sys.stderr,
        )
    deid = Deidentifier(secret, options, station_name=station_name)

    files = list(_iter_files(args.src))
    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = max(1, args.jobs if args.jobs is not None else (os.cpu_count() or 1))
    jobs = min(jobs, max(1, len(files)))
    with_audit = args.audit is not None

    started = time.perf_counter()
    progress = _Progress(len(files))
    _init_worker(deid)
    results: list[_Result] = []
    # What exists now (modules, the profile, the dictionary) lives until the end: keep it out of
    # the garbage collector's passes, and out of forked workers' copy-on-write pages.
    gc.freeze()
    try:
        if jobs == 1 or len(files) < 8:
            step = 16
            for i in range(0, len(files), step):
                chunk = _process(files[i : i + step], out_dir, args.fsync, with_audit)
                results.extend(chunk)
                progress.advance(len(chunk))
        else:
            results = _run_forked(files, out_dir, jobs, args.fsync, with_audit, progress)
    finally:
        gc.unfreeze()
    progress.close()
    elapsed = time.perf_counter() - started

    if args.audit is not None:
        with args.audit.open("w", encoding="utf-8") as fh:
            for r in results:
                if r.audit is not None:
                    fh.write(r.audit + "\n")
    if args.report is not None:
        _write_report(args.report, results)
    status = Counter(r.outcome for r in results)
    reasons = Counter((r.outcome, r.reason) for r in results if r.outcome != "done")
    size = sum(r.size for r in results)
    # Inputs that carry the same SOP Instance UID (copies, the same image in two transfer
    # syntaxes) have one output, the last written: say so, or the folder looks short.
    shared = status["done"] - len({r.output for r in results if r.outcome == "done"})
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
    if shared:
        print(
            f"same SOP Instance UID as another input: {shared} (one output per instance, "
            "the last written)"
        )
    return 0 if status["done"] == len(files) else 1


_HEAD = struct.Struct("<II")  # chunk index, payload length
_MAX_CHUNKS = 1024  # chunk indices (4 bytes each) must fit a pipe's minimum capacity (one page)


def _run_forked(
    files: list[Path], out_dir: Path, jobs: int, fsync: bool, with_audit: bool, progress: _Progress
) -> list[_Result]:
    """De-identify ``files`` in ``jobs`` processes: this one and ``jobs - 1`` forked children.

    The chunk indices sit in a pipe, so every process takes the next chunk when it is free
    (no process waits for a slow one). A child sends each chunk's results back on its own pipe
    (marshal). Forking shares the built profile and dictionary; nothing is pickled. The chunks
    of a child that dies are counted as failed (``worker_died``).
    """
    import marshal
    import select

    from ..dicom.files import write_all

    size = max(1, min(64, len(files) // (jobs * 32)), -(-len(files) // _MAX_CHUNKS))
    chunks = [files[i : i + size] for i in range(0, len(files), size)]
    queue_r, queue_w = os.pipe()
    os.write(queue_w, b"".join(struct.pack("<I", i) for i in range(len(chunks))))
    os.close(queue_w)
    sys.stdout.flush()
    sys.stderr.flush()
    children: dict[int, int] = {}  # read end -> pid
    results: list[list[_Result] | None] = [None] * len(chunks)
    try:
        for _ in range(jobs - 1):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never returns
                code = 1
                try:
                    os.close(read_end)
                    for fd in children:
                        os.close(fd)
                    for index, done in _take(queue_r, chunks, out_dir, fsync, with_audit):
                        data = marshal.dumps([tuple(r) for r in done])
                        write_all(write_end, _HEAD.pack(index, len(data)) + data)
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_end)
            children[read_end] = pid
        buffers = {fd: bytearray() for fd in children}
        open_fds = set(children)

        def drain(timeout: float | None) -> None:
            ready, _, _ = select.select(list(open_fds), [], [], timeout)
            for fd in ready:
                data = os.read(fd, 1 << 20)
                if not data:
                    open_fds.discard(fd)
                    continue
                buf = buffers[fd]
                buf += data
                while len(buf) >= _HEAD.size:
                    index, length = _HEAD.unpack_from(buf)
                    if len(buf) < _HEAD.size + length:
                        break
                    payload = bytes(buf[_HEAD.size : _HEAD.size + length])
                    done = marshal.loads(payload)  # noqa: S302 - written by our own child
                    del buf[: _HEAD.size + length]
                    results[index] = [_Result(*r) for r in done]
                    progress.advance(len(done))

        for index, done in _take(queue_r, chunks, out_dir, fsync, with_audit):
            results[index] = done
            progress.advance(len(done))
            if open_fds:
                drain(0)
        while open_fds:
            drain(None)
    finally:
        os.close(queue_r)
        for fd, pid in children.items():
            os.close(fd)
            os.waitpid(pid, 0)
    out: list[_Result] = []
    for index, part in enumerate(results):
        if part is None:  # taken by a child that died before reporting it
            part = [_Result(str(p), "failed", "worker_died", "", 0, None) for p in chunks[index]]
            progress.advance(len(part))
        out.extend(part)
    return out


def _take(
    queue: int, chunks: list[list[Path]], out_dir: Path, fsync: bool, with_audit: bool
) -> Iterator[tuple[int, list[_Result]]]:
    """Take chunk indices from the shared pipe until it is empty; yield each chunk's results."""
    while True:
        word = os.read(queue, 4)
        if len(word) < 4:
            return
        (index,) = struct.unpack("<I", word)
        yield index, _process(chunks[index], out_dir, fsync, with_audit)


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
    if not path.exists():
        print("gateway-agent inspect: no such file (FILE)", file=sys.stderr)
        return 1
    try:
        with SourceFile(path) as source:
            header = source.read_header()
            size = source.size
    except DeidError as exc:
        print(f"gateway-agent inspect: cannot read FILE: {exc}", file=sys.stderr)
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
