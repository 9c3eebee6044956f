"""When a destination's copies go out: each as it comes (the default), or a series or a
study at once, when it is stable: no new instance of it for `stable_after` seconds (what
AI-node routers call a series / study trigger).

`Groups` holds the copies of such a destination by series or study UID; the forwarder
asks it what is due. The time is given by the caller (no clock here), so that the held
copies of a restarted router count from their files' modification times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dicomnet.route.queue import Entry

__all__ = ["LEVELS", "Group", "Groups", "Held"]

LEVELS = ("instance", "series", "study")


@dataclass(frozen=True, slots=True)
class Held:
    """A copy and the UIDs it is grouped by."""

    entry: Entry
    study: str
    series: str


@dataclass(slots=True)
class Group:
    """The copies of one series or study, held until `due`."""

    key: str
    due: float
    copies: list[Held] = field(default_factory=list)

    def by_series(self) -> list[list[Held]]:
        """Its copies, series by series, in the order they came."""
        series: dict[str, list[Held]] = {}
        for held in self.copies:
            series.setdefault(held.series, []).append(held)
        return list(series.values())

    @property
    def entries(self) -> list[Entry]:
        return [held.entry for held in self.copies]


class Groups:
    """Copies held by series or study (`level`) until `stable_after` seconds pass with no
    new copy of theirs."""

    def __init__(self, level: str, stable_after: float) -> None:
        if level not in LEVELS[1:]:
            raise ValueError(f"a group is a series or a study, not {level!r}")
        self.level = level
        self.stable_after = stable_after
        self._groups: dict[str, Group] = {}

    def __len__(self) -> int:
        return sum(len(group.copies) for group in self._groups.values())

    def hold(self, copies: Iterable[Held], arrived: float) -> None:
        """Add copies that arrived at `arrived`: their group is due `stable_after` later
        (a copy older than the group's latest does not bring it forward)."""
        for held in copies:
            key = held.series if self.level == "series" else held.study
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = Group(key, arrived + self.stable_after)
            group.due = max(group.due, arrived + self.stable_after)
            group.copies.append(held)

    def hold_again(self, group: Group, copies: list[Held], due: float) -> None:
        """Put back part of a group (its destination was down), due at `due`, merged with
        copies of the same series or study that came meanwhile."""
        current = self._groups.get(group.key)
        if current is None:
            self._groups[group.key] = Group(group.key, due, list(copies))
            return
        current.copies[:0] = copies
        current.due = max(current.due, due)

    def next_due(self) -> float | None:
        """When the first group is due (None: none is held)."""
        return min((group.due for group in self._groups.values()), default=None)

    def take_due(self, now: float) -> list[Group]:
        """The groups stable at `now`, oldest first; they are no longer held."""
        due = sorted(
            (group for group in self._groups.values() if group.due <= now),
            key=lambda group: group.due,
        )
        for group in due:
            del self._groups[group.key]
        return due
