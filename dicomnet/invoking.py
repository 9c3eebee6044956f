"""The requests this side of an association invokes: the caller's end of each.

An `Invoker` reserves a Message ID and a slot of the asynchronous operations window for
each request (the `Operations` core decides), delivers the responses the reader
receives to the waiting caller's `Operation`, sends C-CANCEL for a caller that leaves
a C-FIND / C-MOVE / C-GET early, and ends what is left when the association ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from dicomnet.errors import DicomNetError, DimseTimeout, ProtocolError
from dicomnet.observe import SCU, ObservedOperation, Tracker
from dicomnet.proto.contexts import AcceptedContext
from dicomnet.proto.dimse import CCancelRQ, DimseMessage
from dicomnet.proto.operations import Operations, Verdict
from dicomnet.status import Status

if TYPE_CHECKING:
    from dicomnet.association import BaseAssociation

__all__ = ["Invoker", "Mailbox", "Operation"]

log = logging.getLogger("dicomnet")


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

    __slots__ = (
        "context",
        "ended",
        "final_status",
        "finished",
        "mailbox",
        "message_id",
        "observed",
    )

    def __init__(self, message_id: int, context: AcceptedContext, buffer: int) -> None:
        self.message_id = message_id
        self.context = context
        self.mailbox = Mailbox(buffer)
        self.ended = False
        self.finished = asyncio.Event()
        self.final_status: Status | None = None
        self.observed: ObservedOperation | None = None  # with an observer, once sent

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.mailbox.close()
            self.finished.set()


class Invoker:
    """The requests invoked on one association, and their callers."""

    def __init__(self, association: BaseAssociation, ops: Operations) -> None:
        self._association = association
        self.ops = ops
        self._waiting: dict[int, Operation] = {}
        self._slot_waiters: deque[asyncio.Future[None]] = deque()

    async def begin(self, context: AcceptedContext, buffer: int = 4) -> Operation:
        """Reserve a slot of the operations window and a Message ID for a new request."""
        association = self._association
        while True:
            if association.is_closed:
                raise association.termination_error()
            if self.ops.can_invoke:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            await waiter
        operation = Operation(self.ops.invoke(), context, buffer)
        self._waiting[operation.message_id] = operation
        return operation

    def observe(self, tracker: Tracker, message: DimseMessage, nbytes: int) -> None:
        """A request of ours (`nbytes` of data set) goes out: observed from now on."""
        operation = self._waiting.get(getattr(message, "message_id", -1))
        if operation is None or operation.observed is not None:
            return  # C-CANCEL-RQ, or a request sent again
        sop_class = operation.context.abstract_syntax
        operation.observed = tracker.start(message, SCU, sop_class, nbytes)

    def started(self, operation: Operation) -> None:
        """The request went out: the DIMSE timeout runs from now."""
        if self.ops.is_outstanding(operation.message_id):
            self.ops.sent(operation.message_id, self._association.clock())
            self._association._rearm()

    async def next_delivery(self, operation: Operation) -> Any:
        """The next item for `operation`: a (response, data set bytes) pair, or what a
        diversion put there (a C-GET's instances)."""
        try:
            delivery: Any = await operation.mailbox.get()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise self._association.termination_error() from None
        if isinstance(delivery, BaseException):
            raise delivery
        return delivery

    async def next_response(self, operation: Operation) -> tuple[DimseMessage, bytes | None]:
        """The next response (pending or final) to `operation`."""
        delivery = await self.next_delivery(operation)
        if not isinstance(delivery, tuple):  # pragma: no cover - only C-GET gets others
            raise ProtocolError(f"unexpected {type(delivery).__name__} for a request")
        return delivery

    async def cancel(self, operation: Operation) -> None:
        """Abandon `operation`: send C-CANCEL-RQ (PS3.7 §9.3.2.3) unless it is over.

        What still comes is dropped; the slot is freed at the final response.
        """
        operation.mailbox.close_receiver()
        if not self.ops.cancel(operation.message_id):
            self._forget_if_over(operation)
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._association.send_message(
                    operation.context.context_id, CCancelRQ(operation.message_id)
                )
            except DicomNetError as exc:
                log.debug("%r: could not send C-CANCEL: %s", self._association, exc)

    def abandon(self, operation: Operation) -> None:
        """The caller left before the final response: drop what still comes."""
        if operation.ended:
            return
        operation.mailbox.close_receiver()
        self.ops.abandon(operation.message_id)
        self._forget_if_over(operation)

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

    async def deliver(self, message: DimseMessage, data: bytes | None) -> None:
        """A response arrived: to its caller, as the core says."""
        message_id: int = getattr(message, "message_id_being_responded_to", -1)
        status = Status(getattr(message, "status", 0))
        verdict = self.ops.response(message_id, not status.is_pending, self._association.clock())
        if verdict is Verdict.UNKNOWN:
            log.warning(
                "%r: response to unknown message ID %s ignored", self._association, message_id
            )
            return
        operation = self._waiting.get(message_id)
        if operation is None:  # pragma: no cover - the core and the shell agree
            return
        if operation.observed is not None and data:
            operation.observed.bytes_in += len(data)
        if verdict is Verdict.DELIVER or verdict is Verdict.FINAL:
            try:
                await operation.mailbox.put((message, data))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
        if verdict is Verdict.FINAL or verdict is Verdict.DROP_FINAL:
            operation.final_status = status
            self._end(operation)

    def expire(self, now: float, timeout: float | None) -> DimseTimeout | None:
        """End the requests whose response is overdue at `now`; the error, if any."""
        expired = self.ops.expired(now)
        if not expired:
            return None
        error = DimseTimeout(
            f"no DIMSE response within {timeout:g} s (message IDs {sorted(expired)})"
        )
        for message_id in expired:
            operation = self._waiting.pop(message_id, None)
            if operation is not None:
                try:
                    operation.mailbox.put_nowait(error)
                except anyio.BrokenResourceError:
                    pass
                self._ended(operation)
        return error

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until no request is outstanding."""
        with anyio.move_on_after(timeout):
            for operation in list(self._waiting.values()):
                await operation.finished.wait()

    def close(self) -> None:
        """The association ended: every caller learns it."""
        for operation in list(self._waiting.values()):
            self._ended(operation)
        self._waiting.clear()
        self._wake_slot_waiters()

    def _forget_if_over(self, operation: Operation) -> None:
        if not self.ops.is_outstanding(operation.message_id):
            self._end(operation)

    def _end(self, operation: Operation) -> None:
        self._waiting.pop(operation.message_id, None)
        self._ended(operation)
        self._wake_slot_waiters()

    def _ended(self, operation: Operation) -> None:
        """`operation` is over: its caller learns it (and the observer, if any)."""
        if operation.observed is not None and not operation.ended:
            tracker = self._association.tracker
            if tracker is not None:
                status = operation.final_status
                tracker.finish(operation.observed, None if status is None else int(status))
        operation.end()

    def _wake_slot_waiters(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not self._association.is_closed:
                    return
