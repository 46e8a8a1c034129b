"""Delivery: lease one destination's due deliveries to its upload workers, record what became
of them.

Unlike huey, delivery is at-least-once: a claim only leases a delivery (``sending``); it becomes
``sent`` after the destination acknowledged it, and leases left by a crash are requeued. Each
destination has its own deliveries: one destination's backlog, backoff or dead rows never hold
another back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from .db import _SELECT_ROWS, AWAITING_PROOF, DestinationView, OutboxRow, _row, ids_param

__all__ = ["Delivery"]

_WHERE_MINE = (
    " where d.destination = ? and d.instance_id in (select value from json_each(?))"
    " order by d.instance_id"
)


class Delivery(DestinationView):
    """Claiming (``queued`` → ``sending``), outcomes (→ ``sent`` / ``queued`` / ``dead``), and the
    operator's ``retry``, for one destination. Row ids are the instances' ids."""

    def claim(self, *, max_items: int, max_bytes: int, lease_seconds: float) -> list[OutboxRow]:
        """Lease due deliveries (queued and due, or ``sending`` with an expired lease) in one
        transaction.

        At least one row is returned when one is due, even if it alone exceeds ``max_bytes``.
        ``attempts`` is counted here.
        """
        if max_items < 1:
            raise ValueError('Argument "max_items" must be >= 1.')
        with self._tx() as c:
            now = self._now_tx(c)
            candidates = c.execute(
                "select d.instance_id, i.size from deliveries d"
                " join instances i on i.id = d.instance_id"
                " where d.destination = ?1 and ((d.state = 'queued' and d.next_attempt_at <= ?2)"
                " or (d.state = 'sending' and d.lease_until < ?2))"
                " order by d.instance_id limit ?3",
                (self.name, now, max_items),
            ).fetchall()
            ids: list[int] = []
            total = 0
            for row_id, size in candidates:
                if ids and total + size > max_bytes:
                    break
                ids.append(int(row_id))
                total += int(size)
            if not ids:
                return []
            c.execute(
                "update deliveries set state = 'sending', attempts = attempts + 1,"
                " lease_until = ? where destination = ?"
                " and instance_id in (select value from json_each(?))",
                (now + lease_seconds, self.name, json.dumps(ids)),
            )
            rows = c.execute(
                _SELECT_ROWS + _WHERE_MINE,
                (self.name, json.dumps(ids)),
            ).fetchall()
        return [_row(r) for r in rows]

    def mark_sent(self, ids: Sequence[int], *, warning: str | None = None) -> None:
        """The destination acknowledged these rows (whatever their state now: the ack is a fact);
        their proof of storage is pending (see :meth:`mark_proven`).

        ``warning``: the destination stored them with a warning (a C-STORE 0xB000 coercion, for
        one); it stays in ``last_error`` of the sent deliveries. A delivery whose instance arrived
        again while it was being sent (a new version) is queued again instead: the
        acknowledgement may be of the previous version.
        """
        note = f"warning: {warning}" if warning else None
        with self._tx() as c:
            now = self._now_tx(c)
            superseded = [i for i in ids if (self.name, i) in self._superseded]
            self._superseded.difference_update((self.name, i) for i in superseded)
            acked = [i for i in ids if i not in superseded]
            c.execute(
                "update deliveries set state = 'sent', sent_at = ?, lease_until = null,"
                " last_error = ?, confirmed = null where destination = ?"
                " and instance_id in (select value from json_each(?))",
                (now, note, self.name, ids_param(acked)),
            )
            self._requeue_superseded(c, superseded, now)

    def _requeue_superseded(self, c: sqlite3.Connection, ids: Sequence[int], now: float) -> None:
        if ids:
            c.execute(
                "update deliveries set state = 'queued', next_attempt_at = ?, lease_until = null"
                " where destination = ? and instance_id in (select value from json_each(?))",
                (now, self.name, ids_param(ids)),
            )

    def awaiting_proof(self, limit: int) -> list[OutboxRow]:
        """Sent deliveries whose storage is yet to be proven, the longest-waiting first."""
        q = self._query(
            _SELECT_ROWS
            + " where d.destination = ? and "
            + AWAITING_PROOF
            + " order by d.sent_at, d.instance_id limit ?",
            (self.name, int(limit)),
        )
        return [_row(r) for r in q]

    def oldest_proof_pending_at(self) -> float | None:
        """When the longest-waiting delivery awaiting proof was acknowledged (None: none)."""
        rows = self._query(
            "select min(d.sent_at) from deliveries d join instances i on i.id = d.instance_id"  # noqa: S608
            " where d.destination = ? and " + AWAITING_PROOF,
            (self.name,),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    def mark_proven(self, ids: Sequence[int], *, proven: bool = True) -> None:
        """The destination proved it holds these sent deliveries (``proven``), or said it cannot
        prove it (``proven=False``: files kept unless ``disk.keep_unconfirmed`` is off). Either
        way they count as delivered (``last_success_at``)."""
        with self._tx() as c:
            c.execute(
                "update destinations set last_success_at = ? where name = ?",
                (self._now_tx(c), self.name),
            )
            c.execute(
                "update deliveries set confirmed = ?"
                " where destination = ? and state = 'sent' and confirmed is null"
                " and instance_id in (select value from json_each(?))",
                (int(proven), self.name, ids_param(ids)),
            )

    def mark_not_stored(
        self, retry: Sequence[tuple[int, float]], dead: Sequence[int], *, error: str
    ) -> None:
        """Acknowledged deliveries the storage check did not find: ``retry`` ((id, delay) pairs)
        back to ``queued``, due after their delay; ``dead`` to ``dead``. Both keep ``error``."""
        with self._tx() as c:
            now = self._now_tx(c)
            for row_id, delay in retry:
                c.execute(
                    "update deliveries set state = 'queued', next_attempt_at = ?, sent_at = null,"
                    " last_error = ? where destination = ? and instance_id = ?"
                    " and state = 'sent' and confirmed is null",
                    (now + max(0.0, delay), error[:500], self.name, int(row_id)),
                )
            c.execute(
                "update deliveries set state = 'dead', sent_at = null, last_error = ?"
                " where destination = ? and state = 'sent' and confirmed is null"
                " and instance_id in (select value from json_each(?))",
                (error[:500], self.name, ids_param(dead)),
            )

    def mark_retry(
        self, ids: Sequence[int], *, error: str, delay: float, refund_attempt: bool = False
    ) -> None:
        """Back to ``queued``, due in ``delay`` seconds (attempts were counted at claim).

        ``refund_attempt`` gives the attempt back: used while the destination is known to be down,
        so an outage does not burn every row's attempts.
        """
        refund = 1 if refund_attempt else 0
        with self._tx() as c:
            due = self._now_tx(c) + max(0.0, delay)
            self._superseded.difference_update((self.name, i) for i in ids)
            c.execute(
                "update deliveries set state = 'queued', next_attempt_at = ?, lease_until = null,"
                " last_error = ?, attempts = max(0, attempts - ?) where destination = ?"
                " and instance_id in (select value from json_each(?)) and state = 'sending'",
                (due, error[:500], refund, self.name, ids_param(ids)),
            )

    def mark_dead(self, ids: Sequence[int], *, error: str) -> None:
        """These rows failed for good (a new version that arrived meanwhile is queued instead:
        the refusal was of the previous one)."""
        with self._tx() as c:
            now = self._now_tx(c)
            superseded = [i for i in ids if (self.name, i) in self._superseded]
            self._superseded.difference_update((self.name, i) for i in superseded)
            c.execute(
                "update deliveries set state = 'dead', lease_until = null, last_error = ?"
                " where destination = ? and instance_id in (select value from json_each(?))"
                " and state != 'sent'",
                (error[:500], self.name, ids_param([i for i in ids if i not in superseded])),
            )
            self._requeue_superseded(c, superseded, now)

    def release(self, ids: Sequence[int]) -> None:
        """``sending`` → ``queued`` without penalty (shutdown before the request was made)."""
        self._superseded.difference_update((self.name, i) for i in ids)
        with self._tx() as c:
            c.execute(
                "update deliveries set state = 'queued', lease_until = null,"
                " attempts = max(0, attempts - 1) where destination = ?"
                " and instance_id in (select value from json_each(?)) and state = 'sending'",
                (self.name, ids_param(ids)),
            )

    def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """``dead`` → ``queued`` (all, or these instance ids) with attempts reset and due now."""
        selected = None if ids is None else ids_param(ids)
        with self._tx() as c:
            now = self._now_tx(c)
            cur = c.execute(
                "update deliveries set state = 'queued', attempts = 0, next_attempt_at = ?1,"
                " created_at = ?1, last_error = null where destination = ?2 and state = 'dead'"
                " and (?3 is null or instance_id in (select value from json_each(?3)))",
                (now, self.name, selected),
            )
            return int(cur.rowcount)

    def retry_now(self) -> int:
        """Make every waiting delivery due now and close the circuit (after fixing credentials
        or the address)."""
        with self._tx() as c:
            now = self._now_tx(c)
            n = c.execute(
                "update deliveries set next_attempt_at = ?"
                " where destination = ? and state = 'queued' and next_attempt_at > ?",
                (now, self.name, now),
            ).rowcount
            c.execute(
                "update destinations set blocked_until = 0, probe_until = 0 where name = ?",
                (self.name,),
            )
        return int(n)

    def due_summary(self, limit: int) -> tuple[int, int]:
        """``(rows, bytes)`` of the first ``limit`` queued deliveries due now (a read)."""
        rows = self._query(
            "select count(*), coalesce(sum(i.size), 0) from (select instance_id from deliveries"
            " where destination = ? and state = 'queued' and next_attempt_at <= ?"
            " order by instance_id limit ?) d join instances i on i.id = d.instance_id",
            (self.name, self.now(), int(limit)),
        )
        return int(rows[0][0]), int(rows[0][1])

    def next_due_at(self) -> float | None:
        """When the earliest queued delivery becomes due (None: nothing queued)."""
        rows = self._query(
            "select min(next_attempt_at) from deliveries"
            " where destination = ? and state = 'queued'",
            (self.name,),
        )
        return None if rows[0][0] is None else float(rows[0][0])

    def aged_out(self, ids: Sequence[int], max_age: float) -> set[int]:
        """The instances among ``ids`` whose delivery here has waited ``max_age`` s or more."""
        return self.outbox_db.aged_out(ids, max_age, destination=self.name)

    def counts(self) -> dict[str, int]:
        """This destination's deliveries by state."""
        return self.outbox_db.counts(self.name)

    def oldest_waiting_age(self) -> float | None:
        """Seconds since the oldest instance waiting for this destination was added."""
        return self.outbox_db.oldest_waiting_age(self.name)

    def rows(self, state: str | None = None, limit: int = 1000) -> list[OutboxRow]:
        """This destination's deliveries, in the order instances were added."""
        return self.outbox_db.rows(state, limit, destination=self.name)
