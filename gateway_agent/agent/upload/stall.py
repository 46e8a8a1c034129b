"""What the destination's state means for an operator: stalled or not, why, and what to do.

One reading of the outbox (the destination circuit, rows waiting) shared by ``/readyz`` and
``gateway-agent status``, so both say the same thing:

* the destination refuses the agent (credentials, a redirect): not ready at once;
* the address is wrong (404, 405 or 501 to every request): not ready at once;
* acknowledged rows cannot be proven stored as the server is set up (no QIDO-RS at the URL, no
  right to query): not ready at once;
* uploads are **stalled**: rows have waited ``window`` seconds and nothing was delivered within
  them (a server down, hanging, dripping, answering garbage or not storing what it acknowledges);
  "delivered" means proven stored, or acknowledged by a destination that cannot prove it.

:func:`hint` turns a last error into one line of advice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["destination_problems", "format_age", "hint", "misconfigured", "proof_refused"]

_MISCONFIGURED = re.compile(r"^http_(404|405|501)\b")
_PROOF_REFUSED = re.compile(
    r"^storage_check (http_(401|403|404|405|501)\b|c_find_(refused|failed))"
)

#: Reason prefixes (after an optional ``gave_up: ``) and what an operator should do about them.
_HINTS: tuple[tuple[str, str], ...] = (
    (
        "storage_check http_404",
        "the server has no QIDO-RS at this URL, so storage cannot be proven: enable QIDO-RS for "
        "the agent, or set destination.confirm_storage = false (acknowledgements trusted)",
    ),
    (
        "storage_check http_401",
        "the server refuses the storage check (QIDO-RS): give the agent's account query rights",
    ),
    (
        "storage_check http_403",
        "the server refuses the storage check (QIDO-RS): give the agent's account query rights",
    ),
    (
        "storage_check c_find_",
        "the peer refuses the storage check (C-FIND): allow the agent's AE title to query "
        "(Query/Retrieve, IMAGE level), or set destination.confirm_storage = false "
        "(acknowledgements trusted)",
    ),
    (
        "storage_check c_find",
        "the storage check (C-FIND) failed; it is tried again, and the local copies are kept",
    ),
    (
        "storage_check",
        "the storage check (QIDO-RS) failed; it is tried again, and the local copies are kept",
    ),
    ("http_404", "nothing answers STOW-RS at this URL: check destination.url (rows wait)"),
    ("http_405", "this URL does not accept STOW-RS uploads: check destination.url (rows wait)"),
    ("http_501", "this URL does not implement STOW-RS: check destination.url (rows wait)"),
    ("http_401", "the server refuses the credentials: fix them, restart, `gateway-agent retry`"),
    ("http_403", "the server refuses the credentials: fix them, restart, `gateway-agent retry`"),
    ("http_3", "the URL redirects elsewhere (never followed): set the final URL"),
    (
        "not_stored_after_ack",
        "the server acknowledges instances it does not hold (a filter, a misrouted proxy): "
        "fix the archive, then `gateway-agent retry`; the local copies are kept",
    ),
    (
        "timeout: the server did not take",
        "the server accepts connections but does not read the request (hung, or far too slow)",
    ),
    ("timeout", "the server accepts connections but does not answer in time (hung, overloaded)"),
    (
        "network_error",
        "the server cannot be reached (down, wrong host or port, firewall, name not resolved)",
    ),
    (
        "http_2",
        "something answers that is not a DICOMweb server (a proxy, a captive portal): "
        "check destination.url and the network path",
    ),
    ("http_5", "the server reports an error of its own; rows wait and are retried"),
)


def hint(error: str | None) -> str | None:
    """One line of advice for a destination's last error (None when there is nothing to add)."""
    if not error:
        return None
    text = error.removeprefix("gave_up: ")
    if text.startswith("gave_up after"):
        text = text.split(": ", 1)[-1]
    for prefix, advice in _HINTS:
        if text.startswith(prefix):
            return advice
    return None


def misconfigured(status: Mapping[str, Any]) -> bool:
    """The circuit is open because the address is wrong (404, 405 or 501 to every request)."""
    error = status.get("last_error") or ""
    return bool(status.get("consecutive_failures")) and bool(_MISCONFIGURED.match(error))


def proof_refused(status: Mapping[str, Any]) -> bool:
    """Acknowledged rows wait for a proof the server will not give as it is set up (no QIDO-RS
    at the URL, no right to query): the last storage check said so, after the last delivery."""
    error = status.get("last_error") or ""
    newer = (status.get("last_error_at") or 0) >= (status.get("last_success_at") or 0)
    return bool(status.get("awaiting_proof")) and newer and bool(_PROOF_REFUSED.match(error))


def format_age(seconds: float) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def destination_problems(
    status: Mapping[str, Any],
    *,
    waiting: int,
    oldest_waiting: float | None,
    now: float,
    window: float,
) -> list[str]:
    """The problems of the upload path, one short line each (empty: nothing wrong).

    ``status`` is ``Outbox.destination_status()``; ``waiting`` the queued and sending rows
    (rows awaiting their proof of storage are added from ``status``); ``oldest_waiting`` the
    age of the oldest row not delivered yet; ``window`` the stall window in seconds.
    """
    problems: list[str] = []
    error = status.get("last_error")
    if status.get("auth_failing"):
        problems.append(f"destination refuses the agent: {error}")
    elif misconfigured(status):
        problems.append(f"destination address wrong: {error}")
    elif proof_refused(status):
        problems.append(f"storage cannot be proven: {error}")
    waiting += int(status.get("awaiting_proof") or 0)
    last = status.get("last_success_at")
    idle = None if not isinstance(last, int | float) or not last else max(0.0, now - last)
    oldest = oldest_waiting or 0.0
    if waiting and oldest >= window and (idle is None or idle >= window):
        since = "yet" if idle is None else f"for {format_age(idle)}"
        text = (
            f"stalled: {waiting} row(s) waiting, the oldest for {format_age(oldest)}, "
            f"and nothing delivered {since}"
        )
        if error and not problems:
            text += f"; last error: {error}"
        problems.append(text)
    return problems
