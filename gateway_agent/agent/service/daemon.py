"""The daemon: wires outbox, uploader, intake, watcher and service plumbing; stops gracefully."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from ..._exceptions import ConfigError
from ...config import Settings
from ...deid import Deidentifier, DeidOptions
from ...logs import get_logger
from ..intake.listener import Listener
from ..intake.pipeline import OUTBOX_DIR_MODE, Intake
from ..intake.quarantine import Quarantine
from ..intake.watcher import InboxWatcher
from ..outbox.db import OutboxClosedError
from ..outbox.repair import open_outbox
from ..outbox.routing import routes_from_settings
from ..outbox.schema import OutboxSchemaError
from ..outbox.store import Outbox
from ..upload.destinations import Destination, destination_from_settings
from ..upload.outcomes import RETRY_AFTER_MAX_SECONDS
from ..upload.uploader import Uploader
from .effective import write_effective_settings
from .health import CheckResult
from .locks import FolderLock, StateLock
from .paths import StatePaths, check_layout
from .plumbing import ServicePlumbing
from .qcjob import qc_component
from .secretguard import load_guarded_secret

__all__ = ["Component", "Daemon"]

log = get_logger()

#: Seconds SIGTERM/SIGINT leave in-flight work to finish before it is released (released rows
#: are sent again after the next start). Docker and podman send SIGKILL 10 s after SIGTERM by
#: default: the whole stop, this included, must end well before that.
STOP_DEADLINE_SECONDS = 5.0
#: How often the daemon's own housekeeping runs (sent-file retention, WAL checkpoint, liveness).
HOUSEKEEPING_SECONDS = 300.0
_TEMP_SUFFIXES = (".tmp", ".partial", ".part")


class Component(Protocol):
    """Something the daemon starts after its core and stops before it (e.g. a QC job)."""

    def start(self) -> Any: ...

    def stop(self) -> Any: ...


class Daemon:
    """The long-running agent.

    ``start()`` opens the outbox (``state_dir/outbox.db``; one written by an earlier version is
    upgraded in place), requeues deliveries left ``sending``, reconciles files and rows, then
    starts one uploader per destination, the intake pool and the inbox watcher
    (whose start-up scan takes files that arrived while the agent was down), then the service
    plumbing (health/metrics, disk guard, systemd notify) and any extra ``components``.
    ``stop()`` reverses that: no new files are taken, in-flight de-identifications commit,
    in-flight uploads finish or are released, all within ``stop_deadline`` seconds.

    Parameters
    ----------
    settings
        The loaded settings.
    components
        Factories called with the daemon after the core started; each returns a
        :class:`Component` (started at once, stopped first on the way out).
    service
        Start the health/metrics server, disk guard and systemd notify (``agent.service``).
    new_secret
        Accept a site secret that differs from the one the state folder's instances were made
        with (or a new one in place of a missing secret); see ``secretguard``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        components: list[Callable[[Daemon], Component]] | None = None,
        service: bool = True,
        stop_deadline: float = STOP_DEADLINE_SECONDS,
        new_secret: bool = False,
    ) -> None:
        self._configure(settings)
        self.new_secret = new_secret
        self.stop_deadline = stop_deadline
        # Periodic QC runs alongside by default (it does nothing when qc.enabled is false).
        self._factories = [qc_component] if components is None else list(components)
        self._want_service = service
        self.components: list[Component] = []
        self.outbox: Outbox | None = None
        #: One per destination, by name, in configuration order.
        self.uploaders: dict[str, Uploader] = {}
        self.intake: Intake | None = None
        self.watcher: InboxWatcher | None = None
        self.listener: Listener | None = None
        self.service: Any = None
        self._stop_event = threading.Event()
        self._reload_requested = False
        self._hk_stop = threading.Event()
        self._started = False
        self._housekeeping: threading.Thread | None = None

    def _configure(self, settings: Settings) -> None:
        """What the daemon derives from its settings (again on a reload)."""
        self.settings = settings
        self.paths = StatePaths(settings.state_dir)
        self.inbox = Path(settings.inbox).resolve()
        self.quarantine = Quarantine(self.paths.quarantine)
        self._state_lock = StateLock(self.paths.root)
        self._inbox_lock = FolderLock(self.inbox, "inbox")

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        """Open state, start every stage; raise ConfigError for unusable settings.

        Start-up problems of the machine (an inbox that is not there, a state folder that
        cannot be written, a metrics port in use, another agent on the same state folder or
        inbox, a site secret that is not the state folder's) are ConfigErrors too: one line
        naming the problem and the fix, exit status 2 from the command line. Whatever had
        started is stopped again.
        """
        try:
            self._start()
        except BaseException:
            self.stop(quiet=True)
            raise

    def _start(self) -> None:
        s = self.settings
        check_layout(s)
        self._check_inbox()
        try:
            self._prepare_state_folder()
        except OSError as exc:
            raise _state_error(self.paths.root, exc) from None
        # One agent per state folder and per inbox, before anything in them is touched.
        self._state_lock.acquire()
        self._inbox_lock.acquire()
        try:
            # A damaged database is kept aside and a new one rebuilt from the outbox files
            # (by the reconcile below); the wall clock is watched for jumps.
            outbox, damaged = open_outbox(
                self.paths.outbox_db,
                routes=routes_from_settings(s.all_destinations),
                monotonic=time.monotonic,
            )
        except OutboxSchemaError as exc:
            raise ConfigError(f"outbox {self.paths.outbox_db}: {exc}") from None
        except (OSError, sqlite3.Error) as exc:
            raise _state_error(self.paths.root, exc) from None
        self.outbox = outbox
        secret = load_guarded_secret(
            s.secret_file,
            self.paths.root,
            holds_instances=lambda: outbox.has_rows() or _has_files(self.paths.outbox_files),
            new_secret=self.new_secret,
        )
        try:
            self._recover_state(outbox)
        except (OSError, sqlite3.Error) as exc:
            raise _state_error(self.paths.root, exc) from None
        if damaged is not None:
            log.error("outbox_rebuilt", rows=sum(outbox.counts().values()), kept_as=damaged.name)
        engine = Deidentifier(
            secret, DeidOptions.from_settings(s.deid), station_name=s.station_name
        )

        built: list[tuple[Any, Destination]] = []
        try:
            for d in s.all_destinations:
                if d.kind == "folder":
                    self._remove_temp_files(Path(d.folder))
                built.append((d, destination_from_settings(d, calling_ae=s.calling_ae_for(d))))
        except BaseException:
            for _, dest in built:
                with contextlib.suppress(Exception):
                    dest.close()
            raise
        write_effective_settings(
            self.paths.root, s, [{"name": d.name, "target": d.target} for d in s.all_destinations]
        )
        for d, dest in built:
            self.uploaders[d.name] = Uploader(outbox, dest, d, clock=outbox.now)
        for uploader in self.uploaders.values():
            uploader.start()

        if self._want_service:
            self.service = self._start_service()

        gate = self.service.intake_allowed if self.service is not None else None
        self.intake = Intake(
            inbox=self.inbox,
            out_dir=self.paths.outbox_files,
            engine=engine,
            outbox=outbox,
            quarantine=self.quarantine,
            originals=s.originals,
            archive_dir=s.archive_dir,
            workers=s.intake_workers,
            on_committed=self._wake_uploaders,
            gate=gate,
            state_dir=self.paths.root,
            resettle=self._resettle,
            retry_later=self._retry_later,
            settle_seconds=s.settle_seconds,
            received=self.paths.received if s.listener.enabled else None,
        )
        self.intake.start()
        intake = self.intake
        # Batches fill while intake is busy; a lone file is sent as soon as it is committed.
        for uploader in self.uploaders.values():
            uploader.more_coming = lambda: not intake.idle()
        self.watcher = InboxWatcher(
            self.inbox,
            self.intake.submit,
            settle_seconds=s.settle_seconds,
            on_deep=self.intake.quarantine_deep,
            on_inbox_back=self._inbox_back,
        )
        self.intake.on_room = self.watcher.room
        self.watcher.start()
        if s.listener.enabled:
            self.listener = self._start_listener(gate)

        for factory in self._factories:
            component = factory(self)
            component.start()
            self.components.append(component)
        self._started = True
        self._hk_stop.clear()
        self._housekeeping = threading.Thread(
            target=self._housekeeping_loop, name="housekeeping", daemon=True
        )
        self._housekeeping.start()
        if self.service is not None:
            self.service.ready()
        log.info(
            "agent_started",
            inbox=str(self.inbox),
            state_dir=str(self.paths.root),
            destinations=[f"{d.name}: {d.target}" for d in s.all_destinations],
            workers=s.intake_workers,
            settle_seconds=s.settle_seconds,
            originals=s.originals,
            listener=self.listener.port if self.listener is not None else None,
        )

    def _check_inbox(self) -> None:
        """The inbox must exist; only the default ``./inbox`` of a bare start is created."""
        if self.inbox.is_dir():
            return
        if self.inbox.exists():
            raise ConfigError(f"inbox {self.inbox} is not a folder: set inbox (--inbox)")
        if "inbox" in self.settings.model_fields_set:
            # A configured inbox that is not there is a typo or a missing mount: creating it
            # would leave the scanner's files unseen.
            raise ConfigError(
                f"inbox {self.inbox} does not exist: create it (mkdir -p {self.inbox}) or "
                "correct inbox (--inbox, GATEWAY_INBOX)"
            )
        self.inbox.mkdir(parents=True, exist_ok=True)

    def _prepare_state_folder(self) -> None:
        """The state folder (0700), writable."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.root.chmod(0o700)
        probe = self.paths.root / f".write-test-{os.getpid()}"
        probe.touch()  # a read-only folder (or mount) fails here, not in a worker later
        probe.unlink()

    def _recover_state(self, outbox: Outbox) -> None:
        """What a crash may have left: rows ``sending``, temporaries, files without rows and
        rows without files, incomplete quarantine entries."""
        # Temporaries of the state files written atomically (effective settings, listener
        # counters) that a kill interrupted; the database files are never among them.
        for leftover in self.paths.root.glob(".tmp-*.part"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        self._report_unconfigured(outbox)
        outbox.requeue_stale()
        # A next attempt further away than any backoff or Retry-After: the clock was set back
        # while the agent was down.
        cap = max(d.backoff_cap_seconds for d in self.settings.all_destinations)
        outbox.clamp_future(longest=max(cap, RETRY_AFTER_MAX_SECONDS), cap=cap)
        self.paths.outbox_files.mkdir(mode=OUTBOX_DIR_MODE, parents=True, exist_ok=True)
        self.paths.outbox_files.chmod(OUTBOX_DIR_MODE)  # also for a folder made by older versions
        self._remove_temp_files(self.paths.outbox_files)
        outbox.reconcile(self.paths.outbox_files)
        self.quarantine.ensure()
        self.quarantine.cleanup()

    def _start_service(self) -> Any:
        outbox = self.outbox
        assert outbox is not None
        return ServicePlumbing(
            self.settings,
            destination_report=outbox.destination_report,
            threads_alive=self.threads_alive,
            outbox_db=self.paths.outbox_db,
            on_disk_change=self._disk_changed,
            intake_problem=self._intake_problem,
            checks={"inbox": self._inbox_readiness},
        ).start()

    def _intake_problem(self) -> str | None:
        intake = self.intake
        return intake.commit_problem if intake is not None else None

    def _start_listener(self, gate: Callable[[], bool] | None) -> Listener:
        """The C-STORE listener: one more inbox (its spool is under the state folder)."""
        s = self.settings
        intake = self.intake
        assert intake is not None

        def submit(path: Path) -> None:
            # Intake full (its hand-over is bounded): the listener offers the file again soon.
            if not intake.submit(path):
                listener.retry_later(path, 1.0)

        listener = Listener(
            s.listener,
            ae_title=s.listener_ae,
            spool=self.paths.received,
            state_dir=self.paths.root,
            submit=submit,
            gate=gate,
        )
        try:
            listener.start()
        except OSError as exc:
            raise ConfigError(
                f"listener: cannot listen on {s.listener.host}:{s.listener.port} "
                f"({exc.strerror or type(exc).__name__}): choose another listener.port "
                "(ports below 1024 need root) or stop what holds it"
            ) from None
        return listener

    def _wake_uploaders(self) -> None:
        for uploader in self.uploaders.values():
            uploader.wake()

    def _report_unconfigured(self, outbox: Outbox) -> None:
        """Deliveries waiting for a destination no longer configured stay (their files too):
        say so once at start-up (``status`` shows them)."""
        configured = {d.name for d in self.settings.all_destinations}
        for name, counts in outbox.counts_by_destination().items():
            waiting = counts["queued"] + counts["sending"] + counts["dead"]
            if name not in configured and waiting:
                log.warning(
                    "destination_not_configured",
                    destination=name,
                    waiting=counts["queued"] + counts["sending"],
                    dead=counts["dead"],
                )

    def _inbox_readiness(self) -> CheckResult:
        """Readiness of the inbox: there (an inbox that refuses removals is intake's problem)."""
        watcher = self.watcher
        if watcher is not None and watcher.missing:
            return CheckResult(False, f"inbox missing: {self.inbox}")
        return CheckResult(True, "inbox watched")

    def _inbox_back(self) -> None:
        """The inbox folder was replaced (recreated, moved back, remounted): lock the new one."""
        try:
            self._inbox_lock.acquire()
        except ConfigError as exc:
            log.error("inbox_lock_failed", error=str(exc))

    def _resettle(self, path: Path) -> None:
        if self.watcher is not None:
            self.watcher.resettle(path)

    def _retry_later(self, path: Path, delay: float) -> None:
        if self.listener is not None and self.listener.owns(path):
            self.listener.retry_later(path, delay)
        elif self.watcher is not None:
            self.watcher.retry_later(path, delay)

    def _disk_changed(self, paused: bool) -> None:
        log.warning("intake_paused_low_disk" if paused else "intake_resumed")
        if not paused and self.watcher is not None:
            self.watcher.rescan()  # files that waited in the inbox meanwhile

    @staticmethod
    def _remove_temp_files(directory: Path) -> None:
        """Temporaries of interrupted atomic writes (``.*`` / ``*.tmp``); run before the writers
        (engine, folder destination) start."""
        removed = 0
        for dirpath, _dirs, names in os.walk(directory):
            for name in names:
                if name.startswith(".") or name.endswith(_TEMP_SUFFIXES):
                    with contextlib.suppress(OSError):
                        (Path(dirpath) / name).unlink()
                        removed += 1
        if removed:
            log.info("outbox_temp_removed", files=removed)

    # ----------------------------------------------------------------- status
    def threads_alive(self) -> dict[str, bool]:
        """Liveness of each worker thread (for /healthz and the systemd watchdog)."""
        alive = {
            "watcher": bool(self.watcher and self.watcher.alive()),
            "intake": bool(self.intake and self.intake.alive()),
            **{f"uploader:{name}": uploader.alive() for name, uploader in self.uploaders.items()},
        }
        if self.settings.listener.enabled:
            alive["listener"] = bool(self.listener and self.listener.alive())
        return alive

    def drained(self) -> bool:
        """Inbox work done and nothing waiting in the outbox (used by tests and benchmarks)."""
        if self.intake is None or self.watcher is None or self.outbox is None:
            return False
        if not self.intake.idle() or self.watcher.pending_count():
            return False
        counts = self.outbox.counts()
        return bool(counts.get("queued", 0) == 0 and counts.get("sending", 0) == 0)

    # ----------------------------------------------------------------- stop
    def request_stop(self) -> None:
        """Ask :meth:`run_forever` to return (safe from signal handlers)."""
        self._stop_event.set()

    def stop(self, *, reloading: bool = False, quiet: bool = False) -> None:
        """Stop intake, let in-flight work finish or release it within the deadline.

        ``reloading``: the agent starts again at once (systemd is told ``RELOADING=1``, not
        ``STOPPING=1``). ``quiet``: a start-up that failed is being undone (nothing is logged).
        """
        opened = self.outbox is not None and not quiet
        self._stop_event.set()
        self._hk_stop.set()
        deadline = time.monotonic() + self.stop_deadline

        def left() -> float:
            return max(0.5, deadline - time.monotonic())

        for component in reversed(self.components):
            try:
                component.stop()
            except Exception:
                log.exception("component_stop_failed", component=type(component).__name__)
        self.components.clear()
        if self.service is not None:
            try:
                self.service.stop(reloading=reloading)
            except Exception:
                log.exception("service_stop_failed")
            self.service = None
        if self.listener is not None:
            # First: no instance is acknowledged that intake will not take (those already
            # received stay in the spool for the next start).
            try:
                self.listener.stop()
            except Exception:
                log.exception("listener_stop_failed")
            self.listener = None
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.intake is not None:
            self.intake.stop(left())
        if self.uploaders:
            stops = [
                threading.Thread(
                    target=u.stop, args=(max(deadline, time.monotonic() + 0.5),), daemon=True
                )
                for u in self.uploaders.values()
            ]  # in parallel: each within the same (absolute, monotonic) deadline
            for t in stops:
                t.start()
            for t in stops:
                t.join()
            for uploader in self.uploaders.values():
                with contextlib.suppress(Exception):
                    uploader.destination.close()
        if self._housekeeping is not None:
            self._housekeeping.join(1.0)
            self._housekeeping = None
        if self.outbox is not None:
            with contextlib.suppress(Exception):
                self.outbox.checkpoint()
            self.outbox.close()
            self.outbox = None
        self.intake = None
        self.uploaders = {}
        self._started = False
        self._release_locks()
        if opened:
            log.info("agent_stopped")

    def _release_locks(self) -> None:
        self._inbox_lock.release()
        self._state_lock.release()

    def run_forever(self, reload: Callable[[], Settings] | None = None) -> int:
        """Start, serve until SIGTERM/SIGINT, stop gracefully; return the exit status (0).

        SIGHUP reloads: ``reload()`` gives the new settings (None: the same again); the agent
        stops gracefully (in-flight work commits or is released, as on SIGTERM) and starts again
        with them. Settings that cannot be loaded, or that cannot start, are logged and the
        agent goes on with the ones it had.
        """
        previous: dict[int, Any] = {}

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("agent_signal", signal=signal.Signals(signum).name)
            if signum == signal.SIGHUP:
                self._reload_requested = True
            self._stop_event.set()

        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.start()
            while True:
                while not self._stop_event.wait(5.0):
                    pass
                if not self._reload_requested:
                    break
                self._reload(reload)
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def _reload(self, reload: Callable[[], Settings] | None) -> None:
        """Stop gracefully and start again with the settings ``reload()`` gives."""
        self._reload_requested = False
        self._stop_event.clear()
        settings = self.settings
        if reload is not None:
            try:
                settings = reload()
            except ConfigError as exc:
                log.error("agent_reload_refused", error=str(exc))
                return
        log.info("agent_reloading")
        previous = self.settings
        self.stop(reloading=True)
        self._stop_event.clear()
        self._configure(settings)
        try:
            self.start()
        except ConfigError as exc:
            log.error("agent_reload_refused", error=str(exc))
            self._configure(previous)
            self.start()
        log.info("agent_reloaded")

    # ----------------------------------------------------------------- housekeeping
    def _housekeeping_loop(self) -> None:
        reported: set[str] = set()
        while not self._hk_stop.wait(HOUSEKEEPING_SECONDS):
            outbox = self.outbox
            if outbox is None:
                return
            try:
                hours = self.settings.disk.sent_retention_hours
                purged = outbox.purge_sent_files(
                    hours * 3600.0, unconfirmed=not self.settings.disk.keep_unconfirmed
                )
                days = self.settings.disk.audit_retention_days
                compacted = outbox.compact(days * 86400.0)
                if purged or compacted:
                    log.info("outbox_retention", files=purged, rows=compacted)
                outbox.checkpoint()
            except OutboxClosedError:
                return  # the agent stopped while a purge ran past the stop's wait
            except Exception:
                log.exception("housekeeping_failed")
            for name, ok in self.threads_alive().items():
                if not ok and name not in reported:
                    log.error("thread_dead", thread=name)
                    reported.add(name)


def _state_error(root: Path, exc: OSError | sqlite3.Error) -> ConfigError:
    return ConfigError(
        f"state_dir {root}: {_describe_os_error(exc)}: make it a folder this user can write "
        "(check the path, its owner and mount), or set state_dir (--state-dir)"
    )


def _has_files(directory: Path) -> bool:
    """True if ``directory`` holds an outbox file (``*.dcm``)."""
    try:
        with os.scandir(directory) as entries:
            return any(e.name.endswith(".dcm") for e in entries)
    except OSError:
        return False


def _describe_os_error(exc: OSError | sqlite3.Error) -> str:
    """What went wrong, in words and without a traceback (no path: the message names it)."""
    if isinstance(exc, sqlite3.Error):
        return f"the outbox database cannot be opened ({exc})"
    reasons = {
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "it is a file, not a folder",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "it is on a read-only file system",
        errno.ENOSPC: "the disk is full",
    }
    return reasons.get(exc.errno or 0, exc.strerror or type(exc).__name__)
