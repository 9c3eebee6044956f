"""Messages arriving on an association: PDVs reassembled into commands and data sets
(PS3.8 Annex E), each message then to the `Invoker` (a response) or the `Performer` (a
request). A request's data set goes where its service says (a spool for C-STORE), any
other into memory, at most 64 MiB."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio.to_thread

from dicomnet.errors import ProtocolError
from dicomnet.invoking import Invoker
from dicomnet.performing import Performer, Received
from dicomnet.proto.contexts import AcceptedContext
from dicomnet.proto.dimse import CCancelRQ, CommandReceived, DatasetFragment, MessageAssembler
from dicomnet.proto.pdu import PresentationDataValue
from dicomnet.storage import Spool

__all__ = ["MessageReceiver"]

log = logging.getLogger("dicomnet")

MAX_MEMORY_DATASET = 64 << 20  # a data set kept in memory larger than this is refused


class _Incoming:
    """The data set of a message being received."""

    __slots__ = ("buffer", "event", "limit", "received", "spool")

    def __init__(self, event: CommandReceived, spool: Spool | None, limit: int | None) -> None:
        self.event = event
        self.spool = spool
        self.buffer = bytearray() if spool is None else None
        self.limit = limit
        self.received = 0

    def write(self, data: memoryview) -> None:
        if self.limit is not None:
            self.received += len(data)
            if self.received > self.limit:
                raise ProtocolError(f"data set larger than the limit of {self.limit:,} bytes")
        if self.spool is not None:
            self.spool.write(data)
        elif self.buffer is not None:
            if len(self.buffer) + len(data) > MAX_MEMORY_DATASET:
                raise ProtocolError("data set larger than 64 MiB in a message kept in memory")
            self.buffer += data


class MessageReceiver:
    """Reassembles the PDVs of one association and hands on what they make.

    A message must arrive at `min_receive_rate` bytes a second at least: it is due
    `message_timeout` seconds after its first PDV, plus a second for each
    `min_receive_rate` bytes received since (so a peer trickling a data set at a few
    bytes a second is not held open for ever, and a large one at any usable speed is
    never cut); `deadline` says when the one being received is due. `max_dataset_size`:
    the most bytes a data set may have. Past either, the association is aborted (a
    `ProtocolError` from `feed()`, or the reader's timer)."""

    def __init__(
        self,
        contexts: dict[int, AcceptedContext],
        invoker: Invoker,
        performer: Performer,
        owner: object,
        *,
        clock: Callable[[], float],
        message_timeout: float | None = None,
        min_receive_rate: int = 4096,
        max_dataset_size: int | None = None,
    ) -> None:
        self._contexts = contexts
        self._invoker = invoker
        self._performer = performer
        self._owner = owner  # the association, for the log
        self._assembler = MessageAssembler(contexts.__contains__)
        self._incoming: _Incoming | None = None
        self._clock = clock
        self.message_timeout = message_timeout
        self._rate = max(1, min_receive_rate)
        self._max_dataset_size = max_dataset_size
        self._started: float | None = None  # when the message being received began
        self._received = 0  # its bytes so far

    @property
    def deadline(self) -> float | None:
        """When the message being received is due (None: none is, or no limit)."""
        if self._started is None or self.message_timeout is None:
            return None
        return self._started + self.message_timeout + self._received / self._rate

    def discard(self) -> None:
        """Drop a data set being received (the association ended or failed)."""
        if self._incoming is not None and self._incoming.spool is not None:
            self._incoming.spool.discard()
        self._incoming = None
        self._ended()

    async def feed(self, pdv: PresentationDataValue) -> None:
        """One PDV received (a `ProtocolError` if the peer breaks PS3.8 Annex E)."""
        self._received += len(pdv.data)
        event = self._assembler.feed(pdv)
        if event is None:
            self._begun()
            return
        if isinstance(event, CommandReceived):
            if event.has_dataset:
                self._begun()
            else:
                self._ended()
            await self._command(event)
            return
        assert isinstance(event, DatasetFragment)
        incoming = self._incoming
        if incoming is None:  # pragma: no cover - the assembler guarantees order
            raise ProtocolError("data set fragment without a command")
        incoming.write(event.data)
        spool = incoming.spool
        if spool is not None and (spool.needs_writing or (event.is_last and spool.on_disk)):
            # A data set spooled to disk is written off the event loop, a batch at a time:
            # this reader waits (and so does its peer: backpressure), no other does.
            await anyio.to_thread.run_sync(spool.write_pending)
        if event.is_last:
            self._incoming = None
            self._ended()
            await self._complete(incoming)

    def _begun(self) -> None:
        """A message is under way: its clock runs (a message in one PDV never needs it)."""
        if self._started is None and self.message_timeout is not None:
            self._started = self._clock()

    def _ended(self) -> None:
        self._started = None
        self._received = 0

    async def _command(self, event: CommandReceived) -> None:
        message = event.message
        log.debug("%r: received %s", self._owner, message)
        if isinstance(message, CCancelRQ):
            self._performer.cancel_requested(message.message_id_being_responded_to)
            return
        context = self._contexts[event.context_id]
        if not event.has_dataset:
            if message.is_request:
                await self._performer.dispatch(Received(context, message))
            else:
                await self._invoker.deliver(message, None)
            return
        spool = self._performer.dataset_sink(context, message) if message.is_request else None
        self._incoming = _Incoming(event, spool, self._max_dataset_size)

    async def _complete(self, incoming: _Incoming) -> None:
        """A message with its data set arrived in full."""
        message = incoming.event.message
        if not message.is_request:
            await self._invoker.deliver(message, bytes(incoming.buffer or b""))
            return
        context = self._contexts[incoming.event.context_id]
        if incoming.spool is not None:
            incoming.spool.finish()
            await self._performer.dispatch(Received(context, message, spool=incoming.spool))
        else:
            data = bytes(incoming.buffer or b"")
            await self._performer.dispatch(Received(context, message, data))
