"""Delivery: lease due rows to the upload workers and record what became of them.

Unlike huey, delivery is at-least-once: a claim only leases a row (``sending``); the row becomes
``sent`` after the destination acknowledged it, and leases left by a crash are requeued.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ...logs import get_logger
from .db import _SELECT_ROWS, _WHERE_IDS, OutboxDB, OutboxRow, _row, ids_param

__all__ = ["Delivery"]

log = get_logger()


class Delivery(OutboxDB):
    """Claiming (``queued`` → ``sending``), outcomes (→ ``sent`` / ``queued`` / ``dead``), and the
    operator's ``retry``."""

    def claim(self, *, max_items: int, max_bytes: int, lease_seconds: float) -> list[OutboxRow]:
        """Lease due rows (queued and due, or ``sending`` with an expired lease) in one transaction.

        At least one row is returned when one is due, even if it alone exceeds ``max_bytes``.
        ``attempts`` is counted here.
        """
        if max_items < 1:
            raise ValueError('Argument "max_items" must be >= 1.')
        with self._tx() as c:
            now = self._now_tx(c)
            candidates = c.execute(
                "select id, size from outbox where state = 'queued' and next_attempt_at <= ?"
                " union all"
                " select id, size from outbox where state = 'sending' and lease_until < ?"
                " order by id limit ?",
                (now, now, max_items),
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
                "update outbox set state = 'sending', attempts = attempts + 1, lease_until = ?"
                " where id in (select value from json_each(?))",
                (now + lease_seconds, json.dumps(ids)),
            )
            rows = c.execute(
                _SELECT_ROWS + _WHERE_IDS,
                (json.dumps(ids),),
            ).fetchall()
        return [_row(r) for r in rows]

    def mark_sent(self, ids: Sequence[int], *, warning: str | None = None) -> None:
        """The destination acknowledged these rows (whatever their state now: the ack is a fact).

        ``warning``: the destination stored them with a warning (a C-STORE 0xB000 coercion, for
        one); it stays in ``last_error`` of the sent rows. A row whose instance arrived again
        while it was being sent (a new version) is queued again instead: the acknowledgement
        may be of the previous version.
        """
        note = f"warning: {warning}" if warning else None
        with self._tx() as c:
            now = self._now_tx(c)
            superseded = [i for i in ids if i in self._superseded]
            self._superseded.difference_update(superseded)
            acked = [i for i in ids if i not in superseded]
            c.execute("update destination_state set last_success_at = ? where id = 1", (now,))
            c.execute(
                "update outbox set state = 'sent', sent_at = ?, lease_until = null,"
                " last_error = ? where id in (select value from json_each(?))",
                (now, note, ids_param(acked)),
            )
            self._requeue_superseded(c, superseded, now)

    def _requeue_superseded(self, c: Any, ids: Sequence[int], now: float) -> None:
        if ids:
            c.execute(
                "update outbox set state = 'queued', next_attempt_at = ?, lease_until = null"
                " where id in (select value from json_each(?))",
                (now, ids_param(ids)),
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
            self._superseded.difference_update(ids)
            c.execute(
                "update outbox set state = 'queued', next_attempt_at = ?, lease_until = null,"
                " last_error = ?, attempts = max(0, attempts - ?)"
                " where state = 'sending' and id in (select value from json_each(?))",
                (due, error[:500], refund, ids_param(ids)),
            )

    def mark_dead(self, ids: Sequence[int], *, error: str) -> None:
        """These rows failed for good (a new version that arrived meanwhile is queued instead:
        the refusal was of the previous one)."""
        with self._tx() as c:
            now = self._now_tx(c)
            superseded = [i for i in ids if i in self._superseded]
            self._superseded.difference_update(superseded)
            c.execute(
                "update outbox set state = 'dead', lease_until = null, last_error = ?"
                " where state != 'sent' and id in (select value from json_each(?))",
                (error[:500], ids_param([i for i in ids if i not in superseded])),
            )
            self._requeue_superseded(c, superseded, now)

    def release(self, ids: Sequence[int]) -> None:
        """``sending`` → ``queued`` without penalty (shutdown before the request was made)."""
        self._superseded.difference_update(ids)
        with self._tx() as c:
            c.execute(
                "update outbox set state = 'queued', lease_until = null,"
                " attempts = max(0, attempts - 1)"
                " where state = 'sending' and id in (select value from json_each(?))",
                (ids_param(ids),),
            )

    def requeue_stale(self) -> int:
        """At start-up: every ``sending`` row (left by a crash) goes back to ``queued``, due now."""
        with self._tx() as c:
            now = self._now_tx(c)
            cur = c.execute(
                "update outbox set state = 'queued', lease_until = null, next_attempt_at = ?"
                " where state = 'sending'",
                (now,),
            )
            n = cur.rowcount
        if n:
            log.info("outbox_requeued_stale", rows=n)
        return n

    def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """``dead`` → ``queued`` (all, or these ids) with attempts reset and due now."""
        selected = None if ids is None else ids_param(ids)
        with self._tx() as c:
            now = self._now_tx(c)
            cur = c.execute(
                "update outbox set state = 'queued', attempts = 0, next_attempt_at = ?1,"
                " created_at = ?1, last_error = null where state = 'dead'"
                " and (?2 is null or id in (select value from json_each(?2)))",
                (now, selected),
            )
            return int(cur.rowcount)

    def retry_now(self) -> int:
        """Make every waiting row due now and close the circuit (after fixing credentials/URL)."""
        with self._tx() as c:
            now = self._now_tx(c)
            n = c.execute(
                "update outbox set next_attempt_at = ?"
                " where state = 'queued' and next_attempt_at > ?",
                (now, now),
            ).rowcount
            c.execute(
                "update destination_state set blocked_until = 0, probe_until = 0 where id = 1"
            )
        return int(n)

    def due_summary(self, limit: int) -> tuple[int, int]:
        """``(rows, bytes)`` of the first ``limit`` queued rows due now (a read, no write)."""
        rows = self._query(
            "select count(*), coalesce(sum(size), 0) from (select size from outbox"
            " where state = 'queued' and next_attempt_at <= ? order by id limit ?)",
            (self.now(), int(limit)),
        )
        return int(rows[0][0]), int(rows[0][1])

    def next_due_at(self) -> float | None:
        """When the earliest queued row becomes due (None: nothing queued)."""
        rows = self._query("select min(next_attempt_at) from outbox where state = 'queued'")
        return None if rows[0][0] is None else float(rows[0][0])
