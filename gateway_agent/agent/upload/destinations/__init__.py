"""The destination contract: what every destination kind implements, and the factory by kind.

One module per kind sits beside this one: :mod:`.folder` (a local folder), :mod:`.dicomweb`
(STOW-RS over httpx), :mod:`.dicom` (C-STORE over pynetdicom), :mod:`.s3` (objects in an S3
bucket, boto3). The uploader knows only this contract; it never imports a kind. The daemon
builds one destination per ``[[destinations]]`` entry and runs one uploader for each.

The contract
------------
A destination is any object with::

    label: str                                           # "folder", "dicomweb:pacs.example:443"
    send(items: Sequence[OutboxRow]) -> SendResult       # one request (or one batch of work)
    confirm(items: Sequence[OutboxRow]) -> set[str] | None   # proof of storage, or None
    close() -> None                                      # release connections; idempotent

``label``
    A short description for status output and logs. It must never carry a credential, a
    path component from the inbox or any other PHI (host and port are fine; user:password is not).
``send(items)``
    Receives claimed outbox rows (``path`` of the de-identified file, ``size``, and the study,
    series and SOP Instance UIDs); it must not change them. It may be called from several upload
    workers at once, and the same instance may be sent again after a crash: the destination must
    be idempotent per SOP Instance UID. It returns a :class:`SendResult`:

    * ``sent``: SOP Instance UIDs the destination acknowledged (then checked with ``confirm``);
    * ``failed[uid] = (True, reason)``: this instance will never be accepted → ``dead``;
    * ``failed[uid] = (False, reason)``: this instance failed this time → retried with its own
      backoff;
    * an instance in neither → retried as ``not_acknowledged``;
    * ``warnings[uid] = reason``: a sent instance stored with a warning (DICOM's 0xB000 coercion,
      0xB006 elements discarded, 0xB007 data set does not match SOP class): still ``sent``, the
      warning kept on its row (``last_error``) and logged.

    A failure of the whole request is raised instead (the tree of ``gateway_agent._exceptions``):

    ========================================== ===============================================
    raised                                     what the uploader does
    ========================================== ===============================================
    ``RetryableUploadError``                   destination down, busy or answering garbage
                                               (network, timeout or deadline, 408, 429, 5xx, a
                                               reply that is not an answer of the protocol, a
                                               full folder): the circuit opens, one probe at a
                                               time, ``retry_after`` honoured; rows wait without
                                               burning attempts once it is known
    ``PermanentUploadError`` with ``status``   the destination refuses the agent (credentials,
    in :data:`REFUSAL_STATUSES`                a redirect): as above, ``auth_failing`` is
                                               reported, attempts are never burned
    ``PermanentUploadError`` with ``status``   the address is wrong (404, 405, 501 to every
    in :data:`MISCONFIGURED_STATUSES`          request: no such service or bucket there): as
                                               above, attempts are never burned
    ``PermanentUploadError``, other            these bytes will never be accepted: every row of
                                               the batch → ``dead``
    anything else                              a bug: logged with its traceback, rows retried
    ========================================== ===============================================

    A kind translates its library's exceptions into this tree in one place (as
    :func:`.dicomweb.translate_httpx_error` does for httpx); a kind without HTTP statuses sets
    ``status=401`` (or 403) for "refuses the agent" and 404 for "nothing of the kind there".
    Reasons are short slugs (``http_409 conflict``, ``file_missing``) that never carry a
    credential, a header value or PHI.
``confirm(items)``
    Called with rows ``send`` acknowledged (a page of up to 200, from several batches, when the
    uploader has nothing to send, or once one has waited 30 s). Returns the SOP Instance UIDs
    among them that the destination *proved* it holds (see *Confirming storage*), or ``None``
    when this destination cannot prove storage (confirmation turned off, a peer without the
    means). It raises as ``send`` does when the check itself fails: the check is tried again
    after a backoff, the rows stay acknowledged with their proof pending, their files kept.
``close()``
    Called once by the daemon on the way out.

Confirming storage
------------------
An acknowledgement is only the destination's word: a misrouted proxy or an archive's filter can
acknowledge and store nothing. So an acknowledged row is ``sent`` with its proof pending, and
the uploader asks ``confirm`` (off the upload path, so a burst is uploaded at full speed):

* a proven instance → ``confirmed``: retention may remove its outbox file;
* an acknowledged instance the check did not find → sent again after at least
  :data:`NOT_STORED_RETRY_SECONDS`; once it has used :data:`NOT_STORED_MAX_ATTEMPTS` attempts
  → ``dead`` with ``not_stored_after_ack`` (its file kept); ``status`` shows it;
* ``None`` → unproven: the outbox file is kept (``disk.keep_unconfirmed``).

Each kind proves storage as cheaply as it can, batched: DICOMweb asks QIDO-RS for the
acknowledged SOP Instance UIDs of each study in one query per 40; C-STORE asks C-FIND at IMAGE
level in one query per series and 40; the folder reads back the size of each file as it writes
it (in ``send``: a consumer may take files away later) and ``confirm`` returns them all; S3
asks a ``HEAD`` per object and compares its size and checksum with what was sent.

Adding a kind
-------------
Add a module here with a class that meets the contract and builds itself from
``DestinationSettings`` (a ``*_from_settings`` function raising ``ConfigError`` for unusable
settings), add the kind to ``DestinationSettings.kind`` and one branch to
:func:`destination_from_settings`. Import the kind's library inside that branch only, so other
kinds never pay for it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol

from ...._exceptions import ConfigError
from ....config import DestinationSettings
from ...outbox.db import OutboxRow

if TYPE_CHECKING:
    import httpx

__all__ = [
    "MISCONFIGURED_STATUSES",
    "NOT_STORED_MAX_ATTEMPTS",
    "NOT_STORED_RETRY_SECONDS",
    "REFUSAL_STATUSES",
    "Destination",
    "SendResult",
    "destination_from_settings",
    "open_row",
]

#: ``PermanentUploadError.status`` values that mean "the destination refuses the agent" (bad
#: credentials, a redirect never followed) rather than "this batch is bad".
REFUSAL_STATUSES = frozenset({401, 403, 301, 302, 303, 307, 308})
#: ``PermanentUploadError.status`` values that mean "the address is wrong": no such service (or
#: bucket) there (a URL that answers 404 to every request is a misconfiguration, not a bad
#: instance).
MISCONFIGURED_STATUSES = frozenset({404, 405, 501})
#: An instance acknowledged but not found is sent again at most this many attempts in all ...
NOT_STORED_MAX_ATTEMPTS = 3
#: ... each after at least this long (an archive that indexes late gets time to do so).
NOT_STORED_RETRY_SECONDS = 30.0


@dataclass
class SendResult:
    """What one ``send`` achieved: ``sent`` SOP UIDs, ``failed`` uid -> (permanent?, reason), and
    ``warnings`` uid -> reason for sent instances the destination stored with a warning."""

    sent: list[str] = field(default_factory=list)
    failed: dict[str, tuple[bool, str]] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)


_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def open_row(row: OutboxRow, result: SendResult, *, uids_name_it: bool = False) -> BinaryIO | None:
    """The outbox file of ``row``, open for reading; None with the failure recorded in
    ``result``: ``file_missing`` (permanent), ``file_unreadable`` (retried later), and, where the
    UIDs name the stored object (``uids_name_it``: a path, a key), ``invalid_uid`` for UIDs that
    are not plain dotted numbers of at most 64 characters."""
    if uids_name_it:
        uids = (row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid)
        if not all(_UID_RE.match(u) and len(u) <= 64 for u in uids):
            result.failed[row.sop_instance_uid] = (True, "invalid_uid")
            return None
    try:
        return row.path.open("rb")
    except FileNotFoundError:
        result.failed[row.sop_instance_uid] = (True, "file_missing")
    except OSError as exc:
        result.failed[row.sop_instance_uid] = (False, f"file_unreadable: {exc.strerror}")
    return None


class Destination(Protocol):
    """Where de-identified instances go (the contract above)."""

    label: str

    def send(self, items: Sequence[OutboxRow]) -> SendResult: ...

    def confirm(self, items: Sequence[OutboxRow]) -> set[str] | None: ...

    def close(self) -> None: ...


def destination_from_settings(
    s: DestinationSettings,
    *,
    client: httpx.Client | None = None,
    calling_ae: str | None = None,
) -> Destination:
    """Build the configured destination (``client``: an httpx client for DICOMweb, for tests;
    ``calling_ae``: our AE title for kind ``dicom`` when ``s.calling_ae`` is unset, i.e. the
    unit name).

    Raises ``ConfigError`` for settings the kind cannot use. Credentials come from the settings
    or from files; they are never logged.
    """
    if s.kind == "folder":
        from .folder import FolderDestination

        return FolderDestination(s.folder)
    if s.kind == "dicomweb":
        from .dicomweb import dicomweb_from_settings

        return dicomweb_from_settings(s, client=client)
    if s.kind == "dicom":
        from .dicom import dicom_from_settings

        return dicom_from_settings(s, calling_ae=calling_ae)
    if s.kind == "s3":
        from .s3 import s3_from_settings

        return s3_from_settings(s)
    raise ConfigError(f"destination.kind: unknown kind {s.kind!r}")
