"""The agent commands: ``run`` (the daemon), ``status`` (outbox, destinations, quarantine), and
``retry``."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sqlite3
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import REASONS, ConfigError
from . import settings_from_args
from ._help import add_command

if TYPE_CHECKING:
    from types import FrameType

    from ..agent.service.paths import StatePaths
    from ..config import Settings

# The config (pydantic, ~0.1 s) and logs (structlog) are imported inside the handlers: the parser
# is built for every command.

__all__ = ["register"]


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=None, help="state folder (default ./state)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``status`` and ``retry``."""
    run = add_command(
        sub,
        "run",
        summary="run the agent: watch the inbox, de-identify, queue durably, upload",
        description=(
            "Every complete DICOM file in the inbox is de-identified into the outbox, uploaded, "
            "and what cannot be processed is quarantined. With no configuration: inbox ./inbox, "
            "state ./state, destination folder ./destination. SIGTERM/SIGINT stop gracefully."
        ),
        examples=[
            "gateway-agent run --inbox /srv/inbox --destination-folder /srv/out",
            "gateway-agent run --destination-s3 s3://research/site-a --s3-endpoint "
            "http://127.0.0.1:8333",
            "gateway-agent run --config /etc/gateway-agent/config.toml --log-format console",
        ],
    )
    run.add_argument("--inbox", type=Path, default=None, help="watched folder (default ./inbox)")
    _add_state_dir(run)
    dest = run.add_mutually_exclusive_group()
    dest.add_argument("--destination-folder", type=Path, default=None, help="folder destination")
    dest.add_argument("--destination-url", default=None, help="DICOMweb base URL (STOW-RS)")
    dest.add_argument(
        "--destination-dicom",
        metavar="CALLED_AE@HOST:PORT",
        default=None,
        help="C-STORE destination (a PACS): its AE title, host and port",
    )
    dest.add_argument(
        "--destination-s3", default=None, metavar="s3://BUCKET/PREFIX", help="S3 bucket and prefix"
    )
    run.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help="S3-compatible store (with --destination-s3)",
    )
    run.add_argument(
        "--listen-port",
        type=int,
        default=None,
        help="receive C-STORE from scanners on this port (turns the listener on)",
    )
    run.add_argument("--listen-ae", default=None, help="listener AE title (default unit name)")
    run.add_argument("--settle-seconds", type=float, default=None, help="settle time (default 2)")
    run.add_argument("--workers", type=int, default=None, help="de-identification processes")
    run.add_argument(
        "--originals", choices=["delete", "archive", "keep"], default=None, help="after commit"
    )
    run.add_argument("--archive-dir", type=Path, default=None, help="for --originals archive")
    run.add_argument("--metrics-port", type=int, default=None, help="0 picks a free port")
    run.add_argument("--no-metrics", action="store_true", help="no health/metrics HTTP server")
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=None, help="log level"
    )
    run.add_argument(
        "--new-secret",
        action="store_true",
        help="start although the site secret is not the one the state folder's instances were "
        "made with (or is missing): instances from now on get new UIDs and pseudonyms",
    )
    run.set_defaults(func=cmd_run)

    status = add_command(
        sub,
        "status",
        summary="inbox backlog, outbox counts, throughput, each destination's state, quarantine",
        description="Read from the state folder and the inbox; works while the agent runs.",
        examples=["gateway-agent status", "gateway-agent status --state-dir /var/lib/gw --json"],
    )
    _add_state_dir(status)
    status.add_argument("--inbox", type=Path, default=None, help="inbox (default: from config)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--latest", type=int, default=5, help="how many recent entries to list")
    status.set_defaults(func=cmd_status)

    retry = add_command(
        sub,
        "retry",
        summary="dead rows back to the queue; quarantined files back into the inbox",
        description=(
            "Without flags: dead deliveries are queued again and every waiting one is due now "
            "(use after fixing a destination or its credentials); --destination NAME limits "
            "that to one destination. --quarantine moves quarantined originals back into the "
            "inbox, where the running agent takes them again."
        ),
        examples=[
            "gateway-agent retry",
            "gateway-agent retry --destination pacs",
            "gateway-agent retry --quarantine --reason burned_in_annotation",
        ],
    )
    _add_state_dir(retry)
    retry.add_argument("--inbox", type=Path, default=None, help="inbox (for --quarantine)")
    retry.add_argument("--dead", action="store_true", help="requeue dead outbox rows")
    retry.add_argument(
        "--destination", default=None, metavar="NAME", help="only this destination's deliveries"
    )
    retry.add_argument("--quarantine", action="store_true", help="release quarantined files")
    retry.add_argument(
        "--reason",
        default=None,
        help="release the quarantined files with this reason (implies --quarantine)",
    )
    retry.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="with --quarantine and entry ids quarantined for their pixels (burned_in_*): "
        "after review (gateway-agent pixels), deliver these files as they are; recorded in "
        "their audit",
    )
    retry.add_argument("ids", nargs="*", help="outbox row ids (numbers) or quarantine ids")
    retry.set_defaults(func=cmd_retry)


