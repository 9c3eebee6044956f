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
import os
import random
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.to_thread

from dicomnet.errors import DicomNetError, DimseError, NotNegotiatedError
from dicomnet.route.config import Destination
from dicomnet.route.queue import Entry, Queue
from dicomnet.status import Status

__all__ = ["Forwarder", "Sender"]

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
        queue: Queue,
        destination: Destination,
        sender: Sender,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.queue = queue
        self.destination = destination
        self.sender = sender
        self.jitter = jitter
        self._ready: deque[Entry] = deque()
        self._known: set[str] = set()  # sequences ready, in flight or waiting to retry
        self._more = anyio.Event()
        self.add(queue.pending(destination.name))
        self._down = 0  # connection failures in a row
        self._resume = 0.0  # no sending before this (anyio.current_time())
        self.in_flight = 0
        self.sent = 0
        self.retried = 0
        self.dead = 0
        self.last_error: str | None = None  # the latest failure, for `route status`

    @property
    def waiting(self) -> int:
        return len(self._ready)

    def add(self, entries: list[Entry]) -> None:
        mine = [e for e in entries if e.destination == self.destination.name]
        if mine:
            self._ready.extend(mine)
            self._known.update(e.sequence for e in mine)
            self._more.set()

    async def rescan(self) -> int:
        """Take copies put in the pending folder from outside (`route retry`)."""
        pending = await anyio.to_thread.run_sync(self.queue.pending, self.destination.name)
        new = [e for e in pending if e.sequence not in self._known]
        self.add(new)
        return len(new)

    async def run(self, rescan_every: float = 30.0) -> None:
        """Until cancelled; the pending folder is looked at again every `rescan_every` s."""
        # As many copies in flight as the associations and their windows can carry.
        slots = anyio.Semaphore(self.destination.associations * self.destination.window)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._rescanning, rescan_every)
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
            try:
                await self.sender.store(entry.path)
            except DicomNetError as exc:
                await self._failed(entry, exc, tg)
                return
            except FileNotFoundError:  # removed by hand
                self._known.discard(entry.sequence)
                return
            await anyio.to_thread.run_sync(self.queue.done, entry)
            self._known.discard(entry.sequence)
            self.sent += 1
            log.info("sent %s to %s", entry.path.name, self.destination.name)
            if self._down:
                log.info("destination %s reachable again", self.destination.name)
                self._down = 0
        finally:
            self.in_flight -= 1
            slots.release()

    def _pause(self, failures: int) -> float:
        d = self.destination
        pause: float = min(d.max_backoff, d.backoff * 2 ** (failures - 1))
        return pause * (0.5 + self.jitter() / 2)

    async def _failed(self, entry: Entry, exc: DicomNetError, tg: anyio.abc.TaskGroup) -> None:
        name = self.destination.name
        self.last_error = str(exc)
        if _unreachable(exc):
            self._ready.appendleft(entry)  # first again, uncharged
            self._more.set()
            if anyio.current_time() >= self._resume:  # not already paused by another
                self._down += 1
                pause = self._pause(self._down)
                self._resume = anyio.current_time() + pause
                log.warning("destination %s unreachable (%s): again in %.1f s", name, exc, pause)
                self.retried += 1
            return
        attempts = entry.attempts + 1
        if _lasting(exc) or attempts >= self.destination.attempts:
            reason = f"after {attempts} attempt(s): {exc}"
            log.warning("gave up sending %s to %s %s", entry.path.name, name, reason)
            await anyio.to_thread.run_sync(self.queue.give_up, entry, reason)
            self._known.discard(entry.sequence)
            self.dead += 1
            return
        again = await anyio.to_thread.run_sync(self.queue.failed, entry)
        pause = self._pause(attempts)
        log.info("sending %s to %s failed (%s): again in %.1f s", entry.path.name, name, exc, pause)
        self.retried += 1
        tg.start_soon(self._later, again, pause)

    async def _rescanning(self, every: float) -> None:
        while True:
            await anyio.sleep(every)
            await self.rescan()

    async def _later(self, entry: Entry, pause: float) -> None:
        await anyio.sleep(pause)
        self.add([entry])
