"""The site secret and everything keyed by it: UIDs, patient and scanner pseudonyms, date shift."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from datetime import date, timedelta
from pathlib import Path

from .._exceptions import ConfigError
from ..dicom.scanner import SCANNER_PREFIX

__all__ = ["Keys", "load_or_create_secret", "shift_da", "shift_dt"]

_MIN_SECRET = 16
_BLOCK = 64  # SHA-256 block size, for HMAC (RFC 2104)
#: UIDs mapped are remembered up to this many (then forgotten at once): the study and series
#: UIDs of a series repeat; instance UIDs never do, and must not fill a worker's memory.
_MAX_CACHED_UIDS = 8192


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the site secret, creating it (32 random bytes, hex, mode 0600) on first use.

    Parameters
    ----------
    path
        The secret file; its parent folders are created (mode 0700) when missing.

    Returns
    -------
    bytes
        The secret (at least 16 bytes).

    Raises
    ------
    ConfigError
        The file cannot be read or created, or holds fewer than 16 bytes.

    Notes
    -----

    Parent folders are created with mode 0700. Creation is atomic: the key is written to a temp
    file in the same folder (mode 0600) and fsynced, then hard-linked into place, which never
    replaces an existing secret (another process that got there first wins, and its secret is
    used); then the folder is fsynced. A kill at any instant leaves either no secret or a
    complete one (and at worst a stray temp file, which is ignored). The secret is never logged
    nor put in an error message; losing it makes later outputs unlinkable to earlier ones (new
    UIDs, pseudonyms and date offsets): back it up.
    """
    path = Path(path)
    for _ in range(3):
        try:
            data = path.read_bytes().strip()
        except FileNotFoundError:
            try:
                _create_secret(path)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the site secret file ({type(exc).__name__})"
                ) from None
            continue  # read back what is now in place (ours, or a concurrent creator's)
        except OSError as exc:
            raise ConfigError(f"cannot read the site secret file ({type(exc).__name__})") from None
        if len(data) < _MIN_SECRET:
            raise ConfigError(f"the site secret file holds fewer than {_MIN_SECRET} bytes")
        return data
    raise ConfigError(
        "the site secret file is missing and cannot be put in place (a dangling link?)"
    )


def _create_secret(path: Path) -> None:
    """Put a new random secret at ``path`` atomically, unless one is there already."""
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode() + b"\n"
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if a secret exists: never replaces one
        except FileExistsError:
            return  # created concurrently: use theirs
        except OSError:
            # No hard links on this file system: create-exclusive, then write in place.
            _create_exclusive(path, value)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _create_exclusive(path: Path, value: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, value)
        os.fsync(fd)
    finally:
        os.close(fd)


class Keys:
    """Keyed, deterministic replacements (HMAC-SHA256 with the site secret)."""

    __slots__ = ("_inner", "_outer", "_secret", "_uids")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) < _MIN_SECRET:
            raise ValueError(f'Argument "secret" must be at least {_MIN_SECRET} bytes.')
        self._setup(bytes(secret))

    def _setup(self, secret: bytes) -> None:
        self._secret = secret
        self._uids: dict[str, str] = {}
        # HMAC (RFC 2104) with the padded key's hash states computed once.
        key = hashlib.sha256(secret).digest() if len(secret) > _BLOCK else secret
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def __getstate__(self) -> bytes:
        return self._secret

    def __setstate__(self, state: bytes) -> None:
        self._setup(state)

    def digest(self, purpose: bytes, value: bytes) -> bytes:
        """HMAC-SHA256 of ``purpose | value``."""
        inner = self._inner.copy()
        inner.update(purpose + b"|" + value)
        outer = self._outer.copy()
        outer.update(inner.digest())
        digest: bytes = outer.digest()
        return digest

    def uid(self, uid: str) -> str:
        """``2.25.<decimal of the first 192 bits of HMAC(uid)>`` (at most 63 characters)."""
        found = self._uids.get(uid)
        if found is None:
            number = int.from_bytes(self.digest(b"uid", uid.encode("ascii", "replace"))[:24], "big")
            found = f"2.25.{number}"
            if len(self._uids) > _MAX_CACHED_UIDS:
                self._uids.clear()
            self._uids[uid] = found
        return found

    def patient_pseudonyms(self, patient_key: bytes) -> tuple[str, str]:
        """``(PatientName, PatientID)`` pseudonyms for a patient key."""
        h = self.digest(b"patient", patient_key).hex().upper()
        return f"ANON^{h[:12]}", f"GA{h[12:28]}"

    def scanner_pseudonym(
        self, manufacturer: bytes, model: bytes, serial: bytes, station: bytes
    ) -> str:
        """``SCN-<12 hex>``: the keyed pseudonym of a scanner from its original identity.

        The raw values of Manufacturer, ManufacturerModelName, DeviceSerialNumber and
        StationName, compared without padding, case or repeated spaces (a software update that
        changes "Acme  medical" to "ACME MEDICAL" keeps the scanner's name). Same secret, same
        scanner: same pseudonym on every edge box; another secret: unlinkable.
        """
        values = (manufacturer, model, serial, station)
        parts = [b" ".join(v.replace(b"\0", b" ").split()).upper() for v in values]
        h = self.digest(b"scanner", b"\x1f".join(parts)).hex().upper()
        return SCANNER_PREFIX + h[:12]

    def day_offset(self, patient_key: bytes) -> int:
        """The keyed per-patient date shift in days, within -365..-1."""
        n = int.from_bytes(self.digest(b"dates", patient_key)[:8], "big")
        return -(1 + n % 365)


def shift_da(value: str, days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``, also ranges ``A-B``); None when it is not a valid date."""
    out = []
    for part in value.split("-"):
        if not part:
            out.append("")
            continue
        if len(part) != 8 or not part.isdigit():
            return None
        try:
            d = date(int(part[:4]), int(part[4:6]), int(part[6:8])) + timedelta(days=days)
        except (ValueError, OverflowError):
            return None
        out.append(f"{d.year:04d}{d.month:02d}{d.day:02d}")
    return "-".join(out)


def shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of a DT value, keeping time, fraction and offset."""
    if len(value) < 4 or not value[:4].isdigit():
        return None
    digits = len(value)
    for i, ch in enumerate(value):
        if not ch.isdigit():
            digits = i
            break
    head = value[: min(8, digits)]
    rest = value[len(head) :]
    if len(head) == 8:
        shifted = shift_da(head, days)
        return None if shifted is None else shifted + rest
    # Year or year-month precision: move the first day of the period, keep the precision.
    padded = (head + "0101")[:8] if len(head) == 4 else (head + "01")[:8]
    if len(head) not in (4, 6):
        return None
    shifted = shift_da(padded, days)
    return None if shifted is None else shifted[: len(head)] + rest
