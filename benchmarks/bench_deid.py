"""Side-by-side de-identification benchmark: gateway-agent vs gdcmanon, Python peers and ``cp -r``.

Run::

    uv run python benchmarks/bench_deid.py [--slices 1000] [--repeat 3]

At the default 1,000 slices a process's start-up (interpreter, imports, tables: about 60 ms)
weighs under 5 % of gateway-agent's run, so the figures compare the per-file work.

What it does, in one run on the same files:

1. Generates a synthetic CT study (``make_ct_series``: 512x512 uint16 slices with the planted
   ``PHI_MARKERS``, one of them also in every file name) under ``--workdir`` (kept between runs).
2. Creates ``benchmarks/.peers-venv`` on first use (``uv venv`` + ``uv pip install`` of pinned
   dicognito, dicom-anonymizer and deid), separate from the project's lock.
3. Byte-compiles every Python contender (``compileall``, see ``compile_bytecode``) and reads
   the input once (warm page cache; dropping the cache needs root and is not attempted). Runs
   every tool ``--repeat`` times (``--fast-repeat`` times for the sub-second ones) as a whole
   process, in interleaved and rotated order, with ``os.sync()`` before each run so one
   tool's write-back does not land on the next one's clock.
4. Measures wall time (median) and CPU time (user + sys of the whole tree) in timed runs: the
   harness spawns the tool and blocks in ``wait4``, nothing else of it runs meanwhile. Peak
   memory comes from one extra, untimed run per tool: ``peak RSS, largest process`` is the
   kernel's high-water mark reported by GNU ``/usr/bin/time -f %M`` (max over the tool and
   every descendant it waited for; exact), ``peak RSS, tree`` is the sum of RSS over the run's
   process group sampled every 10 ms from ``/proc`` (what a multi-process tool costs the box at
   once; shared pages count in every process, peaks shorter than 10 ms can be missed).
5. Scans every output byte of the memory run for the planted markers (files containing any,
   total occurrences), and every output path for markers in names; counts output DICOM files
   and failures.
6. Prints a Markdown table, the ratios gateway-agent/gdcmanon and gateway-agent/best Python
   peer, and gateway-agent's start-up cost and heavy imports; writes ``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_VENV = HERE / ".peers-venv"
PEERS = ("dicognito==0.19.0", "dicom-anonymizer==2.1.0", "deid==0.4.13")
DEFAULT_WORKDIR = HERE / ".bench-work"
#: Planted in every input file name (scanner exports named by patient ID exist in the wild).
NAME_MARKER = "PHIMRN4711"
PAGE = os.sysconf("SC_PAGE_SIZE")
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
#: gateway-agent's goal against gdcmanon, whole process, in the same run.
TARGET_VS_GDCMANON = 1.3
HEAVY_MODULES = ("matplotlib", "sklearn", "scipy", "httpx", "pandas", "numpy", "PIL", "watchdog")
#: (on the anonymize path these are dead weight: pixel data is never decoded, nothing is uploaded)


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tool:
    """One contender: how to call it on ``src`` writing into ``out``, and what it is set to do."""

    name: str
    argv: Callable[[Path, Path], list[str]]
    config: str
    precreate_out: bool = True
    python_peer: bool = False
    env: dict[str, str] = field(default_factory=dict)


def _annex_e_dumb_args() -> list[str]:
    """gdcmanon ``--dumb`` arguments from the packaged Annex E table (basic profile actions).

    Every fixed-tag row whose basic action is X, Z, D or a compound of them becomes ``--remove``:
    gdcmanon 3.0.21 fails a run on ``--empty`` of a sequence or of a tag newer than its
    dictionary, and dumb mode has no VR-aware dummy values, so removal is the one action that
    works for all of them (type 2 attributes go missing: the outputs may be invalid objects).
    U and X/Z/U* UID rows are left alone (dumb mode cannot remap UIDs); rows with wildcard tags
    (50xx, 60xx, gggg) are skipped.
    """
    rows = json.loads((ROOT / "gateway_agent" / "data" / "annex_e_2024e.json").read_text())
    args: list[str] = []
    for row in rows:
        match = re.fullmatch(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)", row["tag"])
        action = row.get("basicProfile", "")
        if match and action and "U" not in action and action not in ("K", "C"):
            args += ["--remove", ",".join(match.groups())]
    return args


def _gateway_agent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "gateway-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway_agent"]


def build_tools(workdir: Path, jobs: int, cert: Path | None, peers_ok: bool) -> list[Tool]:
    """The contenders available on this machine, in table order."""
    tools: list[Tool] = []
    state = workdir / "gateway-agent-state"
    if _gateway_agent_ready():
        tools.append(
            Tool(
                "gateway-agent",
                lambda s, o: [
                    *_gateway_agent_cmd(),
                    "anonymize",
                    str(s),
                    "-o",
                    str(o),
                    "-j",
                    str(jobs),
                ],
                f"`gateway-agent anonymize SRC -o OUT -j {jobs}`: its defaults (Annex E 2024e "
                "basic profile + Clean Descriptors + Modified Dates; keyed UIDs, private tags "
                "removed, preamble zeroed, names from the new SOP Instance UID, no fsync)",
                env={"GATEWAY_STATE_DIR": str(state)},
            )
        )
    gdcmanon = shutil.which("gdcmanon")
    if gdcmanon and cert is not None:
        tools.append(
            Tool(
                "gdcmanon (basic)",
                lambda s, o: [
                    gdcmanon,
                    "--continue",
                    "-e",
                    "-c",
                    str(cert),
                    "-i",
                    str(s),
                    "-o",
                    str(o),
                ],
                "`gdcmanon --continue -e -c cert.pem -i SRC -o OUT`: GDCM's own PS3.15 E.1 basic "
                "profile (its built-in table; UIDs replaced; originals AES-256-encrypted into "
                "EncryptedAttributesSequence for a self-signed throwaway certificate)",
            )
        )
    if gdcmanon:
        dumb = _annex_e_dumb_args()
        tools.append(
            Tool(
                "gdcmanon (dumb)",
                lambda s, o: [gdcmanon, "--continue", "--dumb", *dumb, "-i", str(s), "-o", str(o)],
                f"`gdcmanon --continue --dumb` with {len(dumb) // 2} `--remove TAG`: every "
                "Annex E 2024e row whose basic action is X, Z, D or X/Z, X/D, X/Z/D (gdcmanon "
                "cannot `--empty` sequences or tags newer than its dictionary); no UID remap, "
                "no private-tag removal, no crypto",
            )
        )
    if peers_ok:
        py = str(PEERS_VENV / "bin" / "python")
        bin_ = PEERS_VENV / "bin"
        tools += [
            Tool(
                "dicognito",
                # Its 0.19.0 console script is broken (main() needs an argument): use -m.
                lambda s, o: [py, "-m", "dicognito", "-q", "-o", str(o), str(s)],
                "`python -m dicognito -q -o OUT SRC`: defaults (random seed, burned-in: if-yes)",
                python_peer=True,
            ),
            Tool(
                "dicom-anonymizer",
                lambda s, o: [str(bin_ / "dicom-anonymizer"), str(s), str(o)],
                "`dicom-anonymizer SRC OUT`: defaults (its Annex E based tag lists, private "
                "tags removed)",
                python_peer=True,
            ),
            Tool(
                "deid",
                lambda s, o: [
                    str(bin_ / "deid"),
                    "--outfolder",
                    str(o),
                    "identifiers",
                    "--input",
                    str(s),
                    "--action",
                    "all",
                ],
                "`deid --outfolder OUT identifiers --input SRC --action all`: default recipe",
                python_peer=True,
            ),
        ]
    tools.append(
        Tool(
            "cp -r",
            lambda s, o: ["cp", "-r", str(s), str(o)],
            "`cp -r SRC OUT`: the floor (copies, de-identifies nothing)",
            precreate_out=False,
        )
    )
    return tools


def _gateway_agent_ready() -> bool:
    try:
        done = subprocess.run(
            [*_gateway_agent_cmd(), "anonymize", "--help"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_peers_venv() -> bool:
    """Create ``benchmarks/.peers-venv`` with the pinned Python peers; False if impossible."""
    py = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".bench-peers"
    if py.exists() and stamp.exists() and stamp.read_text() == "\n".join(PEERS):
        return True
    uv = shutil.which("uv")
    if uv is None:
        print("! uv not found: Python peers skipped", file=sys.stderr)
        return False
    try:
        if not py.exists():
            subprocess.run([uv, "venv", "-q", "--python", "3.11", str(PEERS_VENV)], check=True)
        subprocess.run([uv, "pip", "install", "-q", "--python", str(py), *PEERS], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"! installing the Python peers failed ({exc}): peers skipped", file=sys.stderr)
        return False
    stamp.write_text("\n".join(PEERS))
    return True


def ensure_cert(workdir: Path) -> Path | None:
    """A throwaway self-signed certificate for gdcmanon's basic (encrypting) mode."""
    cert, key = workdir / "gdcmanon-cert.pem", workdir / "gdcmanon-key.pem"
    if cert.exists():
        return cert
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650"),
            *("-subj", "/CN=bench-deid", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert


def compile_bytecode(peers_ok: bool) -> None:
    """Write ``.pyc`` files for every Python contender (the project's venv, gateway_agent, peers).

    Without them every process compiles its imports from source (this machine sets
    ``PYTHONDONTWRITEBYTECODE=1``: ``import pydicom`` took 0.50 s instead of 0.14 s), which
    measures the environment, not the tools. Deployments get the same with
    ``uv sync --compile-bytecode`` (or Python writing them on first run).
    """
    import sysconfig

    jobs = [[sys.executable, "-m", "compileall", "-q", "-j", "0", sysconfig.get_paths()["purelib"]]]
    jobs[0].append(str(ROOT / "gateway_agent"))
    if peers_ok:
        peers_py = str(PEERS_VENV / "bin" / "python")
        jobs.append([peers_py, "-m", "compileall", "-q", "-j", "0", str(PEERS_VENV / "lib")])
    for argv in jobs:
        subprocess.run(argv, capture_output=True, check=False)


# --------------------------------------------------------------------------- input


def ensure_input(workdir: Path, slices: int) -> Path:
    """The synthetic study (regenerated when the slice count changes)."""
    src = workdir / f"input-{slices}"
    stamp = workdir / f"input-{slices}.ok"
    if stamp.exists():
        return src
    from gateway_agent.synthetic import make_ct_series, write_series

    shutil.rmtree(src, ignore_errors=True)
    t0 = time.perf_counter()
    write_series(make_ct_series(slices), src, prefix=f"{NAME_MARKER}_IMG")
    stamp.write_text(str(slices))
    print(f"generated {slices} slices in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return src


def warm(src: Path) -> int:
    """Read every input byte once; returns the total size."""
    total = 0
    for path in sorted(src.rglob("*")):
        if path.is_file():
            total += len(path.read_bytes())
    return total


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    """What one whole-process run of one tool did."""

    wall_s: float
    cpu_s: float
    maxrss_mb: float
    tree_rss_mb: float
    returncode: int
    dicom_out: int


def _group_memory(pgid: int, skip: int) -> tuple[int, int]:
    """(sum of RSS, largest VmHWM) in bytes over the live processes of group ``pgid``.

    ``skip`` is the ``/usr/bin/time`` wrapper's pid (not part of the tool). Only pids from
    ``pgid`` upwards are read: descendants get larger pids (barring pid wrap-around).
    """
    total = hwm = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) < pgid or int(name) == skip:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[2]) != pgid:  # fields: [0] state, [1] ppid, [2] pgrp, [21] rss
                continue
            total += int(fields[21]) * PAGE
            with open(f"/proc/{name}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total, hwm


def run_once(
    tool: Tool, src: Path, out: Path, logdir: Path, cwd: Path, *, sample: bool = False
) -> Run:
    """Run ``tool`` once as a whole process tree, measuring it from spawn to reap.

    A timed run (``sample=False``) spawns the tool itself and blocks in ``wait4``: the wall
    time ends when the tool exits, and nothing of the harness runs meanwhile. A memory run
    (``sample=True``) also samples the process group's RSS from ``/proc`` every 10 ms, and
    takes the peak RSS of the largest process from GNU ``/usr/bin/time -f %M`` when installed:
    the kernel's high-water mark of the tool, forked by a 2 MB process. (``os.wait4`` from this
    harness is wrong for it: a child's ru_maxrss starts at the RSS of whoever exec'd it, here
    ~90 MB of Python.) Without GNU time, the largest VmHWM seen while sampling is used. Memory
    runs are not timed: the sampler takes CPU from the tool (a whole core's share for a tool
    that uses both), and the 10 ms polling adds up to 10 ms to its wall time.
    """
    shutil.rmtree(out, ignore_errors=True)
    if tool.precreate_out:
        out.mkdir(parents=True)
    os.sync()
    logdir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9]+", "-", tool.name.lower()).strip("-")
    env = {**os.environ, **tool.env}
    argv = tool.argv(src, out)
    timefile = logdir / f"{stem}.maxrss"
    timefile.unlink(missing_ok=True)
    if sample and GNU_TIME:
        argv = [GNU_TIME, "-f", "%M", "-o", str(timefile), "--", *argv]
    log = os.open(logdir / f"{stem}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, log, 1)]
    actions.append((os.POSIX_SPAWN_DUP2, log, 2))
    here = Path.cwd()
    os.chdir(cwd)
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True)
    finally:
        os.chdir(here)
        os.close(log)
        os.close(null)
    tree_peak = hwm_peak = 0
    if not sample:
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
    else:
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                wall = float("nan")
                break
            rss, hwm = _group_memory(pid, pid if GNU_TIME else -1)
            tree_peak, hwm_peak = max(tree_peak, rss), max(hwm_peak, hwm)
            time.sleep(0.01)
    returncode = os.waitstatus_to_exitcode(status)
    maxrss = hwm_peak
    if sample and GNU_TIME and timefile.exists():
        # The last line is %M in KiB (GNU time writes "Command exited with ..." before it).
        maxrss = int(timefile.read_text().split()[-1]) * 1024
    return Run(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        maxrss_mb=maxrss / 1e6,
        tree_rss_mb=max(tree_peak, maxrss) / 1e6,
        returncode=returncode,
        dicom_out=count_dicom(out),
    )


