"""Routing: which destinations an instance goes to, decided when its row is committed (and again
when a new version of the instance arrives).

A :class:`Route` is a destination's name and its ``match`` rule (``[destinations.match]``): every
key given must match, the values of one key are alternatives, and a rule without keys matches
every instance. Attributes are those of the de-identified output (Modality, SOP Class UID) and
where the instance came from (the inbox sub-folder it was dropped into, or the calling AE title
of a C-STORE association).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...config import DEFAULT_DESTINATION, DestinationSettings, MatchSettings

__all__ = ["DEFAULT_ROUTES", "Route", "routes_from_settings"]


@dataclass(frozen=True)
class Route:
    """A destination's name and the instances it receives (``match``: None = every instance)."""

    name: str
    match: MatchSettings | None = field(default=None, compare=False)

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        """Whether an instance with these attributes goes to this destination.

        ``attrs`` holds ``modality``, ``sop_class_uid``, ``inbox_folder`` (None: not from the
        inbox, or not known) and ``calling_ae`` (None: not received over C-STORE).
        """
        m = self.match
        if m is None or m.empty:
            return True
        if m.modality and str(attrs.get("modality") or "").upper() not in m.modality:
            return False
        if m.sop_class_uid and not _uid_matches(str(attrs.get("sop_class_uid") or ""), m):
            return False
        if m.inbox_folder and attrs.get("inbox_folder") not in m.inbox_folder:
            return False
        return not (m.calling_ae and attrs.get("calling_ae") not in m.calling_ae)

    @property
    def names_folders(self) -> frozenset[str]:
        """The inbox sub-folders this rule names (recorded on rows; other names never are)."""
        return frozenset(self.match.inbox_folder) if self.match is not None else frozenset()


def _uid_matches(uid: str, m: MatchSettings) -> bool:
    for pattern in m.sop_class_uid:
        if pattern.endswith(".*"):
            if uid.startswith(pattern[:-1]):
                return True
        elif uid == pattern:
            return True
    return False


#: One destination named ``default`` that takes every instance (the single ``[destination]``).
DEFAULT_ROUTES: tuple[Route, ...] = (Route(DEFAULT_DESTINATION),)


def routes_from_settings(destinations: Sequence[DestinationSettings]) -> tuple[Route, ...]:
    """The routes of the configured destinations, in configuration order."""
    return tuple(Route(d.name, d.match) for d in destinations)
