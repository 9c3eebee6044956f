"""The requests the peer invokes on an association: each to the service that answers it.

A `Performer` starts each request (in a task of the association, or on the reader
itself when the peer may invoke one operation at a time), keeps the asynchronous
operations window (requests past it wait their turn), answers a duplicate Message ID
0x0210 and an unknown command 0x0211, lets a C-CANCEL reach the request it names,
and offers received requests to diversions first (a C-GET's sub-operations, a storage
commitment report we wait for).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio
import anyio.abc

from dicomnet.errors import DicomNetError
from dicomnet.observe import SCP
from dicomnet.proto.contexts import AcceptedContext, PresentationContext
from dicomnet.proto.dimse import DimseMessage, failure_response
from dicomnet.proto.operations import Operations
from dicomnet.storage import Spool

if TYPE_CHECKING:
    from dicomnet.association import BaseAssociation

__all__ = ["Handlers", "Performer", "Received", "Served", "Service", "ServiceBase"]

log = logging.getLogger("dicomnet")

MAX_QUEUED = 16  # requests past the operations window waiting before the reader waits too
Diversion = Callable[[Any], Awaitable[bool]]


Connector = Callable[..., Any]  # `dicomnet.connect`, or what stands in for it


class Handlers:
    """What an AE performs: handlers kept by each service under keys of its own, the
    AE's peer table, and how to open an association to a peer (for the services that
    send something elsewhere: C-MOVE sub-operations, storage commitment reports)."""

    def __init__(self) -> None:
        self._table: dict[Hashable, Any] = {}
        self.version = 0  # changes with every handler set: what is negotiated follows it
        self.peer_address: Callable[[str], tuple[str, int] | None] = lambda aet: None
        self.connect: Connector | None = None

    def get(self, key: Hashable) -> Any:
        return self._table.get(key)

    def set(self, key: Hashable, handler: Any) -> None:
        self._table[key] = handler
        self.version += 1

    def keys(self) -> list[Hashable]:
        return list(self._table)


@dataclass(slots=True)
class Received:
    """A request received in full: its context, command, and data set (kept in
    memory as `data`, or spooled by the service's `dataset_sink`)."""

    context: AcceptedContext
    message: DimseMessage
    data: bytes | None = None
    spool: Spool | None = None


class Service(Protocol):
    """One DIMSE service, as the association and the AE see it.

    `requests`: the request messages it answers. `inline`: it may be answered on the
    reader itself while the peer may invoke one operation at a time (no task). The AE
    asks `contexts()` what to accept for it, given the handlers it has.
    """

    requests: ClassVar[tuple[type[Any], ...]]
    inline: ClassVar[bool]

    def contexts(
        self, handlers: Handlers, models: tuple[str, ...]
    ) -> dict[str, PresentationContext]: ...

    def dataset_sink(
        self, association: BaseAssociation, context: AcceptedContext, message: Any
    ) -> Spool | None:
        """Where the request's data set goes: a spool, or None to keep it in memory."""
        ...

    async def serve(self, association: BaseAssociation, request: Received) -> None:
        """Answer the request (send its response or responses)."""
        ...


class ServiceBase:
    """Defaults for a `Service`: answered in a task of its own, data sets in memory."""

    inline: ClassVar[bool] = False

    def dataset_sink(
        self, association: BaseAssociation, context: AcceptedContext, message: Any
    ) -> Spool | None:
        return None


@dataclass
class Served:
    """A request being performed, so that C-CANCEL (or the end of the association)
    reaches it: `cancelled` is set and the scope the handler runs in is cancelled."""

    cancelled: bool = False
    scope: anyio.CancelScope | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class Performer:
    """The requests performed on one association."""

    def __init__(
        self,
        association: BaseAssociation,
        ops: Operations,
        services: dict[type[Any], Service],
    ) -> None:
        self._association = association
        self.ops = ops
        self._services = services
        self._served: dict[int, Served] = {}
        self._diversions: dict[type[Any], list[Diversion]] = {}
        self._queued: deque[Received] = deque()  # past the window, to perform
        self._performed: asyncio.Event | None = None  # set when a request was answered
        self.task_group: anyio.abc.TaskGroup | None = None

    def dataset_sink(self, context: AcceptedContext, message: DimseMessage) -> Spool | None:
        """Where the data set of a request goes (its service says; None: memory)."""
        service = self._services.get(type(message))
        if service is None:
            return None
        return service.dataset_sink(self._association, context, message)

    async def dispatch(self, request: Received) -> None:
        message = request.message
        message_id: int = getattr(message, "message_id", 0)
        if not self.ops.can_perform:
            # The peer invoked more than the window it negotiated (PS3.7 §D.3.3.3): the
            # request waits for room; past a few, so does the reader.
            self._queued.append(request)
            while len(self._queued) > MAX_QUEUED and not self._association.is_closed:
                await self.wait_performed()
            return
        if not self.ops.perform(message_id):
            await self._refuse(request, 0x0210, "duplicate invocation: message ID in use")
            return
        service = self._services.get(type(message))
        if service is not None and service.inline and self.ops.max_performed == 1:
            # One operation at a time (PS3.7 §D.3.3.3): the peer waits for this answer
            # anyway, so serve it right here instead of in a task of its own.
            await self._serve(service, request)
        else:
            assert self.task_group is not None
            self.task_group.start_soon(self._serve, service, request)

    async def _serve(self, service: Service | None, request: Received) -> None:
        message = request.message
        message_id: int = getattr(message, "message_id", 0)
        association = self._association
        if association.audit is not None:
            association.audit.performing(message_id, request)
        tracker = association.tracker
        if tracker is not None:
            size = request.spool.size if request.spool is not None else len(request.data or b"")
            tracker.start(message, SCP, request.context.abstract_syntax, size)
        try:
            if service is None:
                await self._refuse(request, 0x0211, "unrecognized operation")
            else:
                await service.serve(association, request)
        except DicomNetError as exc:
            log.debug("%r: could not answer %s: %s", association, type(message).__name__, exc)
        except Exception as exc:  # a bug of ours: answer it a failure, go on
            log.exception("%r: answering %s failed", association, type(message).__name__)
            await self._refuse_quietly(request, 0x0110, f"{type(exc).__name__}: {exc}")
        finally:
            if request.spool is not None:
                request.spool.close()
            self._served.pop(message_id, None)
            if association.audit is not None:
                association.audit.performed(message_id)
            if tracker is not None:
                tracker.performed(message_id)
            self.ops.performed(message_id)
            self._wake()

    def _wake(self) -> None:
        """A request was answered: start a queued one, wake who waits for room."""
        if self._queued and self.ops.can_perform and self.task_group is not None:
            self.task_group.start_soon(self.dispatch, self._queued.popleft())
        event = self._performed
        if event is not None:
            self._performed = None
            event.set()

    async def wait_performed(self) -> None:
        """Until the next request is answered."""
        if self._performed is None:
            self._performed = asyncio.Event()
        await self._performed.wait()

    async def idle(self) -> None:
        """Until every request received was answered (before A-RELEASE-RP, PS3.8 §7.2)."""
        while (self.ops.performing or self._queued) and not self._association.is_closed:
            await self.wait_performed()

    async def _refuse(self, request: Received, status: int, comment: str) -> None:
        message = request.message
        log.info("%r: %s refused: %s", self._association, type(message).__name__, comment)
        await self._association.send_message(
            request.context.context_id, failure_response(message, status, comment)
        )

    async def _refuse_quietly(self, request: Received, status: int, comment: str) -> None:
        try:
            await self._refuse(request, status, comment)
        except DicomNetError:
            pass

    def cancel_requested(self, message_id: int) -> None:
        """C-CANCEL-RQ (PS3.7 §9.3.2.3): stop the request it names, if it is performed."""
        if self.ops.cancel_requested(message_id):
            served = self._served.get(message_id)
            if served is not None:
                served.cancel()

    def cancellable(self, message_id: int) -> Served:
        """The handle by which a C-CANCEL reaches the request `message_id` being performed."""
        served = Served()
        self._served[message_id] = served
        if self._association.is_closed:
            served.cancel()
        return served

    @asynccontextmanager
    async def divert(self, message_type: type[Any], diversion: Diversion) -> AsyncIterator[None]:
        """While the block runs, the requests of `message_type` a service offers to
        `diverted()` go to `diversion` first (it returns True when it took one)."""
        self.add_diversion(message_type, diversion)
        try:
            yield
        finally:
            self.remove_diversion(message_type, diversion)

    def add_diversion(self, message_type: type[Any], diversion: Diversion) -> None:
        self._diversions.setdefault(message_type, []).append(diversion)

    def remove_diversion(self, message_type: type[Any], diversion: Diversion) -> None:
        diversions = self._diversions.get(message_type, [])
        if diversion in diversions:
            diversions.remove(diversion)

    async def diverted(self, message: DimseMessage, item: Any) -> bool:
        """Offer a received request (`item`: the service's request object) to the
        diversions of its type; True when one took it."""
        for diversion in list(self._diversions.get(type(message), ())):
            if await diversion(item):
                return True
        return False

    def close(self) -> None:
        """The association ended: what is performed is cancelled, what waits is dropped."""
        for served in list(self._served.values()):
            served.cancel()
        self._queued.clear()
        self._wake()