def count_dicom(out: Path) -> int:
    """Output files that are DICOM part-10 (``DICM`` after the preamble)."""
    n = 0
    for path in out.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                fh.seek(128)
                n += fh.read(4) == b"DICM"
    return n


@dataclass
class Leaks:
    """Planted markers found in one tool's output."""

    files: int = 0
    files_with_markers: int = 0
    occurrences: int = 0
    names_with_markers: int = 0
    which: dict[str, int] = field(default_factory=dict)


def scan_markers(out: Path, markers: Sequence[str]) -> Leaks:
    """Every output file's bytes and every output path (relative to ``out``) against ``markers``."""
    leaks = Leaks()
    needles = [m.encode() for m in markers]
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        leaks.names_with_markers += any(m in rel for m in markers)
        if not path.is_file():
            continue
        leaks.files += 1
        data = path.read_bytes()
        hits = {m: data.count(n) for m, n in zip(markers, needles, strict=True)}
        found = sum(hits.values())
        leaks.occurrences += found
        leaks.files_with_markers += found > 0
        for m, c in hits.items():
            if c:
                leaks.which[m] = leaks.which.get(m, 0) + c
    return leaks


# --------------------------------------------------------------------------- start-up


def _median_wall(argv: list[str], repeat: int, cwd: Path, env: dict[str, str]) -> float:
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False, cwd=cwd, env=env)
        walls.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(walls), 1)


