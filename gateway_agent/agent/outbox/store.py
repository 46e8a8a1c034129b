"""The durable SQLite outbox: a row per de-identified instance, its delivery to each destination
it goes to, each destination's circuit.

States of a delivery (see design.md)::

    queued ──claim──▶ sending ──ack (+ proof)──▶ sent
       ▲                 │
       └── retriable ────┤ (also: acknowledged but not found, a few times)
                         └── permanent / attempts or age exhausted ──▶ dead ── retry_dead ──▶ queued

A sent delivery is ``confirmed`` when its destination proved it holds the instance. An
instance's file is removed (retention) once every delivery of it is sent and confirmed (or, with
``disk.keep_unconfirmed`` off, sent to a destination that cannot prove storage); its row is kept
for the audit, then compacted.

One :class:`Outbox` object for what concerns instances (``db``: adding and reading rows;
``upkeep``: retention, reconcile), and one :class:`DestinationQueue` per destination
(``outbox.queue(name)``) for its deliveries (``delivery``) and circuit (``circuit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .circuit import Circuit
from .delivery import Delivery
from .upkeep import Upkeep

__all__ = ["DestinationQueue", "Outbox"]


class DestinationQueue(Delivery, Circuit):
    """One destination's deliveries and circuit: what its upload workers use.

    ``DestinationQueue(outbox, name)``, usually through :meth:`Outbox.queue`.
    """


class Outbox(Upkeep):
    """The outbox: ``Outbox(db_path, clock=time.time, routes=DEFAULT_ROUTES)``; ``db_path`` may
    be ``":memory:"`` (see :class:`~gateway_agent.agent.outbox.db.OutboxDB` for the
    parameters)."""

    def queue(self, name: str) -> DestinationQueue:
        """The deliveries and circuit of the destination ``name``."""
        return DestinationQueue(self, name)

    def retry_dead(
        self, ids: Sequence[int] | None = None, *, destination: str | None = None
    ) -> int:
        """Dead deliveries back to ``queued`` (of every destination, or of one; all instances or
        these ids), attempts reset and due now. Returns the deliveries requeued."""
        names = self.destination_names() if destination is None else [destination]
        return sum(self.queue(name).retry_dead(ids) for name in names)

    def retry_now(self, *, destination: str | None = None) -> int:
        """Make waiting deliveries due now and close the circuits (of every destination, or of
        one). Returns the deliveries made due."""
        names = self.destination_names() if destination is None else [destination]
        return sum(self.queue(name).retry_now() for name in names)

    def destination_report(self) -> dict[str, dict[str, Any]]:
        """Per destination (configured ones first): its deliveries by state (``counts``),
        ``waiting`` (queued and sending), ``oldest_waiting_seconds`` (proof pending included),
        ``proof_pending`` and ``unproven`` (``rows``, ``bytes``: sent, files kept), ``removed``
        (True for a destination that still has deliveries but is no longer configured), and its
        circuit
        (:meth:`DestinationQueue.destination_status`)."""
        configured = {r.name for r in self.routes}
        out: dict[str, dict[str, Any]] = {}
        for name, counts in self.counts_by_destination().items():
            queue = self.queue(name)
            proof = self.proof_summary(name)
            out[name] = {
                "counts": counts,
                "waiting": counts["queued"] + counts["sending"],
                "oldest_waiting_seconds": queue.oldest_waiting_age(),
                "removed": name not in configured,
                "proof_pending": {"rows": proof["pending"][0], "bytes": proof["pending"][1]},
                "unproven": {"rows": proof["unproven"][0], "bytes": proof["unproven"][1]},
                **queue.destination_status(),
            }
        return out
