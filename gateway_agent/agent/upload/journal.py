"""The journal of one batch's outcome: outbox writes made in order, those not yet made kept.

If recording an outcome fails (the state disk is full, the database is locked), the outbox writes
not yet made are kept in memory, in order, and the worker retries them with a short backoff
(:data:`RECORD_RETRY_FIRST_SECONDS` doubling to :data:`RECORD_RETRY_MAX_SECONDS`) before it claims
anything new.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from ...logs import describe_error, get_logger

__all__ = ["RECORD_RETRY_FIRST_SECONDS", "RECORD_RETRY_MAX_SECONDS", "STORAGE_ERRORS", "Journal"]

log = get_logger()

#: First wait before retrying an outcome that could not be recorded; doubles up to the max.
RECORD_RETRY_FIRST_SECONDS = 0.5
RECORD_RETRY_MAX_SECONDS = 10.0
#: Failures of the state storage (disk full, I/O error, locked): worth retrying the write later.
STORAGE_ERRORS = (sqlite3.Error, OSError)

_T = TypeVar("_T")


class Journal:
    """The outbox writes recording one batch's outcome, made in order; those not yet made.

    Each outbox method is one transaction: it took effect or it did not. Once a write fails with
    a storage error, it and every later write of the batch wait here (order is kept, so e.g. a
    row's ``mark_retry`` never lands before its ``mark_dead``) to be replayed by :meth:`replay`.
    """

    def __init__(self, row_ids: list[int]) -> None:
        self.row_ids = row_ids
        self.todo: deque[Callable[[], object]] = deque()
        self.tries = 0
        self.delay = RECORD_RETRY_FIRST_SECONDS

    def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T | None:
        """``fn(*args, **kwargs)`` now, or (after a storage error, now or earlier) later: None."""
        if not self.todo:
            try:
                return fn(*args, **kwargs)
            except STORAGE_ERRORS as exc:
                log.error(
                    "upload_outcome_not_recorded", rows=len(self.row_ids), error=describe_error(exc)
                )
        self.todo.append(lambda: fn(*args, **kwargs))
        return None

    def replay(self) -> bool:
        """Make the waiting writes; True when none is left. A storage error stops the replay."""
        while self.todo:
            try:
                self.todo[0]()
            except STORAGE_ERRORS as exc:
                self.tries += 1
                log.warning(
                    "upload_outcome_retry_failed",
                    rows=len(self.row_ids),
                    tries=self.tries,
                    error=describe_error(exc),
                )
                return False
            except Exception:
                self.todo.clear()  # not a storage problem: leave the rows to their lease
                raise
            self.todo.popleft()
        return True