def startup_report(
    one_file: Path, workdir: Path, env: dict[str, str], anonymize: bool, repeat: int = 5
) -> dict[str, object]:
    """gateway-agent's fixed cost per process, and the imports on the ``anonymize`` path.

    Times ``python -c pass``, ``gateway-agent --help`` and ``gateway-agent anonymize`` of one
    file with ``-j 1``, then re-runs that one-file anonymize under ``python -X importtime`` and
    sums each top-level package's cumulative import time (packages imported from inside
    another package count in both).
    """
    env = {**os.environ, **env}
    out = workdir / "out" / "startup"
    one = [*_gateway_agent_cmd(), "anonymize", str(one_file), "-o", str(out), "-j", "1"]
    report: dict[str, object] = {
        "bare_python_ms": _median_wall([sys.executable, "-c", "pass"], repeat, workdir, env),
        "help_ms": _median_wall([*_gateway_agent_cmd(), "--help"], repeat, workdir, env),
    }
    traced = [sys.executable, "-X", "importtime", "-m", "gateway_agent", "--help"]
    if anonymize:
        report["anonymize_one_file_ms"] = _median_wall(one, repeat, workdir, env)
        traced = [sys.executable, "-X", "importtime", "-m", "gateway_agent", *one[len(one) - 6 :]]
    shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(traced, capture_output=True, text=True, check=False, cwd=workdir, env=env)
    shutil.rmtree(out, ignore_errors=True)
    cumulative: dict[str, float] = {}
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if m and "." not in m.group(2):
            name = m.group(2)
            cumulative[name] = cumulative.get(name, 0.0) + int(m.group(1)) / 1000
    report["traced"] = " ".join(traced[1:]).replace(str(workdir), "WORK")
    report["heavy_imports_ms"] = {
        k: round(v, 1) for k, v in cumulative.items() if k in HEAVY_MODULES
    }
    top = sorted(cumulative.items(), key=lambda kv: -kv[1])[:8]
    report["top_imports_ms"] = {k: round(v, 1) for k, v in top}
    return report


