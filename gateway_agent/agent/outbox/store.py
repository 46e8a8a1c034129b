"""The durable SQLite outbox: a row per de-identified instance, its retries, the upload circuit.

States (see design.md)::

    queued ──claim──▶ sending ──ack (+ proof)──▶ sent ──retention──▶ (file removed, row kept)
       ▲                 │
       └── retriable ────┤ (also: acknowledged but not found, a few times)
                         └── permanent / attempts or age exhausted ──▶ dead ── retry_dead ──▶ queued

A sent row is ``confirmed`` when the destination proved it holds the instance; retention removes
the files of confirmed rows only (unless told otherwise).

One :class:`Outbox` object, its methods grouped by concern in the modules beside this one:
``db`` (schema, connection, adding and reading rows), ``delivery`` (claims and outcomes),
``circuit`` (the destination-level circuit) and ``upkeep`` (retention, reconcile).
"""

from __future__ import annotations

from .circuit import Circuit
from .delivery import Delivery
from .upkeep import Upkeep

__all__ = ["Outbox"]


class Outbox(Delivery, Circuit, Upkeep):
    """The outbox: ``Outbox(db_path, clock=time.time)``, ``db_path`` may be ``":memory:"``
    (see :class:`~gateway_agent.agent.outbox.db.OutboxDB` for the parameters)."""