# --------------------------------------------------------------------------------------- run
def _stop_during_startup(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGINT before the daemon has its own handlers: nothing runs yet, so exit 0.

    Without a handler a signal in this window kills the process, and in a container, where the
    agent is PID 1 and an unhandled signal is ignored, ``docker stop`` would wait out its timeout.
    """
    print(f"gateway-agent: {signal.Signals(signum).name} during start-up; stopped", file=sys.stderr)
    raise SystemExit(0)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; SIGHUP reloads the configuration
    (the same flags, the configuration file and environment read again)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop_during_startup)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload yet
    overrides: dict[str, Any] = {
        "inbox": args.inbox,
        "state_dir": args.state_dir,
        "settle_seconds": args.settle_seconds,
        "intake_workers": args.workers,
        "originals": args.originals,
        "archive_dir": args.archive_dir,
        "metrics.port": args.metrics_port,
        "log.level": args.log_level,
        "log.format": args.log_format,
    }
    if args.destination_folder is not None:
        overrides["destination.kind"] = "folder"
        overrides["destination.folder"] = args.destination_folder
    if args.destination_url is not None:
        overrides["destination.kind"] = "dicomweb"
        overrides["destination.url"] = args.destination_url
    if args.destination_dicom is not None:
        from ..config import parse_dicom_address

        try:
            called, host, port = parse_dicom_address(args.destination_dicom)
        except ValueError as exc:
            raise ConfigError(f"--destination-dicom: {exc}") from None
        overrides.update(
            {
                "destination.kind": "dicom",
                "destination.called_ae": called,
                "destination.host": host,
                "destination.port": port,
            }
        )
    if args.listen_port is not None:
        overrides["listener.enabled"] = True
        overrides["listener.port"] = args.listen_port
    if args.listen_ae is not None:
        overrides["listener.ae_title"] = args.listen_ae
    if args.destination_s3 is not None:
        from ..config import parse_s3_url

        try:
            bucket, prefix = parse_s3_url(args.destination_s3)
        except ValueError as exc:
            raise ConfigError(f"--destination-s3: {exc}") from None
        overrides["destination.kind"] = "s3"
        overrides["destination.bucket"] = bucket
        overrides["destination.prefix"] = prefix
    if args.s3_endpoint is not None:
        if args.destination_s3 is None:
            raise ConfigError("--s3-endpoint goes with --destination-s3 s3://BUCKET/PREFIX")
        overrides["destination.endpoint_url"] = args.s3_endpoint
    if args.no_metrics:
        overrides["metrics.enabled"] = False
    settings = settings_from_args(args, overrides)
    from ..logs import configure

    def configure_logs(s: Settings) -> None:
        # Logs of the service go to stdout (journald, docker logs); --log-format wins.
        configure(args.log_format or s.log.format, s.log.level, stream=sys.stdout)

    def reload() -> Settings:
        new = settings_from_args(args, overrides)
        configure_logs(new)
        return new

    configure_logs(settings)
    from ..agent.service.daemon import Daemon

    status: int = Daemon(settings, new_secret=args.new_secret).run_forever(reload)
    return status


# ------------------------------------------------------------------------------------ status
#: ``status`` stops counting inbox files here and prints "more than" this: a backlog this large
#: is news enough, and the count (a walk of the inbox's folder listings, beside an agent draining
#: it) stays a small part of a ``status`` that answers within a second.
INBOX_COUNT_LIMIT = 10_000
#: ``status`` stops counting instances received over C-STORE and not taken yet here.
RECEIVED_COUNT_LIMIT = 100_000
#: An inbox file older than this is worth a hint (the settle time is seconds).
STALE_INBOX_SECONDS = 120.0


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {"state_dir": args.state_dir, **extra}
    return settings_from_args(args, overrides)


def _age(seconds: float) -> str:
    from ..agent.upload.stall import format_age

    return format_age(seconds)


def _when(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _read(db: Path, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """One query on the outbox file through a read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _sent_since(db: Path, seconds: float) -> int:
    """Deliveries acknowledged in the last ``seconds`` (read-only query on the outbox file)."""
    rows = _read(
        db,
        "select count(*) from deliveries where state = 'sent' and sent_at >= ?",
        (time.time() - seconds,),
    )
    return int(rows[0][0])


def _dead_rows(db: Path, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` latest dead deliveries (the newest instance first)."""
    rows = _read(
        db,
        "select d.instance_id, d.destination, i.sop_instance_uid, d.last_error"
        " from deliveries d join instances i on i.id = d.instance_id where d.state = 'dead'"
        " order by d.instance_id desc, d.destination desc limit ?",
        (limit,),
    )
    return [
        {"id": int(r[0]), "destination": r[1], "sop_instance_uid": r[2], "last_error": r[3]}
        for r in rows
    ]


def _qc_outliers(settings: Settings, latest: int) -> list[dict[str, Any]]:
    from ..agent.service.paths import StatePaths
    from ..qc.report_file import latest_outliers  # not the QC job: no NumPy, no matplotlib

    return latest_outliers(StatePaths(settings.state_dir).qc_report)[:latest]


def _inbox_summary(inbox: Path, originals: str, state_dir: Path) -> dict[str, Any]:
    """Files in the inbox not taken yet, and the oldest one's age (not with ``keep``, where
    processed originals stay); whether the inbox is there; originals it refused to give up.

    The count stops at ``INBOX_COUNT_LIMIT`` (``waiting_capped``: more wait); the age is read of
    the first ``BACKLOG_AGES`` files only (``oldest_exact`` false beyond: the oldest of those,
    so the oldest of all is at least that old)."""
    from ..agent.intake.originals import undeletable_count
    from ..agent.intake.watcher import inbox_backlog

    summary: dict[str, Any] = {
        "path": str(inbox),
        "originals": originals,
        "missing": not inbox.is_dir(),
        "undeletable": undeletable_count(state_dir),
    }
    if originals == "keep" or summary["missing"]:
        return summary
    backlog = inbox_backlog(inbox, INBOX_COUNT_LIMIT)
    summary["waiting"] = backlog.count
    summary["waiting_capped"] = backlog.more
    oldest = backlog.oldest
    summary["oldest_seconds"] = None if oldest is None else max(0.0, time.time() - oldest)
    summary["oldest_exact"] = backlog.oldest_exact
    return summary


def _listener_summary(listener: dict[str, Any], unit_name: str, state_dir: Path) -> dict[str, Any]:
    """The C-STORE listener's counters (``state/listener.json``, kept by the running agent) and
    the received instances not taken by intake yet; ``listener`` is the ``[listener]`` section
    the agent runs with."""
    from ..dicom.spool import received_files

    summary: dict[str, Any] = {
        "ae_title": listener.get("ae_title") or unit_name,
        "address": f"{listener.get('host')}:{listener.get('port')}",
        "allowed_calling_aes": list(listener.get("allowed_calling_aes") or []),
    }
    try:
        summary.update(json.loads((state_dir / "listener.json").read_text()))
    except (OSError, ValueError):
        summary["counters"] = None
    waiting = 0
    for _ in received_files(state_dir / "received"):
        waiting += 1
        if waiting >= RECEIVED_COUNT_LIMIT:
            break
    summary["received_waiting"] = waiting
    return summary


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _recorded_destinations(record: dict[str, Any] | None) -> list[dict[str, str]] | None:
    """``[{"name", "target"}]`` the running agent recorded (an older record names one target)."""
    if record is None:
        return None
    listed = record.get("destinations")
    if isinstance(listed, list):
        return [{"name": str(d.get("name")), "target": str(d.get("target"))} for d in listed]
    if isinstance(record.get("destination"), str):
        return [{"name": "default", "target": record["destination"]}]
    return None


def collect_status(
    settings: Settings, latest: int = 5, *, inbox_given: bool = False
) -> dict[str, Any]:
    """Everything ``status`` prints, as a dict (also used by tests). Nothing is written: the
    outbox is read through a read-only connection.

    When an agent has started with this state folder, its recorded settings (flags and
    ``GATEWAY_*`` variables included) name the destinations and the inbox, rather than the
    configuration as it is now; ``inbox_given`` keeps an inbox given on the command line.
    """
    from ..agent.intake.quarantine import Quarantine
    from ..agent.service.effective import read_effective_settings
    from ..agent.service.paths import StatePaths
    from ..agent.upload.stall import destination_problems, hint

    paths = StatePaths(settings.state_dir)
    record = read_effective_settings(paths.root)
    configured = [{"name": d.name, "target": d.target} for d in settings.all_destinations]
    used = _recorded_destinations(record) or configured
    destinations: dict[str, dict[str, Any]] = {d["name"]: dict(d) for d in used}
    if used != configured:
        for name, entry in destinations.items():
            now = next((d["target"] for d in configured if d["name"] == name), None)
            if now != entry["target"]:
                entry["configured"] = now or "(not configured)"
        for d in configured:
            if d["name"] not in destinations:
                destinations[d["name"]] = {
                    "name": d["name"],
                    "target": "(not used by the running agent)",
                    "configured": d["target"],
                }
    inbox, originals = Path(settings.inbox), str(settings.originals)
    listener = settings.listener.model_dump(mode="json")
    unit_name = settings.unit_name
    kinds = {d.name: d.model_dump(mode="json") for d in settings.all_destinations}
    window = settings.metrics.ready_upload_window_seconds
    if record is not None:
        recorded = record.get("settings") or {}
        kinds = _recorded_kinds(recorded) or kinds
        window = float((recorded.get("metrics") or {}).get("ready_upload_window_seconds", window))
        listener = recorded.get("listener") or listener
        unit_name = str(recorded.get("unit_name") or unit_name)
        if not inbox_given and recorded.get("inbox"):
            inbox, originals = Path(recorded["inbox"]), str(recorded.get("originals", originals))
    out: dict[str, Any] = {
        "state_dir": str(paths.root),
        "agent": None
        if record is None
        else {
            "pid": record.get("pid"),
            "running": _pid_alive(record.get("pid")),
            "started_at": record.get("started_at"),
            "version": record.get("version"),
        },
        "inbox": _inbox_summary(inbox, originals, paths.root),
        "outbox": None,
        "destinations": list(destinations.values()),
        "quarantine": Quarantine(paths.quarantine).summary(latest),
        "qc_outliers": _qc_outliers(settings, latest),
    }
    if listener.get("enabled") or (paths.root / "listener.json").exists():
        out["listener"] = _listener_summary(listener, unit_name, paths.root)
    if not paths.outbox_db.exists():
        return out
    out["outbox"] = _outbox_summary(paths, latest, used, destinations)
    at = time.time()
    for name, entry in destinations.items():
        if name in kinds:
            entry["proof"] = _proof_label(kinds[name])
        if "counts" in entry:  # its deliveries were read
            entry["problems"] = destination_problems(
                entry,
                waiting=int(entry["waiting"]),
                oldest_waiting=entry["oldest_waiting_seconds"],
                now=at,
                window=window,
            )
            entry["hint"] = hint(entry.get("last_error"))
    out["destinations"] = list(destinations.values())
    return out


def _outbox_summary(
    paths: StatePaths,
    latest: int,
    used: list[dict[str, Any]],
    destinations: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Counts, throughput and the latest dead deliveries, read through a read-only connection
    (a ``status`` writes nothing); each destination's report joins its entry in
    ``destinations``; outbox databases found damaged and kept aside."""
    from ..agent.outbox.db import STATES
    from ..agent.outbox.routing import Route
    from ..agent.outbox.schema import OutboxSchemaError
    from ..agent.outbox.store import Outbox

    damaged = [
        {"file": p.name, "time": _when(p.stat().st_mtime)} for p in paths.damaged_databases()
    ]
    try:
        outbox = Outbox(paths.outbox_db, routes=[Route(d["name"]) for d in used], read_only=True)
    except OutboxSchemaError as exc:
        return {"error": str(exc), "damaged": damaged}
    except sqlite3.DatabaseError:
        return {"unreadable": True, "damaged": damaged}
    try:
        reports = outbox.destination_report()
        # The outbox's totals are the sums of its destinations' (each delivery is one
        # destination's): read once, not again over every delivery.
        counts = {state: sum(r["counts"][state] for r in reports.values()) for state in STATES}
        ages = [r["oldest_waiting_seconds"] for r in reports.values()]
        summary = {
            "instances": outbox.instance_count(),
            "counts": counts,
            "waiting": counts["queued"] + counts["sending"],
            "oldest_waiting_seconds": max((a for a in ages if a is not None), default=None),
            "sent_last_minute": _sent_since(paths.outbox_db, 60),
            "sent_last_hour": _sent_since(paths.outbox_db, 3600),
            "unrouted": outbox.unrouted_count(),
            "dead_latest": _dead_rows(paths.outbox_db, latest),
            "damaged": damaged,
        }
        for kind in ("proof_pending", "unproven"):
            summary[kind] = {
                key: sum(r[kind][key] for r in reports.values()) for key in ("rows", "bytes")
            }
        for name, report in reports.items():
            entry = destinations.setdefault(
                name, {"name": name, "target": "(not configured: its deliveries wait)"}
            )
            entry.update(report)
        return summary
    except sqlite3.DatabaseError:
        return {"unreadable": True, "damaged": damaged}
    finally:
        outbox.close()


def _proof_label(destination: dict[str, Any]) -> str:
    """How the destination's storage is proven, as the agent runs it."""
    kind = destination.get("kind")
    if kind == "folder":
        return "storage proven: sizes read back"
    if kind in ("dicomweb", "dicom", "s3"):
        if destination.get("confirm_storage", True):
            how = {"dicomweb": "QIDO-RS", "dicom": "C-FIND", "s3": "HEAD with the checksum"}
            return f"storage proven: {how[kind]}"
        return "acknowledgements trusted: confirm_storage = false"
    return "acknowledgements trusted: no proof of storage for this kind"


def _recorded_kinds(recorded: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: destination settings}`` from the settings a running agent recorded."""
    listed = recorded.get("destinations")
    if isinstance(listed, list) and listed:
        return {str(d.get("name")): d for d in listed if isinstance(d, dict)}
    single = recorded.get("destination")
    return {"default": single} if isinstance(single, dict) else {}


def _print_listener(ls: dict[str, Any]) -> None:
    w = sys.stdout.write
    allowed = ", ".join(ls["allowed_calling_aes"]) or "any calling AE"
    w(f"listener: C-STORE as {ls['ae_title']} on {ls['address']} ({allowed})\n")
    c = ls.get("counters")
    if not c:
        w("  no counters yet (the agent has not run with the listener on)\n")
    else:
        w(
            f"  since {_when(ls.get('since'))}: {c.get('associations', 0)} association(s), "
            f"{c.get('stored', 0)} instance(s) received, {c.get('refused', 0)} refused "
            f"(0xA700), {c.get('rejected', 0)} association(s) rejected\n"
        )
        for ae, per in sorted((ls.get("by_calling_ae") or {}).items()):
            extra = "".join(f", {per[k]} {k}" for k in ("refused", "rejected") if per.get(k))
            w(f"  {ae!r}: {per.get('stored', 0)} received{extra}, last {_when(per.get('last'))}\n")
    if ls.get("received_waiting"):
        w(f"  {ls['received_waiting']} received instance(s) waiting for intake\n")


def _print_destination(w: Any, d: dict[str, Any]) -> None:
    proof = d.get("proof")
    w(f"destination {d['name']}: {d['target']}" + (f" ({proof})" if proof else "") + "\n")
    if d.get("configured"):
        w(f"  the configuration now says {d['configured']}: restart the agent to use it\n")
    c = d.get("counts")
    if c is not None:
        age = d.get("oldest_waiting_seconds")
        w("  " + ", ".join(f"{k} {c[k]}" for k in ("queued", "sending", "sent", "dead")))
        w(f"; oldest waiting {'-' if age is None else _age(age)}\n")
    if d.get("removed") and (d.get("waiting") or (c or {}).get("dead")):
        w("  NOT CONFIGURED ANY MORE: its deliveries wait; configure it again to deliver them\n")
    if d.get("auth_failing") and str(d.get("target", "")).startswith("dicom "):
        w(
            "  ASSOCIATION REJECTED: the peer does not accept our AE titles: fix "
            "destination.called_ae / calling_ae (or register the calling AE at the PACS), "
            "restart, then `gateway-agent retry`\n"
        )
    elif d.get("auth_failing"):
        w("  AUTHENTICATION FAILING: fix the credentials, restart, then `gateway-agent retry`\n")
    elif "NoSuchBucket" in str(d.get("last_error") or "") and d.get("consecutive_failures"):
        w(
            "  NO SUCH BUCKET: create the bucket or fix destination.bucket (and region), restart; "
            "deliveries wait without spending attempts\n"
        )
    pending, unproven = d.get("proof_pending") or {}, d.get("unproven") or {}
    if pending.get("rows"):
        w(f"  sent, proof of storage pending: {pending['rows']} (files kept until proven)\n")
    if unproven.get("rows"):
        w(
            f"  sent without proof of storage: {unproven['rows']} "
            f"({unproven['bytes'] / 1e6:.1f} MB of outbox files kept)\n"
        )
    for problem in d.get("problems") or []:
        if problem.startswith("destination refuses the agent"):
            continue  # said above
        problem = problem.split("; last error: ", 1)[0]  # printed below
        if problem.startswith("stalled: "):
            problem = "STALLED: " + problem.removeprefix("stalled: ")
        w(f"  {problem}\n")
    if d.get("last_error"):
        w(f"  last error ({_when(d.get('last_error_at'))}): {d['last_error']}\n")
        if d.get("consecutive_failures"):
            w(f"  consecutive failures: {d['consecutive_failures']}")
            blocked = d.get("blocked_until")
            if blocked and blocked > time.time():
                w(f", next attempt in {blocked - time.time():.0f} s")
            w("\n")
    recent = (d.get("last_error_at") or 0) >= (d.get("last_success_at") or 0)
    if d.get("hint") and (d.get("problems") or d.get("consecutive_failures") or recent):
        w(f"  what to do: {d['hint']}\n")
    if d.get("last_success_at"):
        w(f"  last delivery: {_when(d['last_success_at'])}\n")


def _print_status(st: dict[str, Any]) -> None:
    w = sys.stdout.write
    w(f"state: {st['state_dir']}\n")
    agent = st.get("agent")
    if agent is None:
        w("agent: has not run with this state folder\n")
    else:
        state = "running" if agent["running"] else "not running"
        w(f"agent: {state} (pid {agent['pid']}, started {agent['started_at']})\n")
    inbox = st["inbox"]
    if inbox.get("missing"):
        w(f"inbox: MISSING ({inbox['path']}): the agent waits for it to be back\n")
    elif "waiting" not in inbox:
        w(f"inbox: {inbox['path']} (originals kept: not counted)\n")
    elif inbox["waiting"]:
        count = f"more than {inbox['waiting']}" if inbox["waiting_capped"] else inbox["waiting"]
        age = inbox["oldest_seconds"]
        oldest = "" if age is None else f", oldest {_age(age)}"
        if age is not None and not inbox.get("oldest_exact", True):
            oldest = f", oldest at least {_age(age)}"
        w(f"inbox: {count} file(s) not taken yet{oldest}\n")
        if age is not None and age > STALE_INBOX_SECONDS:
            w("  files that stay are deferred: see intake_deferred / intake_paused in the log\n")
    else:
        w("inbox: empty\n")
    if inbox.get("undeletable"):
        w(
            f"  {inbox['undeletable']} original(s) could not be removed (read-only inbox?): "
            'they stay and are not processed again; make it writable or set originals = "keep"\n'
        )
    ob = st["outbox"]
    for item in (ob or {}).get("damaged", []):
        w(
            f"outbox database found damaged ({item['time']}): kept as {item['file']}, rebuilt "
            "from the outbox files (instances already sent may be sent again)\n"
        )
    if ob is None:
        w("outbox: empty (the agent has not run with this state folder)\n")
    elif "error" in ob:
        w(f"outbox: {ob['error']}\n")
    elif ob.get("unreadable"):
        w("outbox: UNREADABLE (damaged): the agent keeps it aside and rebuilds it when it starts\n")
    else:
        c = ob["counts"]
        w(f"outbox: {ob['instances']} instance(s); deliveries: ")
        w(", ".join(f"{k} {c[k]}" for k in ("queued", "sending", "sent", "dead")) + "\n")
        age = ob["oldest_waiting_seconds"]
        w(f"oldest waiting: {'-' if age is None else f'{age:.0f} s'}\n")
        w(
            f"throughput: {ob['sent_last_minute']} sent in the last minute, "
            f"{ob['sent_last_hour']} in the last hour\n"
        )
        pending, unproven = ob.get("proof_pending") or {}, ob.get("unproven") or {}
        if pending.get("rows"):
            w(
                f"  sent, proof of storage pending: {pending['rows']} delivery(ies) "
                "(files kept until proven)\n"
            )
        if unproven.get("rows"):
            w(
                f"  sent without proof of storage: {unproven['rows']} delivery(ies) "
                f"({unproven['bytes'] / 1e6:.1f} MB of outbox files kept)\n"
            )
        if ob["unrouted"]:
            w(f"  unrouted: {ob['unrouted']} instance(s) matched no destination's rule\n")
        for d in ob["dead_latest"]:
            w(f"  dead #{d['id']} {d['destination']} {d['sop_instance_uid']}: {d['last_error']}\n")
    if "listener" in st:
        _print_listener(st["listener"])
    for d in st["destinations"]:
        _print_destination(w, d)
    q = st["quarantine"]
    reasons = ", ".join(f"{k} {v}" for k, v in q["by_reason"].items())
    w(f"quarantine: {q['count']} file(s)" + (f" ({reasons})" if reasons else "") + "\n")
    for e in q["latest"]:
        w(f"  {e['id']} {e['reason']}: {e['detail']}\n")
    outliers = st.get("qc_outliers") or []
    w(f"qc: {len(outliers)} outlier(s) in the latest fleet report\n")
    for o in outliers:
        reasons = "; ".join(o.get("reasons") or [])
        who = o.get("scanner") or o.get("device") or "?"  # the scanner, not the edge box
        w(f"  {who} {o.get('sop_instance_uid', '')}: {reasons}\n")


def cmd_status(args: argparse.Namespace) -> int:
    """Print the agent's state; works while the daemon runs (SQLite WAL readers)."""
    settings = _settings(args, inbox=args.inbox)
    st = collect_status(settings, latest=max(0, args.latest), inbox_given=args.inbox is not None)
    if args.json:
        json.dump(st, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        _print_status(st)
    return 0


# ------------------------------------------------------------------------------------- retry
def _fail_retry(message: str) -> int:
    print(f"gateway-agent retry: {message}", file=sys.stderr)
    return 1


def _deliveries(n: int) -> str:
    return "delivery" if n == 1 else "deliveries"


def _existing_rows(db: Path, ids: list[int]) -> set[int]:
    """Which of ``ids`` are outbox rows (read-only query; none without an outbox)."""
    if not db.exists():
        return set()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)
    try:
        marks = ",".join("?" * len(ids))
        found = conn.execute(f"select id from instances where id in ({marks})", ids).fetchall()  # noqa: S608 - placeholders only
    finally:
        conn.close()
    return {int(r[0]) for r in found}


def _retry_rows(db: Path, row_ids: list[int], destination: str | None) -> int:
    """Requeue dead deliveries (of these instance ids, or all; of one destination, or of
    every one) and make waiting ones due; the exit status.

    Raises ``sqlite3.DatabaseError`` (a damaged database among them, see ``is_damage``).
    """
    if row_ids:
        missing = sorted(set(row_ids) - _existing_rows(db, row_ids))
        if missing:
            return _fail_retry("no outbox row " + ", ".join(f"#{i}" for i in missing))
    if not db.exists():
        print("outbox: nothing to retry")
        return 0
    from ..agent.outbox.schema import OutboxSchemaError
    from ..agent.outbox.store import Outbox

    try:
        outbox = Outbox(db, routes=None, upgrade=False)
    except OutboxSchemaError as exc:
        return _fail_retry(str(exc))
    try:
        names = outbox.destination_names()
        if destination is not None and destination not in names:
            return _fail_retry(f"no destination {destination!r} (known: {', '.join(names)})")
        n = outbox.retry_dead(row_ids or None, destination=destination)
        due = outbox.retry_now(destination=destination)
    finally:
        outbox.close()
    where = f" of {destination}" if destination else ""
    print(f"requeued {n} dead {_deliveries(n)}{where}; {due} waiting {_deliveries(due)} due now")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    """Requeue dead deliveries (and make waiting ones due), or release quarantined files."""
    from ..agent.intake.quarantine import Quarantine
    from ..agent.outbox.repair import is_damage
    from ..agent.service.paths import StatePaths

    settings = _settings(args, inbox=args.inbox)
    paths = StatePaths(settings.state_dir)
    quarantine_too = args.quarantine or args.reason is not None
    do_dead = args.dead or not quarantine_too
    row_ids = [int(i) for i in args.ids if i.isdigit()]
    q_ids = [i for i in args.ids if not i.isdigit()]
    if q_ids and not quarantine_too:
        return _fail_retry(f"{q_ids[0]} is not an outbox row id (quarantine ids need --quarantine)")
    if args.reason is not None and args.reason not in REASONS:
        known = ", ".join(REASONS)
        return _fail_retry(f"unknown reason {args.reason!r} (reasons: {known})")
    status = 0
    if args.allow_burned_in and not (quarantine_too and q_ids):
        return _fail_retry(
            "--allow-burned-in releases reviewed objects one by one: give --quarantine and "
            "their ids"
        )
    if do_dead:
        try:
            rc = _retry_rows(paths.outbox_db, row_ids, args.destination)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            print(
                f"gateway-agent retry: outbox database damaged ({type(exc).__name__}): the agent"
                " keeps it aside and rebuilds the outbox from its files when it starts",
                file=sys.stderr,
            )
            return 1
        if rc:
            return rc
    if quarantine_too:
        quarantine = Quarantine(paths.quarantine)
        entries = quarantine.entries()
        if q_ids:
            wanted = set(q_ids)
            unknown = wanted - {e.id for e in entries}
            for u in sorted(unknown):
                print(f"no quarantine entry {u}", file=sys.stderr)
                status = 1
            entries = [e for e in entries if e.id in wanted]
        if args.reason:
            entries = [e for e in entries if e.reason == args.reason]
        inbox = Path(settings.inbox)
        released = 0
        for e in entries:
            try:
                quarantine.release(e.id, inbox, allow_burned_in=args.allow_burned_in)
            except ValueError as exc:
                print(f"not released: {exc}", file=sys.stderr)
                status = 1
                continue
            except OSError as exc:
                # Never the error's text: it names the original file (PHI).
                reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
                print(f"quarantine entry {e.id} not released ({reason})", file=sys.stderr)
                status = 1
                continue
            released += 1
        print(f"released {released} quarantined file(s) into the inbox")
    return status