# --------------------------------------------------------------------------- report


@dataclass
class Result:
    """All timed runs of one tool, its memory run and its leak scan."""

    tool: str
    config: str
    python_peer: bool
    runs: list[Run]
    leaks: Leaks
    memory: Run

    @property
    def all_runs(self) -> list[Run]:
        return [self.memory, *self.runs]

    def files_per_s(self, n: int) -> float:
        return n / self.wall

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)


def table(results: list[Result], n: int, mbytes: float) -> str:
    """The Markdown table."""
    head = (
        "| tool | files/s | MB/s | wall s (median) | CPU s | files per CPU s "
        "| peak RSS largest proc MB "
        "| peak RSS tree MB | files out | files with markers | marker occurrences "
        "| names with markers | failures |"
    )
    lines = [head, "|---|" + "--:|" * 12]
    for r in results:
        bad_rc = sum(run.returncode != 0 for run in r.all_runs)
        missing = max(n - run.dicom_out for run in r.all_runs)
        failures = []
        if bad_rc:
            rcs = sorted({run.returncode for run in r.all_runs})
            failures.append(f"exit {rcs} in {bad_rc}/{len(r.all_runs)} runs")
        if missing > 0:
            failures.append(f"{missing} files missing")
        lines.append(
            f"| {r.tool} | {n / r.wall:,.0f} | {mbytes / r.wall:,.0f} | {r.wall:.3f} "
            f"| {r.cpu:.2f} | {n / r.cpu:,.0f} "
            f"| {r.memory.maxrss_mb:,.0f} "
            f"| {r.memory.tree_rss_mb:,.0f} "
            f"| {min(x.dicom_out for x in r.all_runs)} | {r.leaks.files_with_markers} "
            f"| {r.leaks.occurrences} | {r.leaks.names_with_markers} "
            f"| {'; '.join(failures) or '0'} |"
        )
    return "\n".join(lines)


