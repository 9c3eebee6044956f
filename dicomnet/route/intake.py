"""The receiving side of `route`: each C-STORE routed by the rules and queued, durably,
before it is answered (PS3.4 §B.2.3: success only once the instance is kept).

The copy for a destination without coercion is the data set exactly as received; a
coerced copy is the data set decoded, changed and written again in the same transfer
syntax. The data set is decoded only when a rule looks at an attribute or coerces.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path

import anyio.to_thread
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicomnet.route.queue import Entry, QueueFull, RouteQueue
from dicomnet.route.rules import Arrival, Coercion, Route, RouteRule, route
from dicomnet.services.storage import StoreRequest

__all__ = ["Intake", "coerce"]

log = logging.getLogger("dicomnet")


def coerce(dataset: Dataset, coercion: Coercion) -> Dataset:
    """A copy of `dataset` with `coercion`'s attributes set and removed."""
    changed = Dataset()  # element by element: not the file the data set was read from
    changed.file_meta = deepcopy(dataset.file_meta)
    for element in dataset:
        changed.add(deepcopy(element))
    for keyword, value in coercion.set:
        setattr(changed, keyword, value)
    for keyword in coercion.remove:
        if keyword in changed:
            delattr(changed, keyword)
    return changed


def _write_dataset(dataset: Dataset, path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        dcmwrite(f, dataset, enforce_file_format=True)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


class Intake:
    """`on_store` of the router's AE. `hand_over(entries)` gives the copies just queued
    to the forwarders of their destinations."""

    def __init__(
        self,
        rules: Sequence[RouteRule],
        queue: RouteQueue,
        hand_over: Callable[[list[Entry]], None],
        *,
        refuse_unrouted: bool = True,
    ) -> None:
        self.rules = rules
        self.queue = queue
        self.hand_over = hand_over
        self.refuse_unrouted = refuse_unrouted
        # Instances received, by outcome: queued, dropped, unrouted (refused or not),
        # full (refused 0xA700), failed (not queued: a disk error), invalid (refused).
        self.outcomes: Counter[str] = Counter()

    async def on_store(self, request: StoreRequest) -> int | tuple[int, str]:
        answer, entries = await anyio.to_thread.run_sync(self._take, request)
        if entries:
            self.hand_over(entries)  # on the event loop, where the forwarders run
        return answer

    def _take(self, request: StoreRequest) -> tuple[int | tuple[int, str], list[Entry]]:
        outcome, answer, entries = self._decide(request)
        self.outcomes[outcome] += 1
        return answer, entries

    def _decide(self, request: StoreRequest) -> tuple[str, int | tuple[int, str], list[Entry]]:
        """(outcome, answer, entries queued)."""
        refusal = request.check()  # it parses, and its UIDs are the request's
        if refusal is not None:
            return "invalid", refusal, []
        decided = self._route(request)
        uid = request.sop_instance_uid
        if decided.dropped:
            log.info("dropped %s from %r by a rule", uid, request.calling_ae_title)
            return "dropped", 0x0000, []
        if not decided.destinations:
            if self.refuse_unrouted:
                log.warning("refused %s from %r: no rule routes it", uid, request.calling_ae_title)
                return "unrouted", (0xC000, "no routing rule sends this instance anywhere"), []
            return "unrouted", 0x0000, []
        try:
            if not self.queue.has_room(decided.destinations):  # before writing anything
                raise QueueFull
            entries = self.queue.put(self._copies(request, decided))
        except QueueFull:  # or filled up (by another node) since
            log.warning("refused %s: a destination's queue is full", uid)
            return "full", (0xA700, "out of resources: a destination's queue is full"), []
        except OSError as exc:
            log.error("could not queue %s: %s", uid, exc)
            return "failed", (0xA700, f"out of resources: {exc.strerror or exc}"[:64]), []
        log.info("queued %s for %s", uid, ", ".join(decided.destinations))
        return "queued", 0x0000, entries

    def _route(self, request: StoreRequest) -> Route:
        association = request.association
        arrival = Arrival(
            request.calling_ae_title,
            association.local_ae_title,
            association.peer_address[0],
            request.sop_class_uid,
        )

        def attribute(keyword: str) -> str | None:
            value = request.dataset.get(keyword)
            return None if value is None else str(value)

        return route(self.rules, arrival, attribute)

    def _copies(self, request: StoreRequest, decided: Route) -> dict[str, Path]:
        copies: dict[str, Path] = {}
        fsync = self.queue.fsync
        as_received = [name for name, coercion in decided.destinations.items() if not coercion]
        if as_received:
            path = self.queue.temp_path()
            # The file is fsynced; its name in `.tmp` need not be: `Queue.put` links it
            # into the destinations' folders and fsyncs those.
            request.spool.save_now(str(path), fsync=fsync, sync_folder=False)
            copies.update(dict.fromkeys(as_received, path))
        written: dict[Coercion, Path] = {}
        for name, coercion in decided.destinations.items():
            if coercion and coercion not in written:
                path = self.queue.temp_path()
                _write_dataset(coerce(request.dataset, coercion), path, fsync)
                written[coercion] = path
            if coercion:
                copies[name] = written[coercion]
        return copies  # durable once `Queue.put` has linked them and fsynced the folders
