"""One async `Association` per TCP connection: the shell around the sans-IO core.

A reader task feeds received bytes to the `UpperLayer`, reassembles DIMSE messages,
routes responses to the waiting request by Message ID Being Responded To, and runs
SCP handlers in tasks of the association's own task group. Writes go through one
lock so that a message's PDUs are never interleaved with another's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnet.errors import (
    AssociationAborted,
    DicomNetError,
    DimseError,
    DimseTimeout,
    InvalidStateError,
    NotNegotiatedError,
    ProtocolError,
)
from dicomnet.proto.contexts import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    VERIFICATION,
    AcceptedContext,
)
from dicomnet.proto.dimse import (
    CCancelRQ,
    CEchoRQ,
    CEchoRSP,
    CFindRQ,
    CGetRQ,
    CMoveRQ,
    CommandReceived,
    CStoreRQ,
    CStoreRSP,
    DatasetFragment,
    DimseMessage,
    MessageAssembler,
    MessageIDs,
    OutstandingRequests,
    encode_command,
    encode_command_pdus,
    encode_small_message,
    fragment,
    max_pdv_data,
    pdata_into,
)
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    ExtendedNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.fsm import State
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
from dicomnet.qr import (
    Responses,
    RetrieveListener,
    RetrieveProgress,
    Served,
    serve_find,
    serve_retrieve,
)
from dicomnet.qr import find as _find
from dicomnet.qr import get as _get
from dicomnet.qr import move as _move
from dicomnet.qr import retrieve as _retrieve
from dicomnet.service import EchoRequest, StoreRequest
from dicomnet.status import Status
from dicomnet.storage import (
    DatasetReader,
    Part10File,
    Spool,
    encode_dataset,
    is_valid_uid,
    part10_header,
)
from dicomnet.stream import DicomStream

__all__ = ["Association", "AssociationSettings", "ExtendedResults", "Handlers"]

log = logging.getLogger("dicomnet")

SEND_BATCH = 1 << 20  # bytes per socket write when streaming a data set
SMALL_MESSAGE = 1 << 16  # data sets below this go in the command's P-DATA-TF PDU if they fit
RECEIVE_SIZE = 1 << 18
MAX_RESPONSE_DATASET = 64 << 20  # a response identifier larger than this is refused

Handler = Callable[..., Any]
_Delivery = tuple[DimseMessage, bytes | None] | StoreRequest | BaseException


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


@dataclass(slots=True)
class Handlers:
    """The SCP handlers an association dispatches requests to."""

    on_echo: Handler | None = None
    on_store: Handler | None = None
    on_find: Handler | None = None
    on_move: Handler | None = None
    on_get: Handler | None = None
    # Move destination AE title -> (host, port), or None when unknown.
    move_destination: Callable[[str], tuple[str, int] | None] | None = None


def _store_status(result: Any) -> tuple[int, str | None]:
    if result is None:
        return 0x0000, None
    if isinstance(result, tuple):
        status, comment = result
        return int(status), (str(comment) if comment is not None else None)
    return int(result), None


def _comment(exc: BaseException) -> str:
    # Error Comment is LO: at most 64 characters (PS3.7 Annex C).
    text = f"{type(exc).__name__}: {exc}"
    return text[:64]


class _Incoming:
    """The data set of a message being received."""

    __slots__ = ("buffer", "event", "spool", "status")

    def __init__(self, event: CommandReceived, spool: Spool | None) -> None:
        self.event = event
        self.spool = spool
        self.buffer = bytearray() if spool is None else None
        self.status: tuple[int, str] | None = None  # a refusal decided before the data set ends

    def write(self, data: memoryview) -> None:
        if self.spool is not None:
            self.spool.write(data)
        elif self.buffer is not None:
            if len(self.buffer) + len(data) > MAX_RESPONSE_DATASET:
                raise ProtocolError("response data set larger than 64 MiB")
            self.buffer += data


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
    """A request this side invoked, keyed by its Message ID (PS3.7 §9.1).

    Request sent, then pending responses, then the final one; or abandoned after a
    C-CANCEL, in which case the reader drops the remaining responses. The operation
    holds one slot of the asynchronous operations window until its final response.
    """

    __slots__ = (
        "_release",
        "abandoned",
        "context",
        "ended",
        "final_status",
        "finished",
        "mailbox",
        "message_id",
    )

    def __init__(
        self,
        message_id: int,
        context: AcceptedContext,
        buffer: int,
        release: Callable[[Operation], None],
    ) -> None:
        self.message_id = message_id
        self.context = context
        self.mailbox = Mailbox(buffer)
        self.abandoned = False
        self.ended = False
        self.finished = asyncio.Event()
        self.final_status: Status | None = None
        self._release = release

    def end(self) -> None:
        """The final response arrived (or the association ended): free the slot and ID."""
        if not self.ended:
            self.ended = True
            self.mailbox.close()
            self._release(self)
            self.finished.set()


class Association:
    """An established association, as requestor (SCU) or acceptor (SCP).

    Made by `dicomnet.connect()` or by `AE.serve()`; not constructed directly.
    """

    def __init__(
        self,
        stream: DicomStream,
        ul: UpperLayer,
        *,
        request: AAssociateRQ,
        response: AAssociateAC,
        contexts: dict[int, AcceptedContext],
        peer_max_pdu_length: int,
        settings: AssociationSettings,
        handlers: Handlers | None = None,
        peer_address: tuple[str, int] = ("", 0),
        clock: Callable[[], float] = time.monotonic,
        extended: ExtendedResults | None = None,
    ) -> None:
        self._stream = stream
        self.extended = extended or ExtendedResults()
        self._ul = ul
        self.request = request
        self.response = response
        self.contexts = contexts
        self.peer_max_pdu_length = peer_max_pdu_length
        self.settings = settings
        self.handlers = handlers or Handlers()
        self.peer_address = peer_address
        self.is_requestor = ul.is_requestor
        self._clock = clock
        self._send_lock = asyncio.Lock()
        self._ids = MessageIDs()
        self._outstanding = OutstandingRequests(settings.dimse_timeout, clock)
        self._operations: dict[int, Operation] = {}
        self._served: dict[int, Served] = {}
        self._retrieve_sinks: list[Operation] = []
        window = self.extended.async_operations_window.invoked
        self._slots = asyncio.Semaphore(window if window > 0 else 0xFFFF)
        self._assembler = MessageAssembler(self._context_known)
        self._incoming: _Incoming | None = None
        self._closed = asyncio.Event()
        self._error: DicomNetError | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None  # set when nothing is in flight any more
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

    def _context_known(self, context_id: int) -> bool:
        return context_id in self.contexts

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
                    self._discard_incoming()
                    await self._close_stream()
                    for operation in list(self._operations.values()):
                        operation.end()
                    for served in list(self._served.values()):
                        served.cancel()
                # Handlers of requests received in full run to completion (their data is
                # kept even though no response can be sent any more).
        finally:
            await self._finish()

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
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            data = await stream.receive(RECEIVE_SIZE, timeout)
            if data is None:
                self._handle_timers()
                continue
            ul.receive_data(data)

    def _next_deadline(self) -> float | None:
        ul_deadline = self._ul.get_timer()
        dimse_deadline = self._outstanding.get_timer()
        if ul_deadline is None or dimse_deadline is None:
            return dimse_deadline if ul_deadline is None else ul_deadline
        return min(ul_deadline, dimse_deadline)

    def _rearm(self) -> None:
        """A timer was started outside the reader: shorten the reader's wait to match."""
        deadline = self._next_deadline()
        if deadline is not None:
            self._stream.reschedule(deadline - self._clock())

    def _handle_timers(self) -> None:
        expired = self._outstanding.expired()
        if expired:
            error = DimseTimeout(
                f"no DIMSE response within {self.settings.dimse_timeout:g} s "
                f"(message IDs {sorted(expired)})"
            )
            self._set_error(error)
            for message_id in expired:
                self._outstanding.responded(message_id, final=True)
                operation = self._operations.get(message_id)
                if operation is not None:
                    try:
                        operation.mailbox.put_nowait(error)
                    except anyio.BrokenResourceError:
                        pass
            self._ul.request_abort(str(error))  # the A-ABORT is written by the read loop
            return
        self._ul.handle_timer()

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
                    ul.request_abort(str(exc))
            elif isinstance(event, ReleaseRequested):
                log.debug("%r: peer requested release", self)
                if event.collision and self.is_requestor:
                    await self._write_or_lost(ul.release_response())
                elif not event.collision:
                    assert self._task_group is not None
                    self._task_group.start_soon(self._answer_release)
            elif isinstance(event, ReleaseConfirmed):
                if ul.state == State.STA12:
                    await self._write_or_lost(ul.release_response())
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
        if self._in_flight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()
        try:
            await self._write_or_lost(self._ul.release_response())
        except InvalidStateError:
            pass

    def _serve_cancellable(self, message_id: int) -> Served:
        served = Served()
        self._served[message_id] = served
        if self.is_closed:
            served.cancel()
        return served

    async def _finish(self) -> None:
        for served in list(self._served.values()):
            served.cancel()
        self._discard_incoming()
        if self._ul.state != State.STA1:
            self._ul.connection_lost()
        for operation in list(self._operations.values()):
            operation.end()
        await self._close_stream()
        self._closed.set()

    async def _close_stream(self) -> None:
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
                served = self._served.get(message.message_id_being_responded_to)
                if served is not None:
                    served.cancel()
                return
            if not event.has_dataset:
                if message.is_request:
                    await self._dispatch(event, None)
                else:
                    await self._deliver(message, None)
                return
            self._incoming = _Incoming(event, self._spool_for(event))
            return
        assert isinstance(event, DatasetFragment)
        incoming = self._incoming
        if incoming is None:  # pragma: no cover - the assembler guarantees order
            raise ProtocolError("data set fragment without a command")
        incoming.write(event.data)
        if not event.is_last:
            return
        self._incoming = None
        if incoming.spool is not None:
            incoming.spool.finish()
            await self._dispatch(incoming.event, incoming)
        elif incoming.event.message.is_request:
            await self._dispatch(incoming.event, incoming)
        else:
            await self._deliver(incoming.event.message, bytes(incoming.buffer or b""))

    def _spool_for(self, event: CommandReceived) -> Spool | None:
        message = event.message
        if not isinstance(message, CStoreRQ):
            return None
        context = self.contexts[event.context_id]
        if not is_valid_uid(message.affected_sop_instance_uid) or not is_valid_uid(
            message.affected_sop_class_uid
        ):
            return _NullSpool(b"", 0)
        header = part10_header(
            message.affected_sop_class_uid,
            message.affected_sop_instance_uid,
            context.transfer_syntax,
            self.peer_ae_title,
        )
        return Spool(header, self.settings.spool_threshold, self.settings.spool_dir)

    async def _deliver(self, message: DimseMessage, data: bytes | None) -> None:
        message_id = getattr(message, "message_id_being_responded_to", -1)
        operation = self._operations.get(message_id)
        if operation is None:
            log.warning("%r: response to unknown message ID %s ignored", self, message_id)
            return
        status = Status(getattr(message, "status", 0))
        final = not status.is_pending
        self._outstanding.responded(message_id, final)
        if final:
            operation.final_status = status
        if not operation.abandoned:
            try:
                await operation.mailbox.put((message, data))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        if final:
            operation.end()

    async def _dispatch(self, event: CommandReceived, incoming: _Incoming | None) -> None:
        assert self._task_group is not None
        self._in_flight += 1
        if (
            isinstance(event.message, (CEchoRQ, CStoreRQ))
            and self.extended.async_operations_window.performed == 1
        ):
            # One operation at a time (PS3.7 §D.3.3.3): the peer waits for this answer
            # anyway, so serve it right here instead of in a task of its own.
            await self._serve(event, incoming)
        else:
            self._task_group.start_soon(self._serve, event, incoming)

    async def _serve(self, event: CommandReceived, incoming: _Incoming | None) -> None:
        message = event.message
        context = self.contexts[event.context_id]
        spool = incoming.spool if incoming is not None else None
        response: DimseMessage | None = None
        try:
            if isinstance(message, CEchoRQ):
                response = await self._serve_echo(context, message)
            elif isinstance(message, CStoreRQ):
                assert spool is not None
                response = await self._serve_store(context, message, spool)
            elif isinstance(message, CFindRQ):
                await serve_find(self, context, message, _payload(incoming))
            elif isinstance(message, (CGetRQ, CMoveRQ)):
                await serve_retrieve(self, context, message, _payload(incoming))
            else:
                log.warning("%r: unexpected request %s ignored", self, type(message).__name__)
        finally:
            if spool is not None:
                spool.close()
            if response is not None:
                try:
                    await self.send_message(context.context_id, response)
                except DicomNetError as exc:
                    log.debug("%r: could not send %s: %s", self, type(response).__name__, exc)
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _serve_echo(self, context: AcceptedContext, message: CEchoRQ) -> CEchoRSP:
        status, comment = 0x0000, None
        if self.handlers.on_echo is not None:
            try:
                status, comment = _store_status(
                    await self.handlers.on_echo(EchoRequest(self, context, message))
                )
            except Exception as exc:
                log.exception("on_echo handler failed")
                status, comment = 0xC000, _comment(exc)
        return CEchoRSP(message.message_id, status, message.affected_sop_class_uid, comment)

    async def _serve_store(
        self, context: AcceptedContext, message: CStoreRQ, spool: Spool
    ) -> CStoreRSP:
        def reply(status: int, comment: str | None = None) -> CStoreRSP:
            return CStoreRSP(
                message.message_id,
                status,
                message.affected_sop_class_uid,
                message.affected_sop_instance_uid,
                comment,
            )

        if isinstance(spool, _NullSpool):
            return reply(0xC000, "invalid SOP Class or Instance UID")
        if message.affected_sop_class_uid != context.abstract_syntax:
            return reply(0x0122, "SOP Class not accepted on this presentation context")
        sink = (
            next((op for op in self._retrieve_sinks if not op.ended), None)
            if self._retrieve_sinks
            else None
        )
        if sink is not None:
            # A C-STORE sub-operation of our C-GET: hand it to the `get()` loop.
            request = StoreRequest(self, context, message, spool, fsync=self.settings.fsync)
            try:
                await sink.mailbox.put(request)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return reply(0xA700, "the retrieve was cancelled")
            await request.acknowledged()
            return reply(request.status, None)
        if not context.we_are_scp:
            return reply(0x0122, "SOP Class not accepted on this presentation context")
        if self.handlers.on_store is None:
            return reply(0x0122, "no storage handler")
        request = StoreRequest(self, context, message, spool, fsync=self.settings.fsync)
        try:
            status, comment = _store_status(await self.handlers.on_store(request))
        except Exception as exc:
            log.exception("on_store handler failed for %s", message.affected_sop_instance_uid)
            return reply(0xC000, _comment(exc))
        return reply(status, comment)

    # --- sending ---------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            await self._write_unlocked(data)

    async def _write_or_lost(self, data: bytes) -> bool:
        """Write what the Upper Layer produced; a dead connection becomes Evt17."""
        try:
            await self._write(data)
        except DicomNetError:
            self._ul.connection_lost()
            return False
        return True

    async def _write_unlocked(self, data: bytes | bytearray) -> None:
        try:
            await self._stream.send(data)
            self._ul.note_activity()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._set_error(AssociationAborted(f"connection lost while sending: {exc!r}"))
            raise self._termination_error() from exc

    def _check_can_send(self) -> None:
        if not self._ul.can_send_data:
            raise self._termination_error()

    def _termination_error(self) -> DicomNetError:
        if self._error is not None:
            return self._error
        return AssociationAborted(f"association is not established ({self._ul.state.name})")

    async def send_message(
        self, context_id: int, message: DimseMessage, dataset: bytes | memoryview | None = None
    ) -> None:
        """Send one DIMSE message (and its data set) as P-DATA-TF PDUs, in one write when small."""
        log.debug("%r: sending %s", self, message)
        command = encode_command(message, has_dataset=dataset is not None)
        max_pdu = self.peer_max_pdu_length
        async with self._send_lock:
            self._check_can_send()
            if dataset is not None and len(dataset) < SMALL_MESSAGE:
                packed = encode_small_message(context_id, command, dataset, max_pdu)
                if packed is not None:
                    await self._write_unlocked(packed)
                    return
            if dataset is None:
                await self._write_unlocked(encode_command_pdus(context_id, command, max_pdu))
                return
            pieces: Iterable[bytes | memoryview] = fragment(context_id, command, True, max_pdu)
            batch: list[bytes | memoryview] = list(pieces)
            size = 0
            try:
                for piece in fragment(context_id, dataset, False, max_pdu):
                    batch.append(piece)
                    size += len(piece)
                    if size >= SEND_BATCH:
                        await self._write_unlocked(b"".join(batch))
                        batch, size = [], 0
                if batch:
                    await self._write_unlocked(b"".join(batch))
            except BaseException as exc:
                await self._broken_message(exc)
                raise

    async def _broken_message(self, exc: BaseException) -> None:
        """A message was cut short after part of it went out: abort the association."""
        if isinstance(exc, DicomNetError) and self._stream_closed:
            return
        self._set_error(AssociationAborted(f"sending a message failed: {exc!r}"))
        with anyio.CancelScope(shield=True):
            await self._abort_now(str(exc))
            await self._close_stream()

    async def _send_file_message(
        self,
        context_id: int,
        message: DimseMessage,
        part10: Part10File,
        progress: Callable[[int, int], Any] | None,
    ) -> None:
        """Stream a Part-10 file's data set from disk after the command (no decoding)."""
        log.debug("%r: sending %s from %s", self, message, part10.path)
        command = encode_command(message, has_dataset=True)
        total = part10.dataset_length
        # A deflated data set of odd length gets its trailing NUL pad (PS3.5 §A.5).
        pad = total % 2 == 1 and part10.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
        async with self._send_lock:
            self._check_can_send()
            try:
                await self._stream_file(context_id, command, part10, progress, pad)
            except BaseException as exc:
                await self._broken_message(exc)
                raise

    async def _stream_file(
        self,
        context_id: int,
        command: bytes,
        part10: Part10File,
        progress: Callable[[int, int], Any] | None,
        pad: bool,
    ) -> None:
        max_pdu = self.peer_max_pdu_length
        per_pdv = max_pdv_data(max_pdu)
        block_size = max(1, SEND_BATCH // per_pdv) * per_pdv
        in_file = part10.dataset_length
        total = in_file + (1 if pad else 0)  # the pad byte is the buffer's own zero
        prefix = b"".join(fragment(context_id, command, True, max_pdu))
        with DatasetReader(part10) as reader:
            sent = 0
            while True:  # at least once: an empty data set is one empty last fragment
                size = min(block_size, total - sent)
                sent += size
                block, slots = pdata_into(
                    context_id, size, max_pdu, is_final=sent >= total, prefix=prefix
                )
                if size <= (1 << 16):
                    reader.fill(slots)
                else:
                    # From the page cache right here; what is not cached, in a worker thread.
                    rest = reader.fill_cached(slots)
                    if rest:
                        await anyio.to_thread.run_sync(reader.fill, rest)
                prefix = b""
                await self._write_unlocked(block)
                if progress is not None:
                    progress(min(sent, in_file), in_file)
                if sent >= total:
                    break

    # --- requests (SCU) --------------------------------------------------------------------

    def _context_for(
        self, abstract_syntax: str, transfer_syntax: str | None = None
    ) -> AcceptedContext | None:
        for context in self.contexts.values():
            if context.abstract_syntax == abstract_syntax and context.we_are_scu:
                if transfer_syntax is None or context.transfer_syntax == transfer_syntax:
                    return context
        return None

    async def begin(self, context: AcceptedContext, buffer: int = 4) -> Operation:
        """Reserve a slot of the operations window and a Message ID for a new request."""
        if self.is_closed:
            raise self._termination_error()
        await self._slots.acquire()
        try:
            message_id = self._ids.allocate()
        except BaseException:
            self._slots.release()
            raise
        operation = Operation(message_id, context, buffer, self._release_operation)
        self._operations[message_id] = operation
        if self.is_closed:
            operation.end()
            raise self._termination_error()
        return operation

    def _release_operation(self, operation: Operation) -> None:
        self._operations.pop(operation.message_id, None)
        self._outstanding.responded(operation.message_id, final=True)
        self._ids.release(operation.message_id)
        self._slots.release()

    def started(self, operation: Operation) -> None:
        """The request went out: the DIMSE timeout runs from now."""
        self._outstanding.started(operation.message_id)
        self._rearm()

    async def next_response(self, operation: Operation) -> tuple[DimseMessage, bytes | None]:
        """The next response (pending or final) to `operation`."""
        try:
            delivery: _Delivery = await operation.mailbox.get()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._termination_error() from None
        if isinstance(delivery, BaseException):
            raise delivery
        if isinstance(delivery, StoreRequest):  # pragma: no cover - only C-GET gets these
            raise ProtocolError("C-STORE sub-operation outside a C-GET")
        return delivery

    async def cancel(self, operation: Operation) -> None:
        """Abandon `operation`: send C-CANCEL-RQ (PS3.7 §9.3.2.3) unless it is over.

        The reader drops the responses still to come and frees the slot at the final one.
        """
        if operation.ended or operation.abandoned:
            return
        operation.abandoned = True
        operation.mailbox.close_receiver()
        with anyio.CancelScope(shield=True):
            try:
                await self.send_message(
                    operation.context.context_id, CCancelRQ(operation.message_id)
                )
            except DicomNetError as exc:
                log.debug("%r: could not send C-CANCEL: %s", self, exc)

    async def _request(
        self,
        context: AcceptedContext,
        make: Callable[[int], DimseMessage],
        send: Callable[[DimseMessage], Awaitable[None]],
    ) -> tuple[DimseMessage, bytes | None]:
        """Send one request and wait for its final response."""
        operation = await self.begin(context)
        try:
            await send(make(operation.message_id))
            self.started(operation)
            while True:
                response, data = await self.next_response(operation)
                if not Status(getattr(response, "status", 0)).is_pending:
                    return response, data
        finally:
            if not operation.ended:
                # Left before the final response (error or cancellation): nothing more is
                # expected by anyone, so drop what still comes.
                operation.abandoned = True
                operation.mailbox.close_receiver()

    async def echo(self) -> Status:
        """C-ECHO (PS3.7 §9.1.5). Returns the status; a failure raises `DimseError`."""
        context = self._context_for(VERIFICATION)
        if context is None:
            raise NotNegotiatedError("Verification SOP Class (1.2.840.10008.1.1) not accepted")
        cid = context.context_id
        response, _ = await self._request(
            context, lambda mid: CEchoRQ(mid), lambda msg: self.send_message(cid, msg)
        )
        return _check(response)

    async def store(
        self,
        dataset_or_path: Dataset | str | os.PathLike[str],
        *,
        progress: Callable[[int, int], Any] | None = None,
        priority: int = 0,
        move_originator_ae_title: str | None = None,
        move_originator_message_id: int | None = None,
    ) -> Status:
        """C-STORE (PS3.7 §9.1.1) of a pydicom Dataset or a Part-10 file.

        A file is streamed from disk after its file meta, without decoding it, when a
        context with its own transfer syntax was accepted; otherwise an uncompressed
        file is converted. `progress(bytes_sent, total)` is called as data goes out.
        Returns the status (success or warning); a failure raises `DimseError`.
        """
        if isinstance(dataset_or_path, Dataset):
            return await self._store_dataset(
                dataset_or_path,
                progress,
                priority,
                move_originator_ae_title,
                move_originator_message_id,
            )
        path = Path(dataset_or_path)
        try:
            part10 = Part10File.open(path)
        except ValueError:
            dataset = await anyio.to_thread.run_sync(lambda: dcmread(path, force=True))
            return await self._store_dataset(
                dataset,
                progress,
                priority,
                move_originator_ae_title,
                move_originator_message_id,
            )
        context = self._context_for(part10.sop_class_uid, part10.transfer_syntax)
        if context is None:
            if _convertible(part10.transfer_syntax) and self._convertible_context(
                part10.sop_class_uid
            ):
                dataset = await anyio.to_thread.run_sync(lambda: dcmread(path, force=True))
                return await self._store_dataset(
                    dataset,
                    progress,
                    priority,
                    move_originator_ae_title,
                    move_originator_message_id,
                )
            raise self._not_negotiated(part10.sop_class_uid, part10.transfer_syntax)
        cid = context.context_id

        def make(mid: int) -> CStoreRQ:
            return CStoreRQ(
                mid,
                part10.sop_class_uid,
                part10.sop_instance_uid,
                priority,
                move_originator_ae_title,
                move_originator_message_id,
            )

        async def send(message: DimseMessage) -> None:
            await self._send_file_message(cid, message, part10, progress)

        response, _ = await self._request(context, make, send)
        return _check(response)

    def find(
        self,
        query: Dataset,
        *,
        model: str = "study",
        level: str | None = None,
        priority: int = 0,
    ) -> Responses[Dataset]:
        """C-FIND (PS3.7 §9.1.2): `async for identifier in assoc.find(query, model=...)`.

        `model`: "patient", "study" or "mwl"; `level` sets Query/Retrieve Level.
        Leaving the loop early sends C-CANCEL. A failure status raises `DimseError`.
        """
        return _find(self, query, model=model, level=level, priority=priority)

    def move(
        self,
        query: Dataset,
        *,
        destination: str,
        model: str = "study",
        level: str | None = None,
        priority: int = 0,
    ) -> Responses[RetrieveProgress]:
        """C-MOVE (PS3.7 §9.1.4) to `destination`: progress of each response."""
        return _move(
            self, query, destination=destination, model=model, level=level, priority=priority
        )

    def get(
        self,
        query: Dataset,
        *,
        model: str = "study",
        level: str | None = None,
        priority: int = 0,
    ) -> Responses[StoreRequest]:
        """C-GET (PS3.7 §9.1.3): the instances of the C-STORE sub-operations as they come."""
        return _get(self, query, model=model, level=level, priority=priority)

    def retrieve(
        self,
        query: Dataset,
        *,
        model: str = "study",
        level: str | None = None,
        via: Literal["auto", "get", "move"] = "auto",
        listener: RetrieveListener | None = None,
        priority: int = 0,
    ) -> Responses[StoreRequest]:
        """The matching instances themselves: by C-GET where the peer accepted it,
        else by C-MOVE to `listener` (see `dicomnet.retrieve_listener`)."""
        return _retrieve(
            self, query, model=model, level=level, via=via, listener=listener, priority=priority
        )

    def _convertible_context(self, sop_class_uid: str) -> AcceptedContext | None:
        for context in self.contexts.values():
            if (
                context.abstract_syntax == sop_class_uid
                and context.we_are_scu
                and _convertible(context.transfer_syntax)
            ):
                return context
        return None

    def _not_negotiated(self, sop_class_uid: str, transfer_syntax: str) -> NotNegotiatedError:
        from pydicom.uid import UID

        offered = sorted(
            UID(c.transfer_syntax).name
            for c in self.contexts.values()
            if c.abstract_syntax == sop_class_uid
        )
        text = (
            f"no accepted presentation context for {UID(sop_class_uid).name} "
            f"({sop_class_uid}) in {UID(transfer_syntax).name} ({transfer_syntax})"
        )
        text += (
            f"; accepted for this SOP class: {', '.join(offered)}"
            if offered
            else ("; the SOP class itself was not accepted")
        )
        return NotNegotiatedError(text)

    async def _store_dataset(
        self,
        dataset: Dataset,
        progress: Callable[[int, int], Any] | None,
        priority: int,
        move_originator_ae_title: str | None,
        move_originator_message_id: int | None,
    ) -> Status:
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        sop_instance = str(dataset.get("SOPInstanceUID", "") or "")
        if not sop_class or not sop_instance:
            raise ValueError("the data set has no SOP Class UID or SOP Instance UID")
        meta = getattr(dataset, "file_meta", None)
        own_ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        context = self._context_for(sop_class, own_ts) if own_ts else None
        if context is None and (not own_ts or _convertible(own_ts)):
            context = self._convertible_context(sop_class)
        if context is None:
            raise self._not_negotiated(sop_class, own_ts or UNCOMPRESSED_TRANSFER_SYNTAXES[0])
        ts = context.transfer_syntax
        data = await anyio.to_thread.run_sync(lambda: encode_dataset(dataset, ts))
        cid = context.context_id

        def make(mid: int) -> CStoreRQ:
            return CStoreRQ(
                mid,
                sop_class,
                sop_instance,
                priority,
                move_originator_ae_title,
                move_originator_message_id,
            )

        async def send(message: DimseMessage) -> None:
            await self.send_message(cid, message, data)
            if progress is not None:
                progress(len(data), len(data))

        response, _ = await self._request(context, make, send)
        return _check(response)

    # --- release and abort -----------------------------------------------------------------

    async def release(self) -> None:
        """A-RELEASE (PS3.8 §7.2): ask the peer to release and wait until it has."""
        if self.is_closed:
            return
        async with self._send_lock:
            if self._ul.state != State.STA6:
                return
            data = self._ul.release()
            self._rearm()
            try:
                await self._write_unlocked(data)
            except DicomNetError:
                pass
        await self._closed.wait()

    async def abort(self) -> None:
        """A-ABORT (PS3.8 §7.3): end the association at once."""
        if self.is_closed:
            return
        with anyio.CancelScope(shield=True):
            self._set_error(AssociationAborted("association aborted locally"))
            data = self._ul.abort()
            if data:
                try:
                    await self._stream.send(data)
                except Exception:
                    pass
            self._ul.connection_lost()
            await self._close_stream()

    async def _abort_now(self, error: str) -> None:
        data = self._ul.abort(error)
        if data:
            try:
                await self._stream.send(data)
            except Exception:
                pass
        self._ul.connection_lost()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class _NullSpool(Spool):
    """Swallows a data set that will be refused (its UIDs are unusable)."""

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)


def _convertible(transfer_syntax: str) -> bool:
    return (
        transfer_syntax in UNCOMPRESSED_TRANSFER_SYNTAXES
        or transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
    )


def _check(response: DimseMessage) -> Status:
    status = Status(getattr(response, "status", 0))
    if status.is_failure or status.is_cancel:
        raise DimseError(status, getattr(response, "error_comment", None))
    return status


def _payload(incoming: _Incoming | None) -> bytes | None:
    if incoming is None or incoming.buffer is None:
        return None
    return bytes(incoming.buffer)
