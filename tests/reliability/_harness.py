"""Shared helpers of the reliability suite: sizes, agent processes, PHI scans, test servers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gateway_agent.synthetic import PHI_MARKERS
from tests._procs import alive, descendants

__all__ = [
    "FULL",
    "AgentProcess",
    "Recorder",
    "free_port",
    "http_server",
    "phi_hits",
    "reached",
    "scan_names",
    "scan_tree_bytes",
    "sha256_file",
    "size",
    "wait_until",
    "write_config",
]

#: ``RELIABILITY_FULL=1`` runs the full sizes (docs/reliability.md); otherwise CI sizes. (Not
#: ``GATEWAY_*``: the agent refuses variables of its own prefix that are no setting.)
FULL = os.environ.get("RELIABILITY_FULL", "") not in ("", "0")
REPO = Path(__file__).resolve().parents[2]
_FIGURES = os.environ.get("RELIABILITY_FIGURES")


def size(ci: int, full: int) -> int:
    """The CI size, or the full size under ``RELIABILITY_FULL=1``."""
    return full if FULL else ci


def record_figures(case: str, figures: dict[str, Any]) -> None:
    """Append one case's figures (JSON line) to ``$RELIABILITY_FIGURES`` if set."""
    print(f"\nFIGURES {case}: {json.dumps(figures, sort_keys=True)}")
    if _FIGURES:
        with Path(_FIGURES).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"case": case, "full": FULL, **figures}, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- PHI


_MARKERS_B = tuple(m.encode() for m in PHI_MARKERS)
_MARKERS_LOWER = tuple(m.lower() for m in _MARKERS_B)


