"""The de-identification commands: ``anonymize`` (files, folders, in parallel) and ``inspect``."""

from __future__ import annotations

import gc
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

TYPE_CHECKING = False  # not typing's: keeps typing off the de-identification path
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import Any

    from ..deid.profile import DeidOptions

    _DeidSetup = tuple[DeidOptions, str | os.PathLike[str], str]

__all__ = ["parse_anonymize", "register"]

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
    import argparse
    from pathlib import Path

    from ._help import HelpFormatter

    p = sub.add_parser(
        "anonymize",
        formatter_class=HelpFormatter,
        help="de-identify DICOM files and folders (PS3.15 Annex E) into a folder",
        description=(
            "De-identify files (folders recursively) into OUT/<new SOP Instance UID>.dcm. "
            "Options default to the [deid] section of the configuration. Exit status 1 when "
            "any input was quarantined or failed; inputs are reported by reason, never by name."
        ),
    )
    # Plain strings (not Path) for anonymize: pathlib is not imported on its path (~3 ms).
    p.add_argument("src", nargs="+", metavar="SRC", help="files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="worker processes (default: cores)",
    )
    p.add_argument("--secret-file", default=None, help="site secret (default from config)")
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
    p.add_argument("--audit", default=None, help="write one JSON audit line per output")
    p.set_defaults(func=_anonymize)

    q = sub.add_parser(
        "inspect",
        formatter_class=HelpFormatter,
        help="show a DICOM file's key metadata; mark attributes that identify a person",
    )
    q.add_argument("file", type=Path, metavar="FILE")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_inspect)


#: ``anonymize`` options that take a value: flag -> (attribute, converter).
_VALUE_FLAGS: dict[str, tuple[str, Any]] = {
    "-o": ("output", str),
    "--output": ("output", str),
    "-j": ("jobs", int),
    "--jobs": ("jobs", int),
    "--secret-file": ("secret_file", str),
    "--station-name": ("station_name", str),
    "--audit": ("audit", str),
}
#: ``anonymize`` switches: flag -> (attribute, value).
_SWITCHES: dict[str, tuple[str, bool]] = {
    "--allow-burned-in": ("allow_burned_in", True),
    "--fsync": ("fsync", True),
    **{flag: (field, True) for field, flag, _ in _OPTION_FLAGS},
    **{"--no-" + flag[2:]: (field, False) for field, flag, _ in _OPTION_FLAGS},
}


def parse_anonymize(words: Sequence[str]) -> argparse.Namespace | None:
    """The arguments of ``anonymize WORDS`` as argparse parses them, without importing argparse.

    Only for a plain command line: whole flag names, each value as the next word and not
    starting with ``-``, the sources in one run, ``-o`` given. Anything else (help, ``--x=y``,
    abbreviations, errors) gives None, and :func:`~gateway_agent.cli.main` leaves it to
    argparse. tests/deid/test_deid_fastpath.py checks both give the same arguments.
    """
    from types import SimpleNamespace

    values: dict[str, Any] = {
        "config": None,
        "log_format": None,
        "command": "anonymize",
        "src": [],
        "output": None,
        "jobs": None,
        "secret_file": None,
        **{field: None for field, _, _ in _OPTION_FLAGS},
        "allow_burned_in": False,
        "station_name": None,
        "fsync": False,
        "audit": None,
        "func": _anonymize,
    }
    src: list[str] = values["src"]
    src_ended = False
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word and word[0] != "-":
            if src_ended:
                return None  # argparse takes one run of sources and refuses the rest
            src.append(word)
            continue
        src_ended = bool(src)
        switch = _SWITCHES.get(word)
        if switch is not None:
            values[switch[0]] = switch[1]
            continue
        flag = _VALUE_FLAGS.get(word)
        if flag is None or i == len(words) or words[i].startswith("-"):
            return None
        try:
            values[flag[0]] = flag[1](words[i])
        except ValueError:
            return None
        i += 1
    if not src or values["output"] is None:
        return None
    return SimpleNamespace(**values)  # type: ignore[return-value]


# -- anonymize ---------------------------------------------------------------------------------


def _iter_files(sources: Iterable[str]) -> Iterator[str]:
    for src in sources:
        if os.path.isdir(src):
            for root, dirs, files in os.walk(src):
                dirs.sort()
                for name in sorted(files):
                    yield os.path.join(root, name)
        else:
            yield src


_WORKER: Any = None

#: One result per input: (status, reason or, when done, the output's file name, output size,
#: audit record as a JSON line or None).
_Result = tuple[str, str, int, str | None]


def _init_worker(deid: Any) -> None:
    global _WORKER
    _WORKER = deid


