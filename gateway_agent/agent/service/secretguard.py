"""The site secret's guard: a fingerprint of it kept in the state folder and checked at start-up.

A different secret makes the rest of a half-sent study arrive as a second study of a second
pseudo-patient, so an agent whose state folder holds instances made with one secret refuses to
start with another, or with none (it would create a new one), unless told ``--new-secret``.
The fingerprint is a keyed hash of the secret (``HMAC-SHA256(secret, purpose)``): it cannot give
the secret back.
"""

from __future__ import annotations

import contextlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path

from ..._exceptions import ConfigError
from ...deid import load_or_create_secret
from ...logs import get_logger

__all__ = ["FINGERPRINT_NAME", "fingerprint", "load_guarded_secret"]

log = get_logger()

#: In the state folder: the fingerprint of the secret its instances were made with.
FINGERPRINT_NAME = "secret.fingerprint"
_PURPOSE = b"gateway-agent site secret fingerprint"
_FIX = (
    "restore it from your backup (see docs/operations.md), or start once with --new-secret to "
    "accept that instances from now on get new UIDs and pseudonyms"
)


def fingerprint(secret: bytes) -> str:
    """A short keyed hash of ``secret`` (32 hex digits), safe to store and to show."""
    return hmac.new(secret, _PURPOSE, "sha256").hexdigest()[:32]


def load_guarded_secret(
    secret_file: Path,
    state_dir: Path,
    *,
    holds_instances: Callable[[], bool],
    new_secret: bool = False,
) -> bytes:
    """The site secret, checked against the fingerprint recorded in ``state_dir``.

    Raises :class:`ConfigError` (one line naming the fix) when the secret differs from the
    recorded one, or is missing while the state folder holds instances (a recorded fingerprint,
    or ``holds_instances()``), unless ``new_secret``. Records the fingerprint when it is new.
    """
    record = Path(state_dir) / FINGERPRINT_NAME
    recorded = _read(record)
    missing = not os.path.lexists(secret_file)
    if missing and not new_secret and (recorded is not None or holds_instances()):
        raise ConfigError(
            f"the site secret {secret_file} is missing, but the state folder holds "
            f"instances made with one: {_FIX}"
        )
    secret = load_or_create_secret(secret_file)
    current = fingerprint(secret)
    if recorded is not None and recorded != current:
        if not new_secret:
            raise ConfigError(
                f"the site secret {secret_file} is not the one the instances in the state "
                f"folder were made with: {_FIX}"
            )
        log.warning("site_secret_replaced")
    if recorded != current:
        _write(record, current)
    return secret


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path} ({type(exc).__name__}): fix its permissions or remove it"
        ) from None
    return text or None


def _write(path: Path, value: str) -> None:
    """Atomically (temp, fsync, rename, folder fsync), mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{value}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
