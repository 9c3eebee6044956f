"""One async association per connection: the shell around the sans-IO core.

A reader task feeds received bytes to the `UpperLayer` (PS3.8), reassembles DIMSE
messages, hands each response to the request waiting for it (the `Operations` core
says which, by Message ID Being Responded To) and each request to the `Service` that
answers it, in tasks of the association's own task group. Writes go through one
`MessageWriter`. The shell knows no service by name: a service plugs in as a `Service`
(what it accepts, how it answers a request) and, for the SCU, as a subclass of
`BaseAssociation` (what it offers); `dicomnet.services` puts them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import anyio
import anyio.abc

from dicomnet.errors import (
    AssociationAborted,
    DicomNetError,
    DimseTimeout,
    InvalidStateError,
    ProtocolError,
)
from dicomnet.proto.contexts import AcceptedContext, PresentationContext
from dicomnet.proto.dimse import (
    CCancelRQ,
    CommandReceived,
    DatasetFragment,
    DimseMessage,
    MessageAssembler,
    failure_response,
)
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    ExtendedNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.fsm import State
from dicomnet.proto.operations import Operations, Verdict
from dicomnet.proto.pdu import AAssociateAC, AAssociateRQ, AbortSource, PresentationDataValue
from dicomnet.proto.ul import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    DataReceived,
    ReleaseConfirmed,
    ReleaseRequested,
    UpperLayer,
)
from dicomnet.status import Status
from dicomnet.storage import Part10File, Spool
from dicomnet.stream import ByteStream
from dicomnet.writer import MessageWriter

__all__ = [
    "AssociationSettings",
    "BaseAssociation",
    "ExtendedResults",
    "Handlers",
    "Operation",
    "Received",
    "Served",
    "Service",
]

log = logging.getLogger("dicomnet")

RECEIVE_SIZE = 1 << 18
MAX_MEMORY_DATASET = 64 << 20  # a data set kept in memory larger than this is refused
MAX_QUEUED = 16  # requests past the operations window waiting before the reader waits too

_Delivery = tuple[DimseMessage, bytes | None] | BaseException | object


@dataclass(frozen=True, slots=True)
class AssociationSettings:
    """Per-association limits and timeouts (seconds; None: no limit)."""

    max_pdu_length: int = 262_144
    artim_timeout: float = 30.0
    dimse_timeout: float | None = 60.0
    idle_timeout: float | None = None
    spool_threshold: int = 4 << 20
    spool_dir: Path | None = None
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class ExtendedResults:
    """The extended negotiation of one association (PS3.7 Annex D.3.3)."""

    async_operations_window: AsyncOperationsWindowNegotiation = field(
        default_factory=AsyncOperationsWindowNegotiation
    )
    user_identity: UserIdentityNegotiation = field(default_factory=UserIdentityNegotiation)
    sop_class_extended: SOPClassExtendedNegotiations = field(
        default_factory=SOPClassExtendedNegotiations
    )

    def __iter__(self) -> Iterator[ExtendedNegotiation]:
        return iter((self.async_operations_window, self.user_identity, self.sop_class_extended))


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


class Mailbox:
    """A bounded FIFO from the reader to one operation, on plain asyncio futures.

    `put` waits while it is full (backpressure: the reader stops reading the socket);
    `get` raises `anyio.EndOfStream` once it is closed and empty; after
    `close_receiver` nothing more is accepted (`anyio.BrokenResourceError`).
    """

    __slots__ = ("_getter", "_items", "_putters", "_size", "closed", "receiver_closed")

    def __init__(self, size: int) -> None:
        self._items: deque[Any] = deque()
        self._size = size
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        self.closed = False
        self.receiver_closed = False

    async def put(self, item: Any) -> None:
        while len(self._items) >= self._size and not self.receiver_closed:
            waiter = asyncio.get_running_loop().create_future()
            self._putters.append(waiter)
            await waiter
        self.put_nowait(item)

    def put_nowait(self, item: Any) -> None:
        """Add `item` even past the size (for errors that must get through)."""
        if self.receiver_closed or self.closed:
            raise anyio.BrokenResourceError
        self._items.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            if self.closed or self.receiver_closed:
                raise anyio.EndOfStream
            getter = asyncio.get_running_loop().create_future()
            self._getter = getter
            try:
                await getter
            finally:
                self._getter = None
        item = self._items.popleft()
        if self._putters:
            putter = self._putters.popleft()
            if not putter.done():
                putter.set_result(None)
        return item

    def close(self) -> None:
        """No more items will come (what is queued can still be taken)."""
        self.closed = True
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    def close_receiver(self) -> None:
        """Nobody takes items any more: drop them and release waiting writers."""
        self.receiver_closed = True
        self._items.clear()
        while self._putters:
            putter = self._putters.popleft()
            if not putter.done():
                putter.set_result(None)
        self.close()


class Operation:
    """The caller's side of a request this side invoked: where its responses (and, for
    C-GET, the instances of its sub-operations) are delivered. Its state (sent,
    pending, cancelled) is kept by the `Operations` core under `message_id`."""

    __slots__ = ("context", "ended", "final_status", "finished", "mailbox", "message_id")

    def __init__(self, message_id: int, context: AcceptedContext, buffer: int) -> None:
        self.message_id = message_id
        self.context = context
        self.mailbox = Mailbox(buffer)
        self.ended = False
        self.finished = asyncio.Event()
        self.final_status: Status | None = None

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.mailbox.close()
            self.finished.set()


class _Incoming:
    """The data set of a message being received."""

    __slots__ = ("buffer", "event", "spool")

    def __init__(self, event: CommandReceived, spool: Spool | None) -> None:
        self.event = event
        self.spool = spool
        self.buffer = bytearray() if spool is None else None

    def write(self, data: memoryview) -> None:
        if self.spool is not None:
            self.spool.write(data)
        elif self.buffer is not None:
            if len(self.buffer) + len(data) > MAX_MEMORY_DATASET:
                raise ProtocolError("data set larger than 64 MiB in a message kept in memory")
            self.buffer += data


class BaseAssociation:
    """An established association, as requestor (SCU) or acceptor (SCP): the shell.

    Made by `dicomnet.connect()` or by `AE.serve()` (as `dicomnet.Association`, which
    adds the services' requests); not constructed directly.
    """

    def __init__(
        self,
        stream: ByteStream,
        ul: UpperLayer,
        *,
        request: AAssociateRQ,
        response: AAssociateAC,
        contexts: dict[int, AcceptedContext],
        peer_max_pdu_length: int,
        settings: AssociationSettings,
        services: dict[type[Any], Service],
        clock: Callable[[], float],
        handlers: Handlers | None = None,
        peer_address: tuple[str, int] = ("", 0),
        extended: ExtendedResults | None = None,
    ) -> None:
        self._stream = stream
        self._ul = ul
        self.extended = extended or ExtendedResults()
        self.request = request
        self.response = response
        self.contexts = contexts
        self.peer_max_pdu_length = peer_max_pdu_length
        self.settings = settings
        self.handlers = handlers or Handlers()
        self.peer_address = peer_address
        self.is_requestor = ul.is_requestor
        self.clock = clock
        self._services = services
        window = self.extended.async_operations_window
        self._ops = Operations(
            max_invoked=window.invoked,
            max_performed=window.performed,
            dimse_timeout=settings.dimse_timeout,
        )
        self._operations: dict[int, Operation] = {}
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._served: dict[int, Served] = {}
        self._diversions: dict[type[Any], list[Callable[[Any], Awaitable[bool]]]] = {}
        self._writer = MessageWriter(
            stream, peer_max_pdu_length, self._write_unlocked, self._broken_message
        )
        self._assembler = MessageAssembler(self._context_known)
        self._incoming: _Incoming | None = None
        self._closed = asyncio.Event()
        self._error: DicomNetError | None = None
        self._queued: deque[Received] = deque()  # requests past the window, to perform
        self._performed: asyncio.Event | None = None  # set when a request was answered
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stream_closed = False

    # --- identity --------------------------------------------------------------------------

    @property
    def local_ae_title(self) -> str:
        return self.request.calling_ae_title if self.is_requestor else self.request.called_ae_title

    @property
    def peer_ae_title(self) -> str:
        return self.request.called_ae_title if self.is_requestor else self.request.calling_ae_title

    @property
    def is_established(self) -> bool:
        return self._ul.state == State.STA6

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    @property
    def outcome(self) -> str:
        """How the association ended (or 'open')."""
        if not self.is_closed:
            return "open"
        return "released" if self._error is None else str(self._error)

    @property
    def accepted_contexts(self) -> list[AcceptedContext]:
        return list(self.contexts.values())

    @property
    def operations(self) -> Operations:
        """The DIMSE operations core of this association (read it, do not drive it)."""
        return self._ops

    def _context_known(self, context_id: int) -> bool:
        return context_id in self.contexts

    def context_for(
        self, abstract_syntax: str, transfer_syntax: str | None = None, *, scp: bool = False
    ) -> AcceptedContext | None:
        """An accepted context of `abstract_syntax` on which we may invoke as SCU (or,
        with `scp`, as SCP: e.g. N-EVENT-REPORT), in `transfer_syntax` if given."""
        for context in self.contexts.values():
            if context.abstract_syntax == abstract_syntax and (
                context.we_are_scp if scp else context.we_are_scu
            ):
                if transfer_syntax is None or context.transfer_syntax == transfer_syntax:
                    return context
        return None

    def __repr__(self) -> str:
        role = "requestor" if self.is_requestor else "acceptor"
        return (
            f"<Association {role} {self.local_ae_title!r}<->{self.peer_ae_title!r} "
            f"state={self._ul.state.name}>"
        )

    # --- the reader ------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and dispatch until the association ends. Never raises (but cancellation)."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                try:
                    await self._read_loop()
                except Exception as exc:  # a bug of ours: log it, abort, end cleanly
                    log.exception("association reader failed")
                    self._set_error(AssociationAborted(f"internal error: {exc!r}"))
                    await self._abort_now(str(exc))
                finally:
                    self._ended()
                # Handlers of requests received in full run to completion (their data is
                # kept even though no response can be sent any more).
        finally:
            self._ended()
            self._closed.set()

    def _ended(self) -> None:
        """Nothing more is read: end the operations, cancel what is performed."""
        self._discard_incoming()
        if self._ul.state != State.STA1:
            self._ul.connection_lost()
        self._close_stream()
        self._ops.close()
        for operation in list(self._operations.values()):
            operation.end()
        self._operations.clear()
        self._wake_slot_waiters()
        for served in list(self._served.values()):
            served.cancel()
        self._queued.clear()
        self._performed_wake()

    async def _read_loop(self) -> None:
        ul = self._ul
        stream = self._stream
        while True:
            await self._process_events()
            out = ul.data_to_send()
            if out:
                if not await self._write_or_lost(out):
                    continue
                if ul.state == State.STA13 and ul.abort_sent is not None:
                    # We aborted: nothing more to say or hear; close now (PS3.8 AA-1/AA-8).
                    ul.connection_lost()
                    continue
            if ul.state == State.STA1:
                return
            deadline = self._next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            data = await stream.receive(RECEIVE_SIZE, timeout)
            if data is None:
                self._handle_timers()
                continue
            ul.receive_data(data, self.clock())

    def _next_deadline(self) -> float | None:
        ul_deadline = self._ul.get_timer()
        dimse_deadline = self._ops.get_timer()
        if ul_deadline is None or dimse_deadline is None:
            return dimse_deadline if ul_deadline is None else ul_deadline
        return min(ul_deadline, dimse_deadline)

    def _rearm(self) -> None:
        """A timer was started outside the reader: shorten the reader's wait to match."""
        deadline = self._next_deadline()
        if deadline is not None:
            self._stream.reschedule(deadline - self.clock())

    def _handle_timers(self) -> None:
        now = self.clock()
        expired = self._ops.expired(now)
        if expired:
            error = DimseTimeout(
                f"no DIMSE response within {self.settings.dimse_timeout:g} s "
                f"(message IDs {sorted(expired)})"
            )
            self._set_error(error)
            for message_id in expired:
                operation = self._operations.pop(message_id, None)
                if operation is not None:
                    try:
                        operation.mailbox.put_nowait(error)
                    except anyio.BrokenResourceError:
                        pass
                    operation.end()
            self._ul.request_abort(now, str(error))  # the A-ABORT is written by the read loop
            return
        self._ul.handle_timer(now)

    async def _process_events(self) -> None:
        ul = self._ul
        while True:
            event = ul.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, DataReceived):
                try:
                    for pdv in event.pdu.values:
                        await self._on_pdv(pdv)
                except ProtocolError as exc:
                    log.warning("%r: %s; aborting", self, exc)
                    self._set_error(exc)
                    self._discard_incoming()
                    ul.request_abort(self.clock(), str(exc))
            elif isinstance(event, ReleaseRequested):
                log.debug("%r: peer requested release", self)
                if event.collision and self.is_requestor:
                    await self._write_or_lost(ul.release_response(self.clock()))
                elif not event.collision:
                    assert self._task_group is not None
                    self._task_group.start_soon(self._answer_release)
            elif isinstance(event, ReleaseConfirmed):
                if ul.state == State.STA12:
                    await self._write_or_lost(ul.release_response(self.clock()))
            elif isinstance(event, Aborted):
                self._on_aborted(event)
            elif isinstance(event, ConnectionClosed):
                self._discard_incoming()

    def _on_aborted(self, event: Aborted) -> None:
        self._discard_incoming()
        if event.local:
            if event.error:
                log.warning("%r: aborting: %s", self, event.error)
            if event.source == AbortSource.SERVICE_PROVIDER:
                # AA-8: the peer sent an invalid or unexpected PDU.
                self._set_error(ProtocolError(event.error or "invalid PDU received"))
            else:
                text = "association aborted locally"
                self._set_error(
                    AssociationAborted(
                        f"{text}: {event.error}" if event.error else text,
                        event.source,
                        event.reason,
                    )
                )
        else:
            who = {0: "peer (service-user)", 2: "service-provider"}.get(event.source, "peer")
            text = f"association aborted by {who}"
            if event.error:
                text += f": {event.error}"
            log.debug("%r: %s", self, text)
            self._set_error(AssociationAborted(text, event.source, event.reason))

    def _set_error(self, error: DicomNetError) -> None:
        if self._error is None:
            self._error = error

    def _discard_incoming(self) -> None:
        if self._incoming is not None and self._incoming.spool is not None:
            self._incoming.spool.discard()
        self._incoming = None

    async def _answer_release(self) -> None:
        """A-RELEASE-RP once every request being performed was answered (PS3.8 §7.2)."""
        while (self._ops.performing or self._queued) and not self.is_closed:
            await self._wait_performed()
        try:
            await self._write_or_lost(self._ul.release_response(self.clock()))
        except InvalidStateError:
            pass

    def _close_stream(self) -> None:
        if not self._stream_closed:
            self._stream_closed = True
            self._stream.close()

    # --- receiving DIMSE -------------------------------------------------------------------

    async def _on_pdv(self, pdv: PresentationDataValue) -> None:
        event = self._assembler.feed(pdv)
        if event is None:
            return
        if isinstance(event, CommandReceived):
            message = event.message
            log.debug("%r: received %s", self, message)
            if isinstance(message, CCancelRQ):
                self._cancel_requested(message.message_id_being_responded_to)
                return
            if not event.has_dataset:
                if message.is_request:
                    await self._dispatch(Received(self.contexts[event.context_id], message))
                else:
                    await self._deliver(message, None)
                return
            self._incoming = _Incoming(event, self._sink_for(event))
            return
        assert isinstance(event, DatasetFragment)
        incoming = self._incoming
        if incoming is None:  # pragma: no cover - the assembler guarantees order
            raise ProtocolError("data set fragment without a command")
        incoming.write(event.data)
        if not event.is_last:
            return
        self._incoming = None
        message = incoming.event.message
        if not message.is_request:
            await self._deliver(message, bytes(incoming.buffer or b""))
            return
        context = self.contexts[incoming.event.context_id]
        if incoming.spool is not None:
            incoming.spool.finish()
            await self._dispatch(Received(context, message, spool=incoming.spool))
        else:
            await self._dispatch(Received(context, message, bytes(incoming.buffer or b"")))

    def _sink_for(self, event: CommandReceived) -> Spool | None:
        message = event.message
        if not message.is_request:
            return None
        service = self._services.get(type(message))
        if service is None:
            return None
        return service.dataset_sink(self, self.contexts[event.context_id], message)

    def _cancel_requested(self, message_id: int) -> None:
        """C-CANCEL-RQ (PS3.7 §9.3.2.3): stop the request it names, if it is performed."""
        if self._ops.cancel_requested(message_id):
            served = self._served.get(message_id)
            if served is not None:
                served.cancel()

    async def _deliver(self, message: DimseMessage, data: bytes | None) -> None:
        message_id: int = getattr(message, "message_id_being_responded_to", -1)
        status = Status(getattr(message, "status", 0))
        verdict = self._ops.response(message_id, not status.is_pending, self.clock())
        if verdict is Verdict.UNKNOWN:
            log.warning("%r: response to unknown message ID %s ignored", self, message_id)
            return
        operation = self._operations.get(message_id)
        if operation is None:  # pragma: no cover - the core and the shell agree
            return
        if verdict is Verdict.DELIVER or verdict is Verdict.FINAL:
            try:
                await operation.mailbox.put((message, data))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        if verdict is Verdict.FINAL or verdict is Verdict.DROP_FINAL:
            operation.final_status = status
            self._end_operation(operation)

    async def _dispatch(self, request: Received) -> None:
        message = request.message
        message_id: int = getattr(message, "message_id", 0)
        if not self._ops.can_perform:
            # The peer invoked more than the window it negotiated (PS3.7 §D.3.3.3): the
            # request waits for room; past a few, so does the reader.
            self._queued.append(request)
            while len(self._queued) > MAX_QUEUED and not self.is_closed:
                await self._wait_performed()
            return
        if not self._ops.perform(message_id):
            await self._refuse(request, 0x0210, "duplicate invocation: message ID in use")
            return
        service = self._services.get(type(message))
        if service is not None and service.inline and self._ops.max_performed == 1:
            # One operation at a time (PS3.7 §D.3.3.3): the peer waits for this answer
            # anyway, so serve it right here instead of in a task of its own.
            await self._serve(service, request)
        else:
            assert self._task_group is not None
            self._task_group.start_soon(self._serve, service, request)

    async def _serve(self, service: Service | None, request: Received) -> None:
        message = request.message
        message_id: int = getattr(message, "message_id", 0)
        try:
            if service is None:
                await self._refuse(request, 0x0211, "unrecognized operation")
            else:
                await service.serve(self, request)
        except DicomNetError as exc:
            log.debug("%r: could not answer %s: %s", self, type(message).__name__, exc)
        except Exception as exc:  # a bug of ours: answer it a failure, go on
            log.exception("%r: answering %s failed", self, type(message).__name__)
            await self._refuse_quietly(request, 0x0110, f"{type(exc).__name__}: {exc}")
        finally:
            if request.spool is not None:
                request.spool.close()
            self._served.pop(message_id, None)
            self._ops.performed(message_id)
            self._performed_wake()

    def _performed_wake(self) -> None:
        """A request was answered: start a queued one, wake who waits for room."""
        if self._queued and self._ops.can_perform and self._task_group is not None:
            self._task_group.start_soon(self._dispatch, self._queued.popleft())
        event = self._performed
        if event is not None:
            self._performed = None
            event.set()

    async def _wait_performed(self) -> None:
        if self._performed is None:
            self._performed = asyncio.Event()
        await self._performed.wait()

    async def _refuse(self, request: Received, status: int, comment: str) -> None:
        message = request.message
        log.info("%r: %s refused: %s", self, type(message).__name__, comment)
        await self.send_message(
            request.context.context_id, failure_response(message, status, comment)
        )

    async def _refuse_quietly(self, request: Received, status: int, comment: str) -> None:
        try:
            await self._refuse(request, status, comment)
        except DicomNetError:
            pass

    @asynccontextmanager
    async def divert(
        self, message_type: type[Any], diversion: Callable[[Any], Awaitable[bool]]
    ) -> AsyncIterator[None]:
        """While the block runs, the requests of `message_type` a service offers to
        `diverted()` go to `diversion` first (it returns True when it took one): how a
        C-GET receives its C-STORE sub-operations, and a storage commitment request its
        report on the same association."""
        self.add_diversion(message_type, diversion)
        try:
            yield
        finally:
            self.remove_diversion(message_type, diversion)

    def add_diversion(
        self, message_type: type[Any], diversion: Callable[[Any], Awaitable[bool]]
    ) -> None:
        """`divert` without a block: until `remove_diversion`."""
        self._diversions.setdefault(message_type, []).append(diversion)

    def remove_diversion(
        self, message_type: type[Any], diversion: Callable[[Any], Awaitable[bool]]
    ) -> None:
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

    def cancellable(self, message_id: int) -> Served:
        """The handle by which a C-CANCEL reaches the request `message_id` being performed."""
        served = Served()
        self._served[message_id] = served
        if self.is_closed:
            served.cancel()
        return served

    # --- sending ---------------------------------------------------------------------------

    async def _write_or_lost(self, data: bytes) -> bool:
        """Write what the Upper Layer produced; a dead connection becomes Evt17."""
        if not data:
            return True
        try:
            async with self._writer.lock:
                await self._write_unlocked(data)
        except DicomNetError:
            self._ul.connection_lost()
            return False
        return True

    async def _write_unlocked(self, data: bytes | bytearray) -> None:
        try:
            await self._stream.send(data)
            self._ul.note_activity(self.clock())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._set_error(AssociationAborted(f"connection lost while sending: {exc!r}"))
            raise self.termination_error() from exc

    def _check_can_send(self) -> None:
        if not self._ul.can_send_data:
            raise self.termination_error()

    def termination_error(self) -> DicomNetError:
        """Why nothing more can be done on this association."""
        if self._error is not None:
            return self._error
        return AssociationAborted(f"association is not established ({self._ul.state.name})")

    async def send_message(
        self, context_id: int, message: DimseMessage, dataset: bytes | memoryview | None = None
    ) -> None:
        """Send one DIMSE message (and its data set) as P-DATA-TF PDUs."""
        log.debug("%r: sending %s", self, message)
        await self._writer.send(context_id, message, dataset, self._check_can_send)

    async def send_file_message(
        self,
        context_id: int,
        message: DimseMessage,
        part10: Part10File,
        progress: Callable[[int, int], Any] | None = None,
    ) -> None:
        """Send one message whose data set is streamed from a Part-10 file."""
        log.debug("%r: sending %s from %s", self, message, part10.path)
        await self._writer.send_file(context_id, message, part10, progress, self._check_can_send)

    async def _broken_message(self, exc: BaseException) -> None:
        """A message was cut short after part of it went out: abort the association."""
        if isinstance(exc, DicomNetError) and self._stream_closed:
            return
        self._set_error(AssociationAborted(f"sending a message failed: {exc!r}"))
        with anyio.CancelScope(shield=True):
            await self._abort_now(str(exc))
            self._close_stream()

    # --- requests (SCU) --------------------------------------------------------------------

    async def begin(self, context: AcceptedContext, buffer: int = 4) -> Operation:
        """Reserve a slot of the operations window and a Message ID for a new request."""
        while True:
            if self.is_closed:
                raise self.termination_error()
            if self._ops.can_invoke:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            await waiter
        operation = Operation(self._ops.invoke(), context, buffer)
        self._operations[operation.message_id] = operation
        return operation

    def started(self, operation: Operation) -> None:
        """The request went out: the DIMSE timeout runs from now."""
        if self._ops.is_outstanding(operation.message_id):
            self._ops.sent(operation.message_id, self.clock())
            self._rearm()

    async def next_response(self, operation: Operation) -> tuple[DimseMessage, bytes | None]:
        """The next response (pending or final) to `operation`."""
        delivery = await self.next_delivery(operation)
        if not isinstance(delivery, tuple):  # pragma: no cover - only C-GET gets others
            raise ProtocolError(f"unexpected {type(delivery).__name__} for a request")
        return delivery

    async def next_delivery(self, operation: Operation) -> Any:
        """The next item for `operation`: a (response, data set bytes) pair, or what a
        diversion put there (a C-GET's instances)."""
        try:
            delivery: _Delivery = await operation.mailbox.get()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self.termination_error() from None
        if isinstance(delivery, BaseException):
            raise delivery
        return delivery

    async def cancel(self, operation: Operation) -> None:
        """Abandon `operation`: send C-CANCEL-RQ (PS3.7 §9.3.2.3) unless it is over.

        The reader drops the responses still to come and frees the slot at the final one.
        """
        operation.mailbox.close_receiver()
        if not self._ops.cancel(operation.message_id):
            self._forget_if_over(operation)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.send_message(
                    operation.context.context_id, CCancelRQ(operation.message_id)
                )
            except DicomNetError as exc:
                log.debug("%r: could not send C-CANCEL: %s", self, exc)

    def abandon(self, operation: Operation) -> None:
        """The caller left before the final response: drop what still comes."""
        if operation.ended:
            return
        operation.mailbox.close_receiver()
        self._ops.abandon(operation.message_id)
        self._forget_if_over(operation)

    def _forget_if_over(self, operation: Operation) -> None:
        if not self._ops.is_outstanding(operation.message_id):
            self._end_operation(operation)

    def _end_operation(self, operation: Operation) -> None:
        self._operations.pop(operation.message_id, None)
        operation.end()
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not self.is_closed:
                    return

    async def send_request(
        self,
        context: AcceptedContext,
        make: Callable[[int], DimseMessage],
        send: Callable[[DimseMessage], Awaitable[None]],
    ) -> tuple[DimseMessage, bytes | None]:
        """Send one request (`make(message_id)`, sent by `send`) and wait for its final
        response, skipping pending ones."""
        operation = await self.begin(context)
        try:
            await send(make(operation.message_id))
            self.started(operation)
            while True:
                response, data = await self.next_response(operation)
                if not Status(getattr(response, "status", 0)).is_pending:
                    return response, data
        finally:
            self.abandon(operation)

    # --- release and abort -----------------------------------------------------------------

    async def release(self) -> None:
        """A-RELEASE (PS3.8 §7.2): ask the peer to release and wait until it has.

        Operations still outstanding are waited for first (at most the DIMSE timeout)."""
        if self.is_closed:
            return
        await self._drain_invoked()
        async with self._writer.lock:
            if self._ul.state != State.STA6:
                return
            data = self._ul.release(self.clock())
            self._rearm()
            try:
                await self._write_unlocked(data)
            except DicomNetError:
                pass
        await self._closed.wait()

    async def _drain_invoked(self) -> None:
        timeout = self.settings.dimse_timeout
        with anyio.move_on_after(timeout if timeout is not None else 60.0):
            for operation in list(self._operations.values()):
                await operation.finished.wait()

    async def abort(self) -> None:
        """A-ABORT (PS3.8 §7.3): end the association at once."""
        if self.is_closed:
            return
        with anyio.CancelScope(shield=True):
            self._set_error(AssociationAborted("association aborted locally"))
            data = self._ul.abort(self.clock())
            if data:
                try:
                    await self._stream.send(data)
                except Exception:
                    pass
            self._ul.connection_lost()
            self._close_stream()

    async def _abort_now(self, error: str) -> None:
        data = self._ul.abort(self.clock(), error)
        if data:
            try:
                await self._stream.send(data)
            except Exception:
                pass
        self._ul.connection_lost()

    async def wait_closed(self) -> None:
        await self._closed.wait()