def _process(paths: list[str], out_dir: str, fsync: bool, with_audit: bool) -> list[_Result]:
    """Worker: de-identify a chunk; returns (status, reason, size, audit JSON) per input."""
    from .._exceptions import DeidError

    deid = _WORKER
    results: list[_Result] = []
    for p in paths:
        try:
            r = deid.deidentify_file(p, out_dir, fsync=fsync)
        except DeidError as exc:
            results.append(("quarantined", exc.reason, 0, None))
        except OSError as exc:
            import errno

            results.append(("failed", errno.errorcode.get(exc.errno or 0, "OSError"), 0, None))
        except Exception as exc:  # never let one input stop the run; the name is not reported
            results.append(("failed", type(exc).__name__, 0, None))
        else:
            audit = None
            if with_audit:
                import json

                audit = json.dumps(r.audit, sort_keys=True)
            results.append(("done", r.name, r.size, audit))
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


#: The defaults of ``Settings`` that ``anonymize`` reads (tests/deid/test_deid_fastpath.py checks
#: them against ``gateway_agent.config``).
DEFAULT_CONFIG_FILE = "/etc/gateway-agent/config.toml"
DEFAULT_STATE_DIR = "state"
DEFAULT_UNIT_NAME = "EDGE01"
_STATE_DIR_VAR = "GATEWAY_STATE_DIR"


def _default_settings(
    args: argparse.Namespace, overrides: dict[str, Any], environ: Mapping[str, str] = os.environ
) -> _DeidSetup | None:
    """What ``anonymize`` needs from the settings, without pydantic, when that is certain.

    That is when no config file is given or installed, no ``GATEWAY_*`` variable other than
    ``GATEWAY_STATE_DIR`` is set, and every flag value is valid as it is; the result is then
    what ``load_settings`` would give (pydantic costs about 0.1 s of start-up). Otherwise None:
    the caller loads ``Settings`` (with its validation errors).
    """
    from ..deid.profile import DeidOptions

    if getattr(args, "config", None) is not None:
        return None
    state_dir = DEFAULT_STATE_DIR
    seen = False
    for var, value in environ.items():
        if var.upper().startswith("GATEWAY_"):
            if var.upper() != _STATE_DIR_VAR or seen:
                return None
            state_dir, seen = value, True
    if os.path.isfile(DEFAULT_CONFIG_FILE):
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
            if not isinstance(value, str) or not value:
                return None
        elif name == "burned_in":
            if value not in ("quarantine", "allow"):
                return None
            options[name] = value
        elif isinstance(value, bool):
            options[name] = value
        else:
            return None
    secret_file: str = overrides.get("deid.secret_file") or os.path.join(state_dir, "secret.key")
    station_name: str = overrides.get("deid.station_name") or DEFAULT_UNIT_NAME
    return DeidOptions(**options), secret_file, station_name


def _settings_for(args: argparse.Namespace, overrides: dict[str, Any]) -> _DeidSetup:
    """(options, secret file, station name) from the configuration layers and the flags."""
    # Once pydantic is imported anyway (the agent, tests), the general path costs nothing more.
    if "gateway_agent.config" not in sys.modules:
        fast = _default_settings(args, overrides)
        if fast is not None:
            return fast
    from ..deid.profile import DeidOptions
    from . import settings_from_args

    settings = settings_from_args(args, overrides)
    return DeidOptions.from_settings(settings.deid), settings.secret_file, settings.station_name


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        f"deid.{field}": getattr(args, field) for field, _, _ in _OPTION_FLAGS
    }
    if args.allow_burned_in:
        overrides["deid.burned_in"] = "allow"
    overrides["deid.station_name"] = args.station_name
    overrides["deid.secret_file"] = args.secret_file
    return overrides


def _anonymize(args: argparse.Namespace) -> int:
    from ..deid import Deidentifier, load_or_create_secret

    options, secret_file, station_name = _settings_for(args, _overrides(args))
    secret = load_or_create_secret(secret_file)
    deid = Deidentifier(secret, options, station_name=station_name)

    files = list(_iter_files(args.src))
    out_dir = os.path.normpath(args.output)  # "" -> ".", as Path("") was
    os.makedirs(out_dir, exist_ok=True)
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
        with open(args.audit, "w", encoding="utf-8") as fh:
            for _, _, _, audit in results:
                if audit is not None:
                    fh.write(audit + "\n")
    status = Counter(r[0] for r in results)
    reasons = Counter((r[0], r[1]) for r in results if r[0] != "done")
    size = sum(r[2] for r in results)
    # Inputs that carry the same SOP Instance UID (copies, the same image in two transfer
    # syntaxes) have one output, the last written: say so, or the folder looks short.
    shared = status["done"] - len({r[1] for r in results if r[0] == "done"})
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
    files: list[str], out_dir: str, jobs: int, fsync: bool, with_audit: bool, progress: _Progress
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
                        data = marshal.dumps(done)
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
                    results[index] = [tuple(r) for r in done]
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
            part = [("failed", "worker_died", 0, None)] * len(chunks[index])
            progress.advance(len(part))
        out.extend(part)
    return out


def _take(
    queue: int, chunks: list[list[str]], out_dir: str, fsync: bool, with_audit: bool
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
    import json

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
