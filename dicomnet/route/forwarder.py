"""The sending side of `route`: one forwarder per destination takes the copies of its
queue, oldest first, and sends them through a `Sender` (a `dicomnet.Pool`), several at a
time. A copy is removed once the destination answered success or warning.

A destination that cannot be reached (refused, rejected, aborted, timed out) pauses the
whole forwarder, for a time that doubles with each failure in a row (with jitter, up to
`max_backoff`): the copies wait on disk, however long it is down, and no copy is charged
an attempt. A failure status that another try may cure (A7xx, out of resources) is
retried after such a pause for that copy; after `attempts` tries, or at once for a
failure no retry cures (the destination cannot understand or does not take this
instance: A9xx, Cxxx, 0122, no context for it), the copy goes to the destination's dead
letters with the reason.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Protocol

import anyio
import anyio.abc
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnet.errors import DicomNetError, DimseError, NotNegotiatedError
from dicomnet.route.config import Destination
from dicomnet.route.queue import Entry, RouteQueue
from dicomnet.route.triggers import Group, Groups, Held
from dicomnet.status import Status

__all__ = ["Forwarder", "Sender"]

_GROUP_TAGS = [0x0020000D, 0x0020000E]  # Study and Series Instance UID

# Copies of one destination held in memory at most (~0.5 KB each); a longer queue waits
# in its folder, read again as these go: a backlog grows on disk, not in memory.
MEMORY_LIMIT = 10_000

log = logging.getLogger("dicomnet")


class Sender(Protocol):
    async def store(self, dataset_or_path: str | os.PathLike[str]) -> Status: ...


def _unreachable(exc: DicomNetError) -> bool:
    """The destination, not the instance, is the trouble."""
    return not isinstance(exc, (DimseError, NotNegotiatedError))


def _lasting(exc: DicomNetError) -> bool:
    """A failure that trying again will not cure."""
    if isinstance(exc, NotNegotiatedError):
        return True
    if isinstance(exc, DimseError):
        return not 0xA700 <= int(exc.status) <= 0xA7FF
    return False


class Forwarder:
    """Sends one destination's queue (module docstring); `add()` hands it new copies."""

    def __init__(
        self,
        queue: RouteQueue,
        destination: Destination,
        sender: Sender,
        *,
        dedicated: Callable[[], AbstractAsyncContextManager[Sender]] | None = None,
        jitter: Callable[[], float] = random.random,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        self.queue = queue
        self.memory_limit = memory_limit
        self._on_disk = False  # copies in the pending folder not taken in memory
        self._lost = False  # copies let go of (their leases had ended): to be taken again
        self._refilling = False
        self.destination = destination
        self.sender = sender
        self.dedicated = dedicated  # a sender of its own for each series / study
        self.jitter = jitter
        self._ready: deque[Entry] = deque()
        self._known: set[str] = set()  # sequences ready, held, in flight or to retry
        self._more = anyio.Event()
        self.groups: Groups | None = None
        self._arriving: list[Entry] = []  # to be held, once their UIDs are read
        self._arrived = anyio.Event()  # wakes the releasing of held copies
        if destination.trigger != "instance":
            self.groups = Groups(destination.trigger, destination.stable_after)
        try:
            self.add(queue.pending(destination.name, memory_limit))
        except OSError as exc:  # a shared queue's database away: taken at a rescan
            log.warning("%s: %s", destination.name, exc)
            self._lost = True
        self._down = 0  # connection failures in a row
        self._resume = 0.0  # no sending before this (anyio.current_time())
        self.in_flight = 0
        self.sent = 0
        self.retried = 0
        self.dead = 0
        self.last_error: str | None = None  # the latest failure, for `route status`

    @property
    def waiting(self) -> int:
        """Copies ready to go (not those held for their series / study)."""
        return len(self._ready)

    @property
    def held(self) -> int:
        """Copies held until their series / study is stable."""
        return len(self._arriving) + (len(self.groups) if self.groups is not None else 0)

    def add(self, entries: list[Entry]) -> None:
        """Take new copies, as many as `memory_limit` allows in memory; the others wait in
        the pending folder and are read from there as these go."""
        known = self._known
        mine = [
            e for e in entries if e.destination == self.destination.name and e.sequence not in known
        ]
        room = self.memory_limit - len(known)
        if len(mine) > room:
            self._on_disk = True
            mine = mine[: max(0, room)]
        if not mine:
            return
        known.update(e.sequence for e in mine)
        if self.groups is None:
            self._ready.extend(mine)
            self._more.set()
        else:
            self._arriving.extend(mine)
            self._arrived.set()

    async def rescan(self, own: bool = True) -> int:
        """Take copies put in the queue from outside (`route retry`, a node that stopped),
        and (`own`) those left there for want of room in memory."""
        pending = await anyio.to_thread.run_sync(
            partial(self.queue.pending, self.destination.name, self.memory_limit, own=own)
        )
        # A copy sent while the folder was listed is gone now (its removal comes before
        # it leaves `_known`, here on the event loop): it must not be taken again. (A
        # shared queue's row is gone then: one whose file is missing leaves the queue.)
        known = self._known
        new = [
            e
            for e in pending
            if e.sequence not in known and (e.row is not None or os.path.exists(e.path))
        ]
        before = len(known)
        self.add(new)
        return len(known) - before

    async def run(self, rescan_every: float | None = None) -> None:
        """Until cancelled; the queue is looked at again every `rescan_every` s (default:
        the queue's: 30 s for a folder, under a second when shared with other nodes)."""
        if rescan_every is None:
            rescan_every = self.queue.rescan_every
        # As many copies in flight as the associations and their windows can carry.
        slots = anyio.Semaphore(self.destination.associations * self.destination.window)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._rescanning, rescan_every)
            tg.start_soon(self._syncing_removals)
            if self.groups is not None:
                tg.start_soon(self._releasing, self.groups, tg)
            while True:
                while not self._ready:
                    await self._more.wait()
                    self._more = anyio.Event()
                await anyio.sleep_until(self._resume)
                if not self._ready:
                    continue
                await slots.acquire()
                tg.start_soon(self._send, self._ready.popleft(), slots, tg)

    async def _send(self, entry: Entry, slots: anyio.Semaphore, tg: anyio.abc.TaskGroup) -> None:
        self.in_flight += 1
        try:
            if not await self._deliver(self.sender, entry, tg):
                self._ready.appendleft(entry)  # first again, uncharged
                self._more.set()
        finally:
            self.in_flight -= 1
            slots.release()

    async def _deliver(self, sender: Sender, entry: Entry, tg: anyio.abc.TaskGroup) -> bool:
        """Send one copy; False when the destination could not be reached (the copy was
        not charged an attempt and is to be sent again)."""
        if not self.queue.holds(entry):  # its lease may have ended: taken again if ours
            self._forget(entry, tg)
            self._lost = True
            return True
        try:
            await sender.store(entry.path)
        except DicomNetError as exc:
            return await self._failed(entry, exc, tg)
        except FileNotFoundError:  # removed by hand: it leaves the queue
            await anyio.to_thread.run_sync(self.queue.done, entry)
            self._forget(entry, tg)
            return True
        await anyio.to_thread.run_sync(self.queue.done, entry)
        self._forget(entry, tg)
        self.sent += 1
        log.info("sent %s to %s", entry.path.name, self.destination.name)
        if self._down:
            log.info("destination %s reachable again", self.destination.name)
            self._down = 0
        return True

    def _pause(self, failures: int) -> float:
        d = self.destination
        pause: float = min(d.max_backoff, d.backoff * 2 ** (failures - 1))
        return pause * (0.5 + self.jitter() / 2)

    async def _failed(self, entry: Entry, exc: DicomNetError, tg: anyio.abc.TaskGroup) -> bool:
        """Deal with a failed copy: False when the destination could not be reached."""
        name = self.destination.name
        self.last_error = str(exc)
        if _unreachable(exc):
            if anyio.current_time() >= self._resume:  # not already paused by another
                self._down += 1
                pause = self._pause(self._down)
                self._resume = anyio.current_time() + pause
                log.warning("destination %s unreachable (%s): again in %.1f s", name, exc, pause)
                self.retried += 1
            return False
        attempts = entry.attempts + 1
        if _lasting(exc) or attempts >= self.destination.attempts:
            reason = f"after {attempts} attempt(s): {exc}"
            log.warning("gave up sending %s to %s %s", entry.path.name, name, reason)
            await anyio.to_thread.run_sync(self.queue.give_up, entry, reason)
            self._forget(entry, tg)
            self.dead += 1
            return True
        again = await anyio.to_thread.run_sync(self.queue.failed, entry)
        pause = self._pause(attempts)
        log.info("sending %s to %s failed (%s): again in %.1f s", entry.path.name, name, exc, pause)
        self.retried += 1
        tg.start_soon(self._later, again, pause)
        return True

    def _forget(self, entry: Entry, tg: anyio.abc.TaskGroup) -> None:
        """`entry` left the queue (sent, given up, removed): once half the room in memory
        is free, copies that waited in the folder are read in."""
        self._known.discard(entry.sequence)
        if self._on_disk and not self._refilling and len(self._known) <= self.memory_limit // 2:
            self._refilling = True
            tg.start_soon(self._refill)

    async def _refill(self) -> None:
        """Take in memory copies that waited in the pending folder, oldest first."""
        try:
            self._on_disk = False
            await self.rescan()
        except OSError as exc:  # a shared queue's database away: again later
            log.warning("%s: %s", self.destination.name, exc)
            self._on_disk = self._lost = True
        finally:
            self._refilling = False

    async def _syncing_removals(self, every: float = 1.0) -> None:
        """Make the removals of confirmed copies durable, a folder fsync for many."""
        try:
            while True:
                await anyio.sleep(every)
                await anyio.to_thread.run_sync(self.queue.sync_removals)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.queue.sync_removals)

    async def _rescanning(self, every: float) -> None:
        while True:
            await anyio.sleep(every)
            own, self._lost = self._lost, False
            try:
                await self.rescan(own)
            except OSError as exc:  # a shared queue's database away: again later
                log.warning("%s: %s", self.destination.name, exc)
                self._lost = self._lost or own

    async def _later(self, entry: Entry, pause: float) -> None:
        await anyio.sleep(pause)
        self._ready.append(entry)  # alone, not held with its series again
        self._more.set()

    # --- series / study triggers ----------------------------------------------------------

    async def _releasing(self, groups: Groups, tg: anyio.abc.TaskGroup) -> None:
        """Hold what arrives by series / study; release each group once it is stable:
        into the queue, or on an association of its own (`dedicated`)."""
        parallel = anyio.Semaphore(self.destination.associations)
        while True:
            arriving, self._arriving = self._arriving, []
            if arriving:
                held = await anyio.to_thread.run_sync(_identify, arriving)
                for copy, age in held:
                    groups.hold([copy], anyio.current_time() - age)
            for group in groups.take_due(anyio.current_time()):
                if self.dedicated is None:
                    self._ready.extend(group.entries)
                    self._more.set()
                    continue
                per_series = self.destination.association_per == "series"
                for part in group.by_series() if per_series else [group.copies]:
                    tg.start_soon(self._send_group, group, part, parallel, tg)
            due = groups.next_due()
            if self._arriving:
                continue
            with anyio.move_on_after(math.inf if due is None else due - anyio.current_time()):
                await self._arrived.wait()
            self._arrived = anyio.Event()

    async def _send_group(
        self,
        group: Group,
        copies: list[Held],
        parallel: anyio.Semaphore,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        """Send a series / study on an association of its own, released after it; if the
        destination cannot be reached, what is left is held again until it may be."""
        assert self.dedicated is not None and self.groups is not None
        async with parallel:
            await anyio.sleep_until(self._resume)
            self.in_flight += len(copies)
            try:
                async with self.dedicated() as sender:
                    for n, held in enumerate(copies):
                        if not await self._deliver(sender, held.entry, tg):
                            self.groups.hold_again(group, copies[n:], self._resume)
                            self._arrived.set()
                            return
            except DicomNetError as exc:  # the release
                log.debug("association for %s %s ended: %s", self.groups.level, group.key, exc)
            finally:
                self.in_flight -= len(copies)


def _identify(entries: list[Entry]) -> list[tuple[Held, float]]:
    """Each copy with its study and series UIDs, and its age in seconds (how long ago it
    was queued: its file's modification time)."""
    now = time.time()
    out = []
    for entry in entries:
        ds: Dataset
        try:
            ds = dcmread(entry.path, stop_before_pixels=True, specific_tags=_GROUP_TAGS)
            age = max(0.0, now - entry.path.stat().st_mtime)
        except (OSError, InvalidDicomError):
            ds, age = Dataset(), 0.0
        study = str(ds.get("StudyInstanceUID", "") or "")
        series = str(ds.get("SeriesInstanceUID", "") or "")
        out.append((Held(entry, study, series), age))
    return out
