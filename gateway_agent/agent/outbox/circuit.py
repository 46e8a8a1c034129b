"""The destination circuit: an outage is detected once and probed by one worker at a time.

The ``destinations`` table holds one per destination: consecutive failures, ``blocked_until``,
the probe's lease, the last error and success, and whether the destination rejects the agent's
credentials. One destination's circuit never holds back another's deliveries.
"""

from __future__ import annotations

from typing import Any

from .db import AWAITING_PROOF, DestinationView

__all__ = ["Circuit"]


class Circuit(DestinationView):
    """May a worker send now, and what the destination last said (its ``destinations`` row)."""

    def circuit_acquire(self, probe_lease: float) -> tuple[float, bool]:
        """May a worker send now? Returns ``(wait_seconds, probing)``.

        While the destination is healthy everyone may send (``(0, False)``, a read without a
        write). After a failure, the first worker past ``blocked_until`` becomes the single probe
        (``(0, True)``) for up to ``probe_lease`` seconds; everybody else waits.
        """
        now = self.now()
        failures, blocked_until = self._query(
            "select consecutive_failures, blocked_until from destinations where name = ?",
            (self.name,),
        )[0]
        if failures == 0 and blocked_until <= now:
            return 0.0, False
        with self._tx() as c:
            now = self._now_tx(c)
            failures, blocked_until, probe_until = c.execute(
                "select consecutive_failures, blocked_until, probe_until"
                " from destinations where name = ?",
                (self.name,),
            ).fetchone()
            if failures == 0 and blocked_until <= now:
                return 0.0, False
            wait_until = max(float(blocked_until), float(probe_until))
            if wait_until > now:
                return wait_until - now, False
            c.execute(
                "update destinations set probe_until = ? where name = ?",
                (now + probe_lease, self.name),
            )
            return 0.0, True

    def circuit_release_probe(self) -> None:
        """The probe found nothing to send: let the next worker probe at once."""
        with self._tx() as c:
            c.execute("update destinations set probe_until = 0 where name = ?", (self.name,))

    def circuit_failure(
        self,
        error: str,
        *,
        delay: float,
        started_at: float,
        auth: bool = False,
        probing: bool = False,
    ) -> bool:
        """Record a destination-level failure; block sending for ``delay`` seconds.

        Returns True if the outage was already known (the circuit was open, or another request
        recorded the failure while this one was in flight): the caller then refunds the rows'
        attempts, so an outage burns attempts once, not per request.
        """
        with self._tx() as c:
            now = self._now_tx(c)
            failures, last_error_at = c.execute(
                "select consecutive_failures, last_error_at from destinations where name = ?",
                (self.name,),
            ).fetchone()
            concurrent = failures > 0 and (last_error_at or 0) >= started_at
            c.execute(
                "update destinations set consecutive_failures = consecutive_failures + ?,"
                " blocked_until = max(blocked_until, ?), last_error = ?, last_error_at = ?,"
                " auth_failing = ?, probe_until = case when ? then 0 else probe_until end"
                " where name = ?",
                (
                    0 if concurrent else 1,
                    now + delay,
                    error[:500],
                    now,
                    int(auth),
                    int(probing),
                    self.name,
                ),
            )
            return bool(failures > 0)

    def circuit_success(self) -> bool:
        """The destination answered. Returns True if that closed an open circuit."""
        failures, auth = self._query(
            "select consecutive_failures, auth_failing from destinations where name = ?",
            (self.name,),
        )[0]
        if not (failures or auth):
            return False  # healthy already: no write
        with self._tx() as c:
            c.execute(
                "update destinations set consecutive_failures = 0, blocked_until = 0,"
                " probe_until = 0, auth_failing = 0 where name = ?",
                (self.name,),
            )
        return bool(failures or auth)  # last_success_at: set by mark_proven, a delivery

    def circuit_note(self, error: str) -> None:
        """Record what the destination did wrong without opening the circuit (it answers, but,
        for example, does not hold what it acknowledged): ``status`` shows it as the last error."""
        with self._tx() as c:
            c.execute(
                "update destinations set last_error = ?, last_error_at = ? where name = ?",
                (error[:500], self._now_tx(c), self.name),
            )

    def consecutive_failures(self) -> int:
        return int(
            self._query(
                "select consecutive_failures from destinations where name = ?", (self.name,)
            )[0][0]
        )

    def destination_status(self) -> dict[str, Any]:
        """``last_error``, ``last_error_at``, ``last_success_at`` (the last delivery: storage
        proven, or acknowledged where it cannot be), ``consecutive_failures``, ``blocked_until``
        and ``auth_failing`` of this destination; ``awaiting_proof`` deliveries acknowledged
        whose storage is not proven yet, the longest-waiting acknowledged at
        ``proof_pending_since``."""
        found = self._query(
            "select last_error, last_error_at, last_success_at, consecutive_failures,"
            " blocked_until, auth_failing from destinations where name = ?",
            (self.name,),
        )
        r = found[0] if found else (None, None, None, 0, 0, 0)
        pending, since = self._query(
            "select count(*), min(d.sent_at) from deliveries d"  # noqa: S608 (a constant)
            " join instances i on i.id = d.instance_id where d.destination = ? and "
            + AWAITING_PROOF,
            (self.name,),
        )[0]
        return {
            "last_error": r[0],
            "last_error_at": r[1],
            "last_success_at": r[2],
            "consecutive_failures": int(r[3]),
            "blocked_until": float(r[4]) if r[4] else None,
            "auth_failing": bool(r[5]),
            "awaiting_proof": int(pending),
            "proof_pending_since": None if since is None else float(since),
        }
