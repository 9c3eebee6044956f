"""The durable queue of `dicomnet route`: one folder per destination, one file per copy.

    QUEUE/
      .tmp/                   instances being written (never acknowledged: cleared at start)
      <destination>/pending/  <sequence>-<attempts>.dcm   Part-10 files still to send
      <destination>/dead/     <sequence>-<attempts>.dcm and .reason   given up on

An instance is written once into `.tmp` (fsynced), then hard-linked into the pending
folder of each destination it goes to (a coerced copy is a file of its own), the
folders fsynced, and only then is its C-STORE answered: a crash at any moment loses
nothing acknowledged. A copy is removed (and the removal fsynced) once its destination
answered success or warning; a crash between that answer and the removal sends it once
more, the only duplicate there can be. Blocking: call from a worker thread.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["DestinationStatus", "Entry", "Queue", "QueueFull", "RouteQueue"]

_sequence = itertools.count()


class QueueFull(Exception):
    """A destination's queue holds its maximum: new instances are refused (0xA700)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One copy waiting for a destination: its file, its place in arrival order, the
    attempts that failed so far, and its row when the queue is in a database."""

    destination: str
    path: Path
    sequence: str
    attempts: int = 0
    row: int | None = None

    @classmethod
    def named(cls, destination: str, path: Path) -> Entry:
        """The copy of a queue folder at `path` (`<sequence>-<attempts>.dcm`)."""
        sequence, _, attempts = path.stem.rpartition("-")
        return cls(destination, path, sequence, int(attempts))


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    queued: int
    dead: int
    oldest_age: float | None  # seconds since the oldest pending copy was queued
    queued_bytes: int


class RouteQueue(Protocol):
    """What the intake and the forwarders need of a queue: this folder's `Queue`, or
    `SharedQueue` (`dicomnet.route.shared_queue`), whose state is in PostgreSQL so that
    several route nodes share it. Blocking: called from worker threads."""

    @property
    def fsync(self) -> bool: ...
    @property
    def rescan_every(self) -> float:
        """Seconds between looks for copies put in the queue from outside (or let go)."""

    @property
    def lease(self) -> float | None:
        """Seconds a node keeps the copies it took without renewing them (None: no
        leases, the queue is this process's alone)."""

    def temp_path(self) -> Path: ...
    def has_room(self, destinations: Iterable[str]) -> bool: ...
    def put(self, copies: Mapping[str, Path]) -> list[Entry]: ...
    def pending(
        self, destination: str, limit: int | None = None, *, own: bool = True
    ) -> list[Entry]: ...
    def done(self, entry: Entry) -> None: ...
    def sync_removals(self) -> int: ...
    def failed(self, entry: Entry) -> Entry: ...
    def give_up(self, entry: Entry, reason: str) -> Entry: ...
    def retry_dead(self, destination: str) -> int: ...
    def status(self, now: float | None = None) -> dict[str, DestinationStatus]: ...
    def last_reason(self, destination: str) -> str | None: ...
    def renew(self) -> None: ...
    def holds(self, entry: Entry) -> bool: ...
    def close(self) -> None: ...


class Removals:
    """Folders where copies were removed and the removals not yet made durable: one
    fsync of a folder serves all its removals (`sync`, a forwarder's every second)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: set[Path] = set()

    def add(self, folder: Path) -> None:
        with self._lock:
            self._folders.add(folder)

    def sync(self) -> int:
        """Fsync the folders so far; how many."""
        with self._lock:
            folders, self._folders = self._folders, set()
        for folder in folders:
            fsync_folder(folder)
        return len(folders)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_sequence() -> str:
    """Names that sort in arrival order, across restarts too."""
    return f"{time.time_ns():020d}{next(_sequence) % 10_000:04d}"


class Queue:
    """The queue folder (module docstring). `max_queued`: copies a destination may hold
    before `put` refuses (None: no limit but the disk)."""

    rescan_every = 30.0
    lease = None  # one process has the folder: nothing to lease

    def __init__(
        self,
        root: Path,
        destinations: Iterable[str] | None = None,
        *,
        fsync: bool = True,
        max_queued: int | None = None,
        recover: bool = True,
    ) -> None:
        """`destinations`: None for those that have a folder (to look at a queue a router
        uses: then also not `recover`, which clears what was being written)."""
        self.root = Path(root)
        self.fsync = fsync
        self.max_queued = max_queued
        self.tmp = self.root / ".tmp"
        if recover:
            shutil.rmtree(self.tmp, ignore_errors=True)  # never acknowledged
            self.tmp.mkdir(parents=True, exist_ok=True)
        if destinations is None:
            destinations = sorted(p.parent.name for p in self.root.glob("*/pending"))
        self._queued: dict[str, int] = {}
        self._lock = threading.Lock()  # the counts, from the threads that put and remove
        self._removals = Removals()
        for name in destinations:
            for sub in ("pending", "dead"):
                (self.root / name / sub).mkdir(parents=True, exist_ok=True)
            self._queued[name] = sum(1 for _ in self._pending_files(name))

    def _pending_files(self, destination: str) -> Iterable[Path]:
        return (self.root / destination / "pending").glob("*.dcm")

    def temp_path(self) -> Path:
        """Where to write an instance (or a coerced copy) before `put`."""
        return self.tmp / f"{new_sequence()}.dcm"

    def has_room(self, destinations: Iterable[str]) -> bool:
        return self.max_queued is None or all(
            self._queued[name] < self.max_queued for name in destinations
        )

    def put(self, copies: Mapping[str, Path]) -> list[Entry]:
        """Queue the files of `copies` (destination -> a file written under `.tmp`, fsynced
        by its writer when `fsync`; one file may serve several destinations). When this
        returns, every copy is durable. `QueueFull` when a destination has no room."""
        if not self.has_room(copies):
            full = [n for n in copies if self.max_queued and self._queued[n] >= self.max_queued]
            raise QueueFull(f"the queue of {', '.join(full)} is full ({self.max_queued})")
        sequence = new_sequence()
        entries = []
        for name, source in copies.items():
            target = self.root / name / "pending" / f"{sequence}-0.dcm"
            os.link(source, target)
            entries.append(Entry(name, target, sequence))
        if self.fsync:
            for name in copies:
                fsync_folder(self.root / name / "pending")
        for source in set(copies.values()):
            source.unlink()
        with self._lock:
            for name in copies:
                self._queued[name] += 1
        return entries

    def pending(
        self, destination: str, limit: int | None = None, *, own: bool = True
    ) -> list[Entry]:
        """The copies still to send to `destination`, oldest first, all of them (one
        process has the folder: all are its own; the count kept for `has_room` is taken
        again: copies may have been put back from outside)."""
        entries = [Entry.named(destination, p) for p in sorted(self._pending_files(destination))]
        with self._lock:
            self._queued[destination] = len(entries)
        return entries

    def done(self, entry: Entry) -> None:
        """The destination confirmed `entry`: it goes. The removal is made durable by the
        next `sync_removals()` (a forwarder calls it every second): a process killed
        loses nothing of it, and after a crash of the system itself only copies removed
        in that last moment can be sent again. One folder fsync serves many removals."""
        entry.path.unlink(missing_ok=True)
        with self._lock:
            self._queued[entry.destination] -= 1
        if self.fsync:
            self._removals.add(entry.path.parent)

    def sync_removals(self) -> int:
        """Make the removals so far durable (fsync their folders); how many folders."""
        return self._removals.sync()

    def failed(self, entry: Entry) -> Entry:
        """One more attempt of `entry` failed: the count is kept in its name."""
        again = entry.path.with_name(f"{entry.sequence}-{entry.attempts + 1}.dcm")
        os.replace(entry.path, again)
        return Entry.named(entry.destination, again)

    def give_up(self, entry: Entry, reason: str) -> Entry:
        """Move `entry` to its destination's dead-letter folder, with the reason beside it."""
        dead = self.root / entry.destination / "dead" / entry.path.name
        dead.with_suffix(".reason").write_text(reason + "\n")
        os.replace(entry.path, dead)
        if self.fsync:
            fsync_folder(dead.parent)
        with self._lock:
            self._queued[entry.destination] -= 1
        return Entry.named(entry.destination, dead)

    def retry_dead(self, destination: str) -> int:
        """Put `destination`'s dead letters back in its queue (attempts from zero)."""
        moved = 0
        for dead in sorted((self.root / destination / "dead").glob("*.dcm")):
            sequence = dead.stem.rpartition("-")[0]
            os.replace(dead, self.root / destination / "pending" / f"{sequence}-0.dcm")
            dead.with_suffix(".reason").unlink(missing_ok=True)
            moved += 1
        with self._lock:
            self._queued[destination] += moved
        return moved

    def last_reason(self, destination: str) -> str | None:
        """Why the latest dead letter of `destination` was given up (None: there is none)."""
        reasons = sorted((self.root / destination / "dead").glob("*.reason"))
        try:
            return reasons[-1].read_text().strip() if reasons else None
        except OSError:
            return None

    def renew(self) -> None:
        """Nothing to renew: no other process takes this folder's copies."""

    def holds(self, entry: Entry) -> bool:
        """Whether `entry` is still this process's to send: always, here."""
        return True

    def close(self) -> None:
        """Nothing held open."""

    def status(self, now: float | None = None) -> dict[str, DestinationStatus]:
        """Per destination: copies queued, dead letters, the oldest one's age."""
        now = time.time() if now is None else now
        out = {}
        for name in self._queued:
            pending = sorted(self._pending_files(name))
            oldest = int(pending[0].stem.rpartition("-")[0][:20]) / 1e9 if pending else None
            out[name] = DestinationStatus(
                queued=len(pending),
                dead=sum(1 for _ in (self.root / name / "dead").glob("*.dcm")),
                oldest_age=None if oldest is None else max(0.0, now - oldest),
                queued_bytes=sum(p.stat().st_size for p in pending),
            )
        return out