def ratios(results: list[Result], n: int) -> list[str]:
    """gateway-agent against gdcmanon and the best Python peer, with the targets."""
    by = {r.tool: r for r in results}
    ga = by.get("gateway-agent")
    if ga is None:
        return ["gateway-agent: not available (`gateway-agent anonymize --help` failed)"]
    out = []
    ga_fps = ga.files_per_s(n)
    clean = ga.leaks.occurrences == 0 and ga.leaks.names_with_markers == 0
    for name in ("gdcmanon (basic)", "gdcmanon (dumb)"):
        if name in by:
            x = ga_fps / by[name].files_per_s(n)
            ok = x >= TARGET_VS_GDCMANON and clean
            out.append(
                f"- gateway-agent / {name}: **{x:.2f}x** files/s (target >= "
                f"{TARGET_VS_GDCMANON:g}x with 0 markers: "
                f"{_pf(ok)}); per CPU second {by[name].cpu / ga.cpu:.2f}x"
            )
    peers = [r for r in results if r.python_peer]
    if peers:
        best = max(peers, key=lambda r: r.files_per_s(n))
        x = ga_fps / best.files_per_s(n)
        out.append(
            f"- gateway-agent / best Python peer ({best.tool}): **{x:.1f}x** files/s "
            f"(target >= 10x: {_pf(x >= 10)}); per CPU second {best.cpu / ga.cpu:.1f}x"
        )
    return out


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine() -> str:
    """CPU model, cores, kernel, Python and gdcmanon versions, for the record."""
    import platform

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gdcm = "absent"
    if shutil.which("gdcmanon"):
        done = subprocess.run(
            ["gdcmanon", "--version"], capture_output=True, text=True, check=False
        )
        gdcm = " ".join(done.stdout.split()[1:3])
    return (
        f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {gdcm}"
    )


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 1 with ``--check`` when a gateway-agent target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--slices", type=int, default=1000, help="CT slices (512x512 uint16; default 1000)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (median reported)")
    parser.add_argument(
        "--fast-repeat", type=int, default=7, help="runs per tool whose median is under 1 s"
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=os.cpu_count() or 1, help="gateway-agent -j"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--tools", default="", help="comma-separated subset of tool names")
    parser.add_argument("--no-peers", action="store_true", help="skip the Python peers")
    parser.add_argument("--keep", action="store_true", help="keep the outputs (under WORKDIR/out)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)

    from gateway_agent.synthetic import PHI_MARKERS

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    src = ensure_input(workdir, args.slices)
    peers_ok = not args.no_peers and ensure_peers_venv()
    compile_bytecode(peers_ok)
    tools = build_tools(workdir, args.jobs, ensure_cert(workdir), peers_ok)
    if args.tools:
        wanted = {t.strip() for t in args.tools.split(",")}
        tools = [t for t in tools if t.name in wanted or t.name.split(" ")[0] in wanted]
    n = sum(1 for p in src.iterdir() if p.is_file())
    total_bytes = warm(src)
    mbytes = total_bytes / 1e6
    print(
        f"input: {n} files, {mbytes:.1f} MB; tools: {', '.join(t.name for t in tools)}; "
        f"repeat {args.repeat}",
        file=sys.stderr,
    )

    load_before = os.getloadavg()
    runs: dict[str, list[Run]] = {t.name: [] for t in tools}
    memory: dict[str, Run] = {}
    leaks: dict[str, Leaks] = {}
    outdir = workdir / "out"
    for tool in tools:  # one sampled run per tool: memory and the leak scan, not timed
        out = outdir / re.sub(r"[^a-z0-9]+", "-", tool.name.lower()).strip("-")
        memory[tool.name] = run = run_once(tool, src, out, workdir / "logs", workdir, sample=True)
        print(
            f"  [memory] {tool.name:18s} rc={run.returncode} out={run.dicom_out} "
            f"peak RSS {run.maxrss_mb:.0f} MB",
            file=sys.stderr,
        )
        leaks[tool.name] = scan_markers(out, PHI_MARKERS)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    rounds = max(args.repeat, args.fast_repeat)
    for rep in range(rounds):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
        if rep >= args.repeat:  # extra rounds only for the sub-second tools (noise at 0.1 s)
            order = [t for t in order if statistics.median(r.wall_s for r in runs[t.name]) < 1.0]
        for tool in order:
            out = outdir / re.sub(r"[^a-z0-9]+", "-", tool.name.lower()).strip("-")
            run = run_once(tool, src, out, workdir / "logs", workdir)
            runs[tool.name].append(run)
            print(
                f"  [{rep + 1}/{rounds}] {tool.name:18s} {run.wall_s:7.3f} s "
                f"rc={run.returncode} out={run.dicom_out}",
                file=sys.stderr,
            )
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)

    load_after = os.getloadavg()
    results = [
        Result(t.name, t.config, t.python_peer, runs[t.name], leaks[t.name], memory[t.name])
        for t in tools
    ]
    ga = [t for t in tools if t.name == "gateway-agent"]
    startup = startup_report(
        next(p for p in sorted(src.iterdir()) if p.is_file()),
        workdir,
        ga[0].env if ga else {},
        anonymize=bool(ga),
    )
    print()
    print(
        f"De-identification of {n} CT slices ({mbytes:.1f} MB), whole process, median of "
        f"{args.repeat} interleaved runs ({max(args.repeat, args.fast_repeat)} for tools under "
        f"1 s); {os.cpu_count()} cores, load average {load_before[0]:.1f} before and "
        f"{load_after[0]:.1f} after (other work on the box slows every tool alike); "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )
    print(f"Machine: {machine()}")
    print()
    print(table(results, n, mbytes))
    print()
    for line in ratios(results, n):
        print(line)
    one = startup.get("anonymize_one_file_ms")
    print(
        f"- gateway-agent start-up: `--help` {startup['help_ms']} ms"
        + (f", `anonymize` of 1 file with -j 1: {one} ms" if one is not None else "")
        + f" (bare python {startup['bare_python_ms']} ms)"
    )
    print(
        f"- imports (cumulative ms) of `{startup['traced']}`: {startup['top_imports_ms']}; "
        f"heavy: {startup['heavy_imports_ms'] or 'none'}"
    )
    for r in results:
        if r.leaks.which:
            print(f"- {r.tool} leaks: {r.leaks.which}")
    print()
    for t in tools:
        print(f"- **{t.name}**: {t.config}")

    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "files": n,
        "megabytes": mbytes,
        "repeat": args.repeat,
        "fast_repeat": args.fast_repeat,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": [
            {
                "tool": r.tool,
                "config": r.config,
                "files_per_s": n / r.wall,
                "mb_per_s": mbytes / r.wall,
                "runs": [asdict(x) for x in r.runs],
                "memory_run": asdict(r.memory),
                "leaks": asdict(r.leaks),
            }
            for r in results
        ],
        "startup": startup,
    }
    (workdir / "results.json").write_text(json.dumps(record, indent=2))
    if args.check:
        text = "\n".join(ratios(results, n))
        return 1 if "FAIL" in text or "not available" in text else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
