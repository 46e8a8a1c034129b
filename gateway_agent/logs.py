"""structlog set-up, once at start-up: JSON for services, colour on a terminal, PHI scrubbed."""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

__all__ = ["configure", "describe_error", "get_logger", "register_phi", "short_hash"]

_PHI_VALUES: set[str] = set()
_PHI_RE: re.Pattern[str] | None = None


def short_hash(value: str) -> str:
    """A 12-hex-digit SHA-256 prefix: lets logs correlate a value without carrying it."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12]


def describe_error(exc: BaseException) -> str:
    """An exception as its type and errno name only: OS error messages carry inbox paths."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{name} {errno.errorcode.get(exc.errno, exc.errno)}"
    if isinstance(exc, OSError):
        return name
    # sqlite3 and our own errors carry no paths; keep their text, but short.
    return f"{name}: {str(exc)[:200]}"


def register_phi(*values: str) -> None:
    """Add known PHI values (e.g. planted test markers) that the scrubber must never let through."""
    global _PHI_RE
    for v in values:
        if v and len(v) >= 3:
            _PHI_VALUES.add(v)
    if _PHI_VALUES:
        _PHI_RE = re.compile(
            "|".join(re.escape(v) for v in sorted(_PHI_VALUES, key=len, reverse=True))
        )


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str) and _PHI_RE is not None:
        return _PHI_RE.sub("[scrubbed]", value)
    return value


_FORBIDDEN_KEYS = frozenset(
    {"patient_name", "patient_id", "birth_date", "path", "filename", "file_name", "src", "source"}
)


def scrub_phi(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Second line of defence: drop keys that name inbox paths or patient fields, mask known PHI."""
    for key in list(event_dict):
        if key in _FORBIDDEN_KEYS:
            event_dict[key] = "[scrubbed]"
        else:
            event_dict[key] = _scrub_value(event_dict[key])
    return event_dict


_configured = False


def configure(
    fmt: Literal["auto", "json", "console"] = "auto", level: str = "info", *, stream: Any = None
) -> None:
    """Configure structlog and route stdlib logging (httpx, watchdog, pydicom) through it."""
    global _configured
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_phi,
    ]
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        # Tracebacks as data, but without local variables: locals hold decoded values and
        # inbox paths (PHI) that no scrubber could find.
        shared_tail: list[Any] = [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        ]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        shared_tail = []
    lvl = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[*shared, *shared_tail, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    # Third-party chatter: httpx logs full URLs at INFO.
    # botocore logs request headers (the access key id, signatures) at DEBUG.
    for noisy in (
        "httpx",
        "httpcore",
        "watchdog",
        "matplotlib",
        "PIL",
        "botocore",
        "boto3",
        "s3transfer",
        "urllib3",
    ):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    # pydicom logs each of its warnings, which quote header values (PHI) and would break a
    # progress line; callers count pydicom's warnings instead (see qc.run.scan_directory).
    logging.getLogger("pydicom").setLevel(max(lvl, logging.ERROR))
    # pynetdicom logs every association and message at INFO, and what it refuses at WARNING;
    # the agent reports those itself (destination_failing, listener_* events).
    logging.getLogger("pynetdicom").setLevel(max(lvl, logging.ERROR))
    _configured = True


#: Used as a library (nothing called :func:`configure`), events go to the standard ``logging``
#: logger ``gateway_agent`` as one ``key=value`` line each: silent unless the application
#: configures logging, as libraries do.
_LIBRARY_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.contextvars.merge_contextvars,
    scrub_phi,
    structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True),
]


class _Logger:
    """A logger that follows the configuration: structlog's when configured, else stdlib's.

    Modules create theirs at import time, before the command line (if any) configures logging;
    the choice is made on each call.
    """

    __slots__ = ("_initial",)

    def __init__(self, initial: dict[str, Any]) -> None:
        self._initial = initial

    def _target(self) -> Any:
        # structlog configured (by :func:`configure`, the application, or a test's
        # ``capture_logs``): its pipeline; otherwise the standard logging tree.
        if _configured or structlog.is_configured():
            return structlog.get_logger(**self._initial)
        return structlog.wrap_logger(
            logging.getLogger("gateway_agent"),
            processors=_LIBRARY_PROCESSORS,
            wrapper_class=structlog.stdlib.BoundLogger,
            **self._initial,
        )

    def bind(self, **values: Any) -> Any:
        return self._target().bind(**values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)


def get_logger(**initial: Any) -> Any:
    """A logger for a module; modules call this, never ``configure``.

    Before :func:`configure` (gateway-agent used as a library), events go to the standard
    logging logger ``gateway_agent``; nothing is printed unless the application configures
    logging.
    """
    return _Logger(initial)
