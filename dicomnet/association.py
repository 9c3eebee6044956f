"""One async association per connection: the shell around the sans-IO core.

A reader task feeds received bytes to the `UpperLayer` (PS3.8), reassembles DIMSE
messages and hands each response to the `Invoker` (the caller waiting for it) and each
request to the `Performer` (the service that answers it). Writes go through one
`MessageWriter`. The shell knows no service by name: a service plugs in as a `Service`
(what it accepts, how it answers a request) and, for the SCU, as a subclass of
`BaseAssociation` (what it offers); `dicomnet.services` puts them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from dicomnet.audit import OperationAudit
from dicomnet.errors import AssociationAborted, DicomNetError, InvalidStateError, ProtocolError
from dicomnet.invoking import Invoker, Operation
from dicomnet.observe import Observer, Tracker
from dicomnet.performing import Handlers, Performer, Received, Served, Service
from dicomnet.proto.contexts import AcceptedContext
from dicomnet.proto.dimse import (
    DimseMessage,
)
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    ExtendedNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.fsm import State
from dicomnet.proto.operations import Operations
from dicomnet.proto.pdu import AAssociateAC, AAssociateRQ, AbortSource
from dicomnet.proto.ul import (
    NEED_DATA,
    Aborted,
    ConnectionClosed,
    DataReceived,
    ReleaseConfirmed,
    ReleaseRequested,
    UpperLayer,
)
from dicomnet.receiving import MessageReceiver
from dicomnet.storage import Part10File
from dicomnet.stream import ByteStream, peer_certificate
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


@dataclass(frozen=True, slots=True)
class AssociationSettings:
    """Per-association limits and timeouts (seconds; None: no limit)."""

    max_pdu_length: int = 262_144
    artim_timeout: float = 30.0
    dimse_timeout: float | None = 60.0
    idle_timeout: float | None = None
    write_timeout: float | None = 60.0
    message_timeout: float | None = 60.0
    min_receive_rate: int = 4096
    max_dataset_size: int | None = None
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
        observer: Observer | None = None,
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
        # The peer's verified TLS certificate (`ssl.SSLSocket.getpeercert()`), or None.
        self.peer_certificate: dict[str, Any] | None = peer_certificate(stream)
        stream.write_timeout = settings.write_timeout
        self.is_requestor = ul.is_requestor
        self.clock = clock
        window = self.extended.async_operations_window
        ops = Operations(
            max_invoked=window.invoked,
            max_performed=window.performed,
            dimse_timeout=settings.dimse_timeout,
        )
        self._ops = ops
        self._invoker = Invoker(self, ops)
        self._performer = Performer(self, ops, services)
        self._writer = MessageWriter(
            peer_max_pdu_length, self._write_unlocked, self._broken_message
        )
        self._receiver = MessageReceiver(
            contexts,
            self._invoker,
            self._performer,
            self,
            clock=clock,
            message_timeout=settings.message_timeout,
            min_receive_rate=settings.min_receive_rate,
            max_dataset_size=settings.max_dataset_size,
        )
        self._closed = asyncio.Event()
        self._error: DicomNetError | None = None
        self._stream_closed = False
        # Set by the acceptor: the verified user (PS3.7 §D.3.3.7), and with an audit hook
        # what records the operations performed.
        self.user: str | None = None
        self.audit: OperationAudit | None = None
        # With an observer: what tells it of this association and its operations.
        self.tracker: Tracker | None = None
        if observer is not None:
            self.tracker = Tracker.of(observer, self.is_requestor, request, peer_address, clock)

    # --- identity --------------------------------------------------------------------------

    @property
    def local_ae_title(self) -> str:
        return self.request.calling_ae_title if self.is_requestor else self.request.called_ae_title

    @property
    def peer_ae_title(self) -> str:
        return self.request.called_ae_title if self.is_requestor else self.request.calling_ae_title

    @property
    def peer_implementation_class_uid(self) -> str:
        """The peer's Implementation Class UID (PS3.7 §D.3.3.2): which software it runs."""
        info = (self.response if self.is_requestor else self.request).user_information
        return info.implementation_class_uid or ""

    @property
    def peer_implementation_version_name(self) -> str:
        info = (self.response if self.is_requestor else self.request).user_information
        return info.implementation_version_name or ""

    @property
    def user_identity_response(self) -> bytes | None:
        """Requestor: the acceptor's User Identity server response (PS3.7 §D.3.3.7.2),
        None when it sent none (no positive response was asked for, or it ignores the
        item)."""
        return self.extended.user_identity.server_response if self.is_requestor else None

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
        if self.tracker is not None:
            self.tracker.opened()
        try:
            async with anyio.create_task_group() as tg:
                self._performer.task_group = tg
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
            if self.tracker is not None:
                self.tracker.closed(self._error is not None)
            self._closed.set()

    def _ended(self) -> None:
        """Nothing more is read: end the operations, cancel what is performed."""
        self._receiver.discard()
        if self._ul.state != State.STA1:
            self._ul.connection_lost()
        self._close_stream()
        self._ops.close()
        self._invoker.close()
        self._performer.close()

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
        deadline = self._ul.get_timer()
        dimse = self._ops.get_timer()
        if dimse is not None and (deadline is None or dimse < deadline):
            deadline = dimse
        message = self._receiver.deadline
        if message is not None and (deadline is None or message < deadline):
            deadline = message
        return deadline

    def _rearm(self) -> None:
        """A timer was started outside the reader: shorten the reader's wait to match."""
        deadline = self._next_deadline()
        if deadline is not None:
            self._stream.reschedule(deadline - self.clock())

    def _handle_timers(self) -> None:
        now = self.clock()
        error: DicomNetError | None = self._invoker.expire(now, self.settings.dimse_timeout)
        message_due = self._receiver.deadline
        if error is None and message_due is not None and now >= message_due:
            error = AssociationAborted(
                f"a message arriving slower than {self.settings.min_receive_rate} bytes/s "
                f"(after {self.settings.message_timeout:g} s)"
            )
            self._receiver.discard()
        if error is not None:
            self._set_error(error)
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
                        await self._receiver.feed(pdv)
                except ProtocolError as exc:
                    log.warning("%r: %s; aborting", self, exc)
                    self._set_error(exc)
                    self._receiver.discard()
                    ul.request_abort(self.clock(), str(exc))
            elif isinstance(event, ReleaseRequested):
                log.debug("%r: peer requested release", self)
                if event.collision and self.is_requestor:
                    await self._write_or_lost(ul.release_response(self.clock()))
                elif not event.collision:
                    assert self._performer.task_group is not None
                    self._performer.task_group.start_soon(self._answer_release)
            elif isinstance(event, ReleaseConfirmed):
                if ul.state == State.STA12:
                    await self._write_or_lost(ul.release_response(self.clock()))
            elif isinstance(event, Aborted):
                self._on_aborted(event)
            elif isinstance(event, ConnectionClosed):
                self._receiver.discard()

    def _on_aborted(self, event: Aborted) -> None:
        self._receiver.discard()
        if event.local and event.error:
            log.warning("%r: aborting: %s", self, event.error)
        error = _abort_error(event)
        if not event.local:
            log.debug("%r: %s", self, error)
        self._set_error(error)

    def _set_error(self, error: DicomNetError) -> None:
        if self._error is None:
            self._error = error

    async def _answer_release(self) -> None:
        """A-RELEASE-RP once every request received was answered (PS3.8 §7.2)."""
        await self._performer.idle()
        try:
            await self._write_or_lost(self._ul.release_response(self.clock()))
        except InvalidStateError:
            pass

    def _close_stream(self) -> None:
        if not self._stream_closed:
            self._stream_closed = True
            self._stream.close()

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
        if self.tracker is not None and message.is_request:
            self._invoker.observe(self.tracker, message, 0 if dataset is None else len(dataset))
        await self._writer.send(context_id, message, dataset, self._check_can_send)
        if self.audit is not None:
            self.audit.responded(message)
        if self.tracker is not None and not message.is_request:
            self.tracker.responded(message, 0 if dataset is None else len(dataset))

    async def send_file_message(
        self,
        context_id: int,
        message: DimseMessage,
        part10: Part10File,
        progress: Callable[[int, int], Any] | None = None,
    ) -> None:
        """Send one message whose data set is streamed from a Part-10 file."""
        log.debug("%r: sending %s from %s", self, message, part10.path)
        if self.tracker is not None and message.is_request:
            self._invoker.observe(self.tracker, message, part10.dataset_length)
        await self._writer.send_file(context_id, message, part10, progress, self._check_can_send)

    async def _broken_message(self, exc: BaseException) -> None:
        """A message was cut short after part of it went out: abort the association."""
        if isinstance(exc, DicomNetError) and self._stream_closed:
            return
        self._set_error(AssociationAborted(f"sending a message failed: {exc!r}"))
        with anyio.CancelScope(shield=True):
            await self._abort_now(str(exc))
            self._close_stream()

    # --- what services use (see `Invoker` and `Performer`) ---------------------------------

    async def begin(self, context: AcceptedContext, buffer: int = 4) -> Operation:
        """Reserve a slot of the operations window and a Message ID for a new request."""
        return await self._invoker.begin(context, buffer)

    def started(self, operation: Operation) -> None:
        """The request went out: the DIMSE timeout runs from now."""
        self._invoker.started(operation)

    async def next_response(self, operation: Operation) -> tuple[DimseMessage, bytes | None]:
        """The next response (pending or final) to `operation`."""
        return await self._invoker.next_response(operation)

    async def next_delivery(self, operation: Operation) -> Any:
        """The next response pair, or instance diverted to it, for `operation`."""
        return await self._invoker.next_delivery(operation)

    async def cancel(self, operation: Operation) -> None:
        """Leave `operation` early: C-CANCEL-RQ unless it is over (PS3.7 §9.3.2.3)."""
        await self._invoker.cancel(operation)

    def abandon(self, operation: Operation) -> None:
        """Leave `operation` early, without C-CANCEL."""
        self._invoker.abandon(operation)

    async def send_request(
        self,
        context: AcceptedContext,
        make: Callable[[int], DimseMessage],
        send: Callable[[DimseMessage], Awaitable[None]],
    ) -> tuple[DimseMessage, bytes | None]:
        """One request and its final response (see `Invoker.send_request`)."""
        return await self._invoker.send_request(context, make, send)

    def cancellable(self, message_id: int) -> Served:
        """The handle by which a C-CANCEL reaches the request `message_id` being performed."""
        return self._performer.cancellable(message_id)

    def divert(
        self, message_type: type[Any], diversion: Callable[[Any], Awaitable[bool]]
    ) -> AbstractAsyncContextManager[None]:
        """While the block runs, received requests of `message_type` go to `diversion`
        first: how a C-GET receives its C-STORE sub-operations."""
        return self._performer.divert(message_type, diversion)

    def add_diversion(
        self, message_type: type[Any], diversion: Callable[[Any], Awaitable[bool]]
    ) -> None:
        """`divert` without a block: until `remove_diversion`."""
        self._performer.add_diversion(message_type, diversion)

    def remove_diversion(
        self, message_type: type[Any], diversion: Callable[[Any], Awaitable[bool]]
    ) -> None:
        self._performer.remove_diversion(message_type, diversion)

    async def diverted(self, message: DimseMessage, item: Any) -> bool:
        """Offer a received request to the diversions of its type; True if one took it."""
        return await self._performer.diverted(message, item)

    # --- release and abort -----------------------------------------------------------------

    async def release(self) -> None:
        """A-RELEASE (PS3.8 §7.2): ask the peer to release and wait until it has.

        Operations still outstanding are waited for first (at most the DIMSE timeout)."""
        if self.is_closed:
            return
        timeout = self.settings.dimse_timeout
        await self._invoker.drain(timeout if timeout is not None else 60.0)
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


def _abort_error(event: Aborted) -> DicomNetError:
    """What an A-ABORT (or A-P-ABORT) means for the association's users."""
    if event.local:
        if event.source == AbortSource.SERVICE_PROVIDER:
            # AA-8: the peer sent an invalid or unexpected PDU.
            return ProtocolError(event.error or "invalid PDU received")
        text = "association aborted locally"
        text = f"{text}: {event.error}" if event.error else text
        return AssociationAborted(text, event.source, event.reason)
    who = {0: "peer (service-user)", 2: "service-provider"}.get(event.source, "peer")
    text = f"association aborted by {who}"
    if event.error:
        text += f": {event.error}"
    return AssociationAborted(text, event.source, event.reason)