def phi_hits(data: bytes | str) -> list[str]:
    """The planted PHI markers found in ``data`` (case-insensitive, also UTF-16-LE encoded)."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    low = raw.lower()
    hits = [m.decode() for m in _MARKERS_LOWER if m in low]
    u16 = raw.replace(b"\0", b"").lower() if b"\0" in raw[:4096] else b""
    hits += [m.decode() + "(utf16)" for m in _MARKERS_LOWER if u16 and m in u16 and m not in low]
    return hits


def scan_names(*roots: Path) -> list[str]:
    """Paths under ``roots`` whose names carry a PHI marker."""
    bad = []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                if phi_hits(name):
                    bad.append(str(Path(dirpath, name)))
    return bad


def scan_tree_bytes(root: Path, *, skip: Callable[[Path], bool] = lambda p: False) -> list[str]:
    """``path: markers`` for every file under ``root`` whose bytes carry a PHI marker."""
    bad = []
    if not root.exists():
        return bad
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if skip(path):
            continue
        hits = phi_hits(path.read_bytes())
        if hits:
            bad.append(f"{path}: {hits}")
    return bad


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.1,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until true; raise AssertionError naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def reached(predicate: Callable[[], bool], timeout: float, *, interval: float = 0.1) -> bool:
    """Like :func:`wait_until`, but returns False on timeout (so figures can still be recorded)."""
    try:
        wait_until(predicate, timeout, interval=interval)
    except AssertionError:
        return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the agent process


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """Write a TOML config from a nested dict of plain values (str, int, float, bool, lists of
    them), sections (dicts, one level of sub-tables) and arrays of tables (lists of dicts)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    def plain(v: Any) -> bool:
        return not isinstance(v, dict) and not (
            isinstance(v, list) and v and isinstance(v[0], dict)
        )

    def table(header: str, name: str, body: dict[str, Any]) -> list[str]:
        out = [f"\n{header}"] + [f"{k} = {value(v)}" for k, v in body.items() if plain(v)]
        for sub, inner in body.items():
            if isinstance(inner, dict):
                out.append(f"[{name}.{sub}]")
                out += [f"{k} = {value(v)}" for k, v in inner.items()]
        return out

    lines = [f"{k} = {value(v)}" for k, v in settings.items() if plain(v)]
    for section, body in settings.items():
        if isinstance(body, dict):
            lines += table(f"[{section}]", section, body)
        elif not plain(body):
            for item in body:
                lines += table(f"[[{section}]]", section, item)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class AgentProcess:
    """``gateway-agent run`` as a child process; stdout+stderr appended to ``log_path``.

    ``kill9()`` sends SIGKILL to the recorded PID only; ``peak_rss_mb`` is the largest VmHWM seen
    over every incarnation (sampled by :meth:`sample` and just before each kill or stop).
    """

    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    argv_prefix: list[str] = field(default_factory=list)
    run_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss_mb: float = 0.0
    exit_codes: list[int] = field(default_factory=list)
    orphans: int = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        env = dict(os.environ, **self.env)
        env.pop("CI_NO_SUCH", None)
        cmd = [
            *self.argv_prefix,
            sys.executable,
            "-m",
            "gateway_agent",
            "--config",
            str(self.config),
            "--log-format",
            "json",
            "run",
            *self.run_args,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.config.parent,
                start_new_session=True,
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample(self) -> float:
        """Largest VmHWM (peak RSS) of the agent or any of its workers; keep the maximum."""
        if self.proc is None or self.proc.poll() is not None:
            return self.peak_rss_mb
        _total, hwm = tree_rss_mb(self.proc.pid)
        self.peak_rss_mb = max(self.peak_rss_mb, hwm)
        return self.peak_rss_mb

    def kill9(self) -> None:
        """SIGKILL the agent's main process only (``kill -9 PID``), then check that its
        worker processes die with it within 15 s (``orphans`` counts those that did not);
        leftovers are then killed through the process group (its own session)."""
        if self.proc is None:
            return
        self.sample()
        family = descendants(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.exit_codes.append(self.proc.wait(timeout=30))
        end = time.monotonic() + 15
        while any(alive(p) for p in family) and time.monotonic() < end:
            time.sleep(0.05)
        left = [p for p in family if alive(p)]
        self.orphans += len(left)
        if left:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def target_pid(self) -> int:
        """The agent's own PID: the child of the wrapper (strace) when there is one."""
        assert self.proc is not None
        if not self.argv_prefix:
            return self.proc.pid
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
                return int(text.split()[0])
            time.sleep(0.05)
        raise RuntimeError("the wrapped agent process did not appear")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (graceful shutdown); SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None:
            return 0
        self.sample()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.target_pid(), signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
                return -9
        rc = self.proc.returncode
        self.exit_codes.append(rc)
        return int(rc)

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []


# --------------------------------------------------------------------------- small servers


@dataclass
class Recorder:
    """What a test server saw: one ``(method, path, headers)`` per request."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            self.requests.append((method, path, headers))


def _stow_ok(body: bytes) -> bytes:
    """A STOW-RS 200 reply listing the SOP Instance UID of every part of a multipart ``body``
    (and an empty list for anything else, such as a QIDO-RS query)."""
    import io
    import re

    from pydicom import dcmread

    uids = []
    match = re.match(rb"--([^\r\n]+)\r\n", body)
    if match:
        for part in body.split(b"--" + match.group(1))[1:-1]:
            payload = part.split(b"\r\n\r\n", 1)[-1][:-2]
            with contextlib.suppress(Exception):
                ds = dcmread(io.BytesIO(payload), stop_before_pixels=True)
                uids.append(str(ds.SOPInstanceUID))
    if not match:
        return b"[]"
    items = [{"00081155": {"vr": "UI", "Value": [u]}} for u in uids]
    return json.dumps({"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ", "Value": items}}).encode()


def _handler(
    rec: Recorder, reply: Callable[[str, str], tuple[int, dict[str, str], bytes]] | None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = b""
            if length:
                data = self.rfile.read(length)
            elif "chunked" in (self.headers.get("Transfer-Encoding") or ""):
                chunks = []
                while True:
                    n = int(self.rfile.readline().strip() or b"0", 16)
                    chunks.append(self.rfile.read(n + 2)[:n])
                    if n == 0:
                        break
                data = b"".join(chunks)
            rec.add(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            if reply is None:
                status, headers = 200, {"Content-Type": "application/dicom+json"}
                body = _stow_ok(data)
            else:
                status, headers, body = reply(self.command, self.path)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _any  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextlib.contextmanager
def http_server(
    host: str = "127.0.0.1",
    *,
    reply: Callable[[str, str], tuple[int, dict[str, str], bytes]] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[tuple[str, Recorder]]:
    """A threaded HTTP(S) server on ``host``:free port; yields ``(base_url, recorder)``.

    The default reply is a STOW-RS 200 in DICOM JSON listing the instances posted (``[]`` for
    a query). ``tls`` is ``(cert, key)``.
    """
    rec = Recorder()
    server = ThreadingHTTPServer((host, 0), _handler(rec, reply))
    server.daemon_threads = True
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield f"{scheme}://{host}:{server.server_address[1]}", rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- one agent run


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """``(sum of RSS, largest VmHWM)`` over ``pid`` and all its descendants, in MiB."""
    total, hwm = 0.0, 0.0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return total, hwm


class AgentRun:
    """Folders, config and the agent process of one reliability run under ``root``.

    ``inbox/``, ``state/``, ``destination/`` (folder sink) and ``staging/`` (where inputs are
    written before an atomic rename into the inbox, as a scanner's copy tool would).
    """

    def __init__(
        self,
        root: Path,
        *,
        destination: dict[str, Any] | None = None,
        destinations: list[dict[str, Any]] | None = None,
        overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        argv_prefix: list[str] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.state = state_dir or root / "state"
        self.dest = root / "destination"
        self.staging = root / "staging"
        for d in (self.inbox, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "inbox": str(self.inbox),
            "state_dir": str(self.state),
            "settle_seconds": 0.3,
            "intake_workers": 2,
            "qc": {"enabled": False},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
            "disk": {"min_free_mb": 0},
            "log": {"level": "info", "format": "json"},
        }
        if destinations is not None:
            settings["destinations"] = destinations
        else:
            settings["destination"] = destination or {"kind": "folder", "folder": str(self.dest)}
        for key, value in (overrides or {}).items():
            if isinstance(value, dict):
                settings.setdefault(key, {}).update(value)
            else:
                settings[key] = value
        self.settings = settings
        self.config = write_config(root / "config.toml", settings)
        self.agent = AgentProcess(
            self.config, root / "agent.log", env=env or {}, argv_prefix=argv_prefix or []
        )
        self.peak_tree_rss_mb = 0.0

    # -- process -------------------------------------------------------------------------------
    def start(self) -> None:
        self.agent.start()

    def sample(self) -> None:
        if self.agent.alive():
            total, _hwm = tree_rss_mb(self.agent.pid)
            self.peak_tree_rss_mb = max(self.peak_tree_rss_mb, total)
            self.agent.sample()

    @property
    def peak_rss_mb(self) -> float:
        """The largest peak RSS of any one agent process (main or intake worker)."""
        return self.agent.peak_rss_mb

    def load_settings(self) -> Any:
        from gateway_agent.config import load_settings

        # The agent's GATEWAY_* environment (e.g. the password), as dotted overrides.
        overrides = {
            k.removeprefix("GATEWAY_").lower().replace("__", "."): v
            for k, v in self.agent.env.items()
            if k.startswith("GATEWAY_")
        }
        return load_settings(self.config, overrides)

    def engine(self) -> Any:
        """The same Deidentifier the agent builds (same secret file, options, station name)."""
        from gateway_agent.deid import Deidentifier, DeidOptions, load_or_create_secret

        s = self.load_settings()
        self.state.mkdir(parents=True, exist_ok=True)
        secret = load_or_create_secret(s.secret_file)
        return Deidentifier(secret, DeidOptions.from_settings(s.deid), station_name=s.station_name)

    # -- inputs --------------------------------------------------------------------------------
    def stage_ct(
        self,
        name: str,
        i: int,
        *,
        study: str,
        rows: int = 48,
        patients_every: int = 100,
        mrn: str = "PHIMRN4711",
        **slice_args: Any,
    ) -> Path:
        """Write synthetic CT slice ``i`` as ``staging/name``: instance ``i + 1`` of ``study``,
        ``rows`` x ``rows``, a new patient (planted PHI, ID ``mrn-K``) every ``patients_every``."""
        from gateway_agent.synthetic import Patient, make_ct_slice

        k = i // patients_every
        ds = make_ct_slice(
            patient=Patient(name=f"PHIDOE^PHIJANE{k}", patient_id=f"{mrn}-{k}"),
            study_seed=study,
            instance_number=i + 1,
            rows=rows,
            cols=rows,
            seed=i,
            **slice_args,
        )
        path = self.staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    def drop(self, name: str, data: bytes) -> Path:
        """Make ``inbox/name`` appear atomically with ``data`` (written in staging, renamed)."""
        (self.staging / name).parent.mkdir(parents=True, exist_ok=True)
        (self.staging / name).write_bytes(data)
        return self.feed(name)

    def feed(self, name: str) -> Path:
        """Move ``staging/name`` into ``inbox/name`` with one atomic rename."""
        target = self.inbox / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.staging / name, target)
        return target

    def inbox_files(self) -> list[Path]:
        return [p for p in self.inbox.rglob("*") if p.is_file() or p.is_symlink()]

    # -- state ---------------------------------------------------------------------------------
    def outbox_rows(self) -> list[tuple[str, str, str, int]]:
        """``(sop_instance_uid, state, path, size)`` of every delivery (read-only connection)."""
        return [(sop, state, path, size) for sop, state, path, size, _ in self.delivery_rows()]

    def delivery_rows(self) -> list[tuple[str, str, str, int, str]]:
        """``(sop_instance_uid, state, path, size, destination)`` of every delivery."""
        import sqlite3

        db = self.state / "outbox.db"
        if not db.exists():
            return []
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute(
                "select i.sop_instance_uid, d.state, i.path, i.size, d.destination"
                " from deliveries d join instances i on i.id = d.instance_id"
            )
            return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4])) for r in rows]
        except sqlite3.OperationalError as exc:
            # The agent creates the file (mode 0600) before its schema: caught (or killed) in
            # its first start-up, the database has no table yet, which means no rows.
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def outbox_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _sop, state, _p, _s in self.outbox_rows():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def quarantined(self) -> dict[str, Path]:
        """sha256 of each quarantined original -> its entry folder."""
        root = self.state / "quarantine"
        out: dict[str, Path] = {}
        if root.is_dir():
            for entry in root.iterdir():
                original = entry / "original"
                if original.is_file():
                    out[sha256_file(original)] = entry
        return out

    def delivered_uids(self, folder: Path | None = None) -> set[str]:
        """SOP Instance UIDs in a folder destination (``<study>/<series>/<sop>.dcm``; default:
        ``destination/``)."""
        folder = self.dest if folder is None else folder
        if not folder.is_dir():
            return set()
        return {p.stem for p in folder.rglob("*.dcm") if not p.name.startswith(".")}

    def metrics_port(self, timeout: float = 30.0) -> int | None:
        """The current incarnation's metrics port (from its ``service_ready`` log line)."""
        end = time.monotonic() + timeout
        while True:
            ready = [ln for ln in self.agent.log_lines() if '"service_ready"' in ln]
            if len(ready) >= self.agent.starts or time.monotonic() > end:
                break
            time.sleep(0.1)
        for line in reversed(ready):
            with contextlib.suppress(ValueError):
                port = json.loads(line).get("metrics_port")
                return int(port) if port else None
        return None

    def metrics_text(self) -> str:
        import httpx

        port = self.metrics_port()
        if port is None:
            return ""
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    def temp_files(self) -> list[str]:
        """Leftovers of interrupted writes anywhere in state, destination and inbox."""
        left = []
        for root in (self.state, self.dest, self.inbox):
            if not root.exists():
                continue
            for p in root.rglob("*"):
                n = p.name
                if p.is_file() and (
                    n.endswith((".tmp", ".partial", ".part"))
                    or (n.startswith(".") and "quarantine" not in p.parts)
                ):
                    left.append(str(p.relative_to(self.root)))
        return left


# --------------------------------------------------------------------------- PHI audit


def orthanc_files(base_url: str, auth: tuple[str, str]) -> Iterator[bytes]:
    """Every stored instance's bytes, pulled back from Orthanc (``/instances/{id}/file``)."""
    import httpx

    with httpx.Client(auth=auth, timeout=60) as client:
        ids = client.get(base_url + "/instances").json()
        for oid in ids:
            yield client.get(f"{base_url}/instances/{oid}/file").content


def _mode_problems(quarantine: Path) -> list[str]:
    problems = []
    if not quarantine.exists():
        return problems
    for p in [quarantine, *quarantine.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        want = 0o700 if p.is_dir() else 0o600
        if mode != want:
            problems.append(f"{p.relative_to(quarantine.parent)} mode {oct(mode)} != {oct(want)}")
    return problems


def phi_audit(
    run: AgentRun,
    *,
    orthanc: Any = None,
    metrics: str = "",
) -> dict[str, Any]:
    """Planted PHI anywhere it must not be, after a run; plus quarantine modes.

    Uploaded bytes (pulled back from Orthanc, or the folder destination), the outbox files, all
    agent log lines, the metrics text (taken by the caller while the agent ran), and every file
    name in outbox, quarantine and destination. Quarantine *contents* hold PHI by nature and
    are only checked for modes.
    """
    uploaded_hits: list[str] = []
    n_uploaded = 0
    if orthanc is not None:
        for i, data in enumerate(orthanc_files(orthanc.base_url, orthanc.auth)):
            n_uploaded += 1
            if hits := phi_hits(data):
                uploaded_hits.append(f"orthanc instance {i}: {hits}")
    for root in (run.dest, run.state / "outbox"):
        if not root.exists():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            n_uploaded += root == run.dest
            if hits := phi_hits(path.read_bytes()):
                uploaded_hits.append(f"{path.relative_to(run.root)}: {hits}")
    log_hits = [line[:300] for line in run.agent.log_lines() if phi_hits(line)]
    metrics_hits = phi_hits(metrics)
    name_hits = scan_names(run.state / "outbox", run.state / "quarantine", run.dest)
    modes = _mode_problems(run.state / "quarantine")
    return {
        "uploaded_checked": n_uploaded,
        "uploaded_bytes_hits": len(uploaded_hits),
        "log_lines": len(run.agent.log_lines()),
        "log_hits": len(log_hits),
        "metrics_checked": bool(metrics),
        "metrics_hits": len(metrics_hits),
        "name_hits": len(name_hits),
        "mode_problems": len(modes),
        "details": (uploaded_hits + log_hits + metrics_hits + name_hits + modes)[:20],
    }


def assert_no_phi(case: str, audit: dict[str, Any]) -> None:
    """Record the audit's figures under ``phi`` and fail on any hit."""
    figures = {k: v for k, v in audit.items() if k != "details"}
    record_figures("phi", {"run": case, **figures})
    bad = {
        k: audit[k]
        for k in ("uploaded_bytes_hits", "log_hits", "metrics_hits", "name_hits", "mode_problems")
        if audit[k]
    }
    assert not bad, f"PHI/mode problems after {case}: {bad}\n" + "\n".join(audit["details"])
