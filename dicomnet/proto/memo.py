"""Small bounded memos for association set-up: a peer proposing (or answering) the same
contexts again is handled from memory. Bounded by starting afresh when full, which
costs nothing per lookup."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["BoundedMemo", "IdentityMemo"]

V = TypeVar("V")


class BoundedMemo(Generic[V]):
    """Values by an equal key; at most `limit` of them."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._entries: dict[Hashable, V] = {}

    def get(self, key: Hashable) -> V | None:
        return self._entries.get(key)

    def put(self, key: Hashable, value: V) -> V:
        if len(self._entries) >= self._limit:
            self._entries = {}
        self._entries[key] = value
        return value


class IdentityMemo(Generic[V]):
    """Values by the identity of the (immutable) objects they were made from, which are
    kept here so that an id is not reused meanwhile; at most `limit` of them."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._entries: dict[tuple[int, ...], tuple[tuple[object, ...], V]] = {}

    def get(self, *sources: object) -> V | None:
        entry = self._entries.get(tuple(map(id, sources)))
        if entry is None or any(a is not b for a, b in zip(entry[0], sources, strict=True)):
            return None
        return entry[1]

    def put(self, sources: tuple[object, ...], value: V) -> V:
        if len(self._entries) >= self._limit:
            self._entries = {}
        self._entries[tuple(map(id, sources))] = (sources, value)
        return value
