"""Which instances of a series QC measures: a few, spread over the series, ends avoided."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

__all__ = ["pick_spread"]

T = TypeVar("T")


def pick_spread(items: Sequence[T], k: int) -> list[T]:
    """``k`` items spread evenly over ``items`` (in their order), avoiding both ends.

    The first and last slices of a series (scout edges, partial coverage) are the least typical;
    the middle ones are measured. All items when there are at most ``k``; none when ``k <= 0``.

    >>> pick_spread(list(range(10)), 3)
    [2, 5, 7]
    """
    if k <= 0:
        return []
    if len(items) <= k:
        return list(items)
    step = len(items) / (k + 1)
    return [items[min(len(items) - 1, int(step * (j + 1)))] for j in range(k)]
