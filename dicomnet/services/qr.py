"""Query/Retrieve: C-FIND, C-MOVE and C-GET as async generators on both sides.

SCU (PS3.7 §9.1.2 to §9.1.4): `find()`, `move()` and `get()` return a `Responses` object:
an async iterator over the pending responses (identifiers, progress, or the
instances arriving by C-GET) that also keeps the final status. Leaving the loop
early sends C-CANCEL for that Message ID and the remaining responses are dropped;
the operation keeps its slot of the operations window until the final response, so
the next request on the association waits for it.

SCP (PS3.4 Annex C, Annex K for the worklist): `on_find`, `on_move` and `on_get`
handlers are async generators. The framework sends each yielded identifier as a pending C-FIND
response, or runs a C-STORE sub-operation for each yielded instance (to the move
destination, or back over the same association for C-GET) and reports the counts.
A C-CANCEL, an abort or a release closes the handler's generator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import anyio
from pydicom.dataset import Dataset

from dicomnet.association import BaseAssociation, Handlers, Operation, Received, Served
from dicomnet.errors import (
    AssociationAborted,
    DicomNetError,
    DimseError,
    NotNegotiatedError,
)
from dicomnet.performing import ServiceBase
from dicomnet.proto.contexts import (
    DEFAULT_TRANSFER_SYNTAXES,
    MODALITY_WORKLIST_FIND,
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    AcceptedContext,
    PresentationContext,
    all_storage_sop_classes,
    all_transfer_syntaxes,
    contexts_for_instances,
)
from dicomnet.proto.dimse import CFindRQ, CFindRSP, CGetRQ, CGetRSP, CMoveRQ, CMoveRSP, CStoreRQ
from dicomnet.services.common import failure
from dicomnet.services.storage import ON_STORE, StorageUser, StoreRequest
from dicomnet.status import Status
from dicomnet.storage import Part10File, decode_dataset, decode_received, encode_dataset
from dicomnet.transcode import ConversionError

__all__ = [
    "FIND_MODELS",
    "GET_MODELS",
    "MOVE_MODELS",
    "ON_FIND",
    "ON_GET",
    "ON_MOVE",
    "FindRequest",
    "QueryRetrieve",
    "QueryRetrieveUser",
    "Responses",
    "RetrieveListener",
    "RetrieveProgress",
    "RetrieveRequest",
]

log = logging.getLogger("dicomnet")

Model = Literal["patient", "study", "mwl"]
FIND_MODELS: dict[str, str] = {
    "patient": PATIENT_ROOT_FIND,
    "study": STUDY_ROOT_FIND,
    "mwl": MODALITY_WORKLIST_FIND,
}
MOVE_MODELS: dict[str, str] = {"patient": PATIENT_ROOT_MOVE, "study": STUDY_ROOT_MOVE}
GET_MODELS: dict[str, str] = {"patient": PATIENT_ROOT_GET, "study": STUDY_ROOT_GET}
_MODEL_OF: dict[str, str] = {
    uid: name for table in (FIND_MODELS, MOVE_MODELS, GET_MODELS) for name, uid in table.items()
}

T = TypeVar("T")

# The handlers' keys in `Handlers`.
ON_FIND = "on_find"
ON_MOVE = "on_move"
ON_GET = "on_get"


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrieveProgress:
    """The counts of one C-MOVE or C-GET response (PS3.4 §C.4.2.1.4, §C.4.3.1.4)."""

    status: Status
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    failed_sop_instance_uids: tuple[str, ...] = ()
    error_comment: str | None = None

    @property
    def is_final(self) -> bool:
        return not self.status.is_pending


class Responses(Generic[T]):
    """The responses to one C-FIND, C-MOVE or C-GET: iterate once with `async for`.

    Leaving the loop early (`break`, an exception, cancellation) sends C-CANCEL.
    After the loop, `status` is the final status (Cancel, 0xFE00, when the loop was
    left early: use `async with` to wait for it deterministically),
    `warnings` the warning statuses seen in pending responses (e.g. 0xFF01), and
    `progress` the last sub-operation counts (C-MOVE, C-GET). A failure final status
    raises `DimseError` from the loop.
    """

    def __init__(self, start: Callable[[Responses[T]], AsyncGenerator[T, None]]) -> None:
        self._start: Callable[[Responses[T]], AsyncGenerator[T, None]] | None = start
        self.status: Status | None = None
        self.error_comment: str | None = None
        self.warnings: list[Status] = []
        self.progress: RetrieveProgress | None = None
        self._done = asyncio.Event()
        self._running: weakref.ref[AsyncGenerator[T, None]] | None = None

    def __aiter__(self) -> AsyncIterator[T]:
        if self._start is None:
            raise RuntimeError("these responses have already been iterated")
        start, self._start = self._start, None
        # The loop holds the generator, not this object: leaving the loop drops it and
        # its clean-up (the C-CANCEL) runs even when the caller keeps `Responses`.
        generator = start(self)
        self._running = weakref.ref(generator)
        return generator

    async def aclose(self) -> None:
        """End the operation now (C-CANCEL if it is still going) and wait until it is over."""
        generator = self._running() if self._running is not None else None
        if generator is not None:
            await generator.aclose()
        if self._running is not None:
            await self._done.wait()

    async def __aenter__(self) -> Responses[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    async def collect(self) -> list[T]:
        """All responses in a list (for small results)."""
        return [item async for item in self]


# --- SCU -------------------------------------------------------------------------------------


def _context(association: BaseAssociation, sop_class: str, what: str) -> AcceptedContext:
    context = association.context_for(sop_class)
    if context is None:
        raise NotNegotiatedError(f"{what} ({sop_class}) was not accepted on this association")
    return context


def _identifier(query: Dataset, level: str | None) -> Dataset:
    identifier = Dataset()
    identifier.update(query)
    if level is not None:
        identifier.QueryRetrieveLevel = level.upper()
    return identifier


def find(
    association: BaseAssociation,
    query: Dataset,
    *,
    model: str = "study",
    level: str | None = None,
    priority: int = 0,
) -> Responses[Dataset]:
    """C-FIND (PS3.7 §9.1.2): one identifier per pending response."""
    if model not in FIND_MODELS:
        raise ValueError(f"model must be one of {sorted(FIND_MODELS)}, not {model!r}")
    sop_class = FIND_MODELS[model]

    async def run(outcome: Responses[Dataset]) -> AsyncGenerator[Dataset, None]:
        context = _context(association, sop_class, f"{model} C-FIND")
        identifier = _identifier(query, level)
        data = encode_dataset(identifier, context.transfer_syntax)
        operation = await association.begin(context, buffer=16)
        try:
            message = CFindRQ(operation.message_id, sop_class, priority)
            await association.send_message(context.context_id, message, data)
            association.started(operation)
            while True:
                response, payload = await association.next_response(operation)
                status = Status(getattr(response, "status", 0))
                if status.is_pending:
                    if status != 0xFF00:
                        outcome.warnings.append(status)
                    if payload is not None:
                        yield decode_dataset(payload, context.transfer_syntax)
                    continue
                outcome.status = status
                outcome.error_comment = getattr(response, "error_comment", None)
                if status.is_failure:
                    raise DimseError(status, outcome.error_comment)
                return
        finally:
            await _leave(association, operation, outcome)

    return Responses(run)


async def _leave(
    association: BaseAssociation, operation: Operation, outcome: Responses[Any]
) -> None:
    """Clean-up of an SCU operation: C-CANCEL unless its final response arrived, then
    wait (shielded, at most the DIMSE timeout) for the final response to record it."""
    try:
        if not operation.ended:
            await association.cancel(operation)
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(association.settings.dimse_timeout or 60.0):
                    await operation.finished.wait()
        if outcome.status is None and operation.final_status is not None:
            outcome.status = operation.final_status
    finally:
        outcome._done.set()


def _progress(response: Any, payload: bytes | None, transfer_syntax: str) -> RetrieveProgress:
    failed_uids: tuple[str, ...] = ()
    if payload:
        try:
            identifier = decode_dataset(payload, transfer_syntax)
            value = identifier.get("FailedSOPInstanceUIDList", None)
            if value:
                values = [value] if isinstance(value, str) else list(value)
                failed_uids = tuple(str(v) for v in values)
        except Exception:  # a malformed identifier in a response does not hide the counts
            log.debug("could not decode the identifier of a retrieve response")
    return RetrieveProgress(
        Status(response.status),
        response.remaining,
        response.completed,
        response.failed,
        response.warning,
        failed_uids,
        getattr(response, "error_comment", None),
    )


def move(
    association: BaseAssociation,
    query: Dataset,
    *,
    destination: str,
    model: str = "study",
    level: str | None = None,
    priority: int = 0,
) -> Responses[RetrieveProgress]:
    """C-MOVE (PS3.7 §9.1.4): progress from each pending response and the final one."""
    if model not in MOVE_MODELS:
        raise ValueError(f"model must be one of {sorted(MOVE_MODELS)}, not {model!r}")
    sop_class = MOVE_MODELS[model]

    async def run(outcome: Responses[RetrieveProgress]) -> AsyncGenerator[RetrieveProgress, None]:
        context = _context(association, sop_class, f"{model} C-MOVE")
        data = encode_dataset(_identifier(query, level), context.transfer_syntax)
        operation = await association.begin(context, buffer=16)
        try:
            message = CMoveRQ(operation.message_id, sop_class, destination, priority)
            await association.send_message(context.context_id, message, data)
            association.started(operation)
            while True:
                response, payload = await association.next_response(operation)
                progress = _progress(response, payload, context.transfer_syntax)
                outcome.progress = progress
                if progress.is_final:
                    outcome.status = progress.status
                    outcome.error_comment = progress.error_comment
                    if progress.status.is_failure:
                        error = DimseError(progress.status, progress.error_comment)
                        error.progress = progress  # type: ignore[attr-defined]
                        raise error
                yield progress
                if progress.is_final:
                    return
        finally:
            await _leave(association, operation, outcome)

    return Responses(run)


def get(
    association: BaseAssociation,
    query: Dataset,
    *,
    model: str = "study",
    level: str | None = None,
    priority: int = 0,
) -> Responses[StoreRequest]:
    """C-GET (PS3.7 §9.1.3): each C-STORE sub-operation's instance, as it arrives.

    An instance (a `StoreRequest`: `.dataset`, `await .save(path)`) is acknowledged
    with success when the loop asks for the next one; set `instance.status` to
    answer otherwise. The storage contexts need the SCP role (role selection).
    """
    if model not in GET_MODELS:
        raise ValueError(f"model must be one of {sorted(GET_MODELS)}, not {model!r}")
    sop_class = GET_MODELS[model]

    async def run(outcome: Responses[StoreRequest]) -> AsyncGenerator[StoreRequest, None]:
        context = _context(association, sop_class, f"{model} C-GET")
        operation = await association.begin(context, buffer=4)
        try:
            async with association.divert(CStoreRQ, lambda item: _hand_over(operation, item)):
                message = CGetRQ(operation.message_id, sop_class, priority)
                async for instance in _retrieve_loop(
                    association, operation, message, query, level, outcome
                ):
                    yield instance
        finally:
            await _leave(association, operation, outcome)

    return Responses(run)


async def _retrieve_loop(
    association: BaseAssociation,
    operation: Operation,
    message: CGetRQ | CMoveRQ,
    query: Dataset,
    level: str | None,
    outcome: Responses[StoreRequest],
) -> AsyncGenerator[StoreRequest, None]:
    """Send a C-GET or C-MOVE and yield the instances arriving for it, until the final
    response. Instances are acknowledged (their C-STORE answered) on the next step."""
    context = operation.context
    data = encode_dataset(_identifier(query, level), context.transfer_syntax)
    current: StoreRequest | None = None
    try:
        await association.send_message(context.context_id, message, data)
        association.started(operation)
        while True:
            delivery = await association.next_delivery(operation)
            if isinstance(delivery, StoreRequest):
                current = delivery
                yield delivery
                delivery.acknowledge()
                current = None
                continue
            response, payload = delivery
            progress = _progress(response, payload, context.transfer_syntax)
            outcome.progress = progress
            if progress.is_final:
                outcome.status = progress.status
                outcome.error_comment = progress.error_comment
                if progress.status.is_failure:
                    error = DimseError(progress.status, progress.error_comment)
                    error.progress = progress  # type: ignore[attr-defined]
                    raise error
                return
    finally:
        if current is not None:
            current.acknowledge()


async def _hand_over(operation: Operation, instance: StoreRequest) -> bool:
    """Give an arriving instance to the retrieve `operation` waits for (C-GET, or C-MOVE
    to our listener); answered 0xA700 if that retrieve is over."""
    if operation.ended:
        return False
    try:
        await operation.mailbox.put(instance)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        instance.status = 0xA700
        instance.acknowledge()
    return True


class RetrieveListener:
    """A storage SCP of ours that receives the C-STORE sub-operations of our C-MOVEs.

    Made by `retrieve_listener()`. Arriving instances are matched to the C-MOVE by
    Move Originator AE Title and Message ID (0000,1030 / 0000,1031; PS3.7 §9.1.1.1);
    a peer that leaves those out is matched when only one retrieve is running.
    """

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        self.host = ""
        self.port = 0
        self._sinks: dict[tuple[str, int], Operation] = {}

    def _register(self, originator: str, operation: Operation) -> None:
        self._sinks[(originator.strip(), operation.message_id)] = operation

    def _unregister(self, originator: str, operation: Operation) -> None:
        self._sinks.pop((originator.strip(), operation.message_id), None)

    def install(self, handlers: Handlers) -> None:
        """Receive storage requests with this listener (an AE's handlers)."""
        handlers.set(ON_STORE, self._on_store)

    async def _on_store(self, request: StoreRequest) -> int | tuple[int, str]:
        key = (
            (request.move_originator_ae_title or "").strip(),
            request.move_originator_message_id or -1,
        )
        sink = self._sinks.get(key)
        if sink is None and len(self._sinks) == 1 and request.move_originator_message_id is None:
            sink = next(iter(self._sinks.values()))
        if sink is None or not await _hand_over(sink, request):
            return 0xA900, "not part of a retrieve in progress"
        await request.acknowledged()
        return request.status


def retrieve(
    association: BaseAssociation,
    query: Dataset,
    *,
    model: str = "study",
    level: str | None = None,
    via: Literal["auto", "get", "move"] = "auto",
    listener: RetrieveListener | None = None,
    priority: int = 0,
) -> Responses[StoreRequest]:
    """The instances themselves: by C-GET where the peer accepted it (and `via` allows),
    otherwise by C-MOVE to `listener` (a `retrieve_listener()` of ours)."""
    get_context = association.context_for(GET_MODELS.get(model, ""))
    if via == "get" or (via == "auto" and get_context is not None):
        return get(association, query, model=model, level=level, priority=priority)
    if listener is None:
        raise NotNegotiatedError(
            "C-GET is not available on this association: retrieving by C-MOVE needs a "
            "listener (dicomnet.retrieve_listener)"
        )
    if model not in MOVE_MODELS:
        raise ValueError(f"model must be one of {sorted(MOVE_MODELS)}, not {model!r}")
    sop_class = MOVE_MODELS[model]
    originator = association.local_ae_title

    async def run(outcome: Responses[StoreRequest]) -> AsyncGenerator[StoreRequest, None]:
        context = _context(association, sop_class, f"{model} C-MOVE")
        operation = await association.begin(context, buffer=4)
        listener._register(originator, operation)
        try:
            message = CMoveRQ(operation.message_id, sop_class, listener.ae_title, priority)
            async for instance in _retrieve_loop(
                association, operation, message, query, level, outcome
            ):
                yield instance
        finally:
            listener._unregister(originator, operation)
            await _leave(association, operation, outcome)

    return Responses(run)


# --- SCP -------------------------------------------------------------------------------------


def _option(association: BaseAssociation, sop_class: str, byte: int) -> bool:
    """Whether byte `byte` of the SOP Class Extended Negotiation agreed for `sop_class`
    is 1 (PS3.4 §C.5.1.1.2: 0 relational queries, 1 combined date-time matching; for
    C-MOVE / C-GET, 0 relational retrieve)."""
    info = association.extended.sop_class_extended.accepted.get(sop_class, b"")
    return len(info) > byte and info[byte] == 1


@dataclass(slots=True)
class FindRequest:
    """A C-FIND-RQ for the `on_find` handler: `identifier` is the decoded query."""

    association: BaseAssociation
    context: AcceptedContext
    message: CFindRQ
    identifier: Dataset
    model: str

    @property
    def level(self) -> str | None:
        value = self.identifier.get("QueryRetrieveLevel", None)
        return str(value) if value else None

    @property
    def relational(self) -> bool:
        """Relational queries were negotiated (PS3.4 §C.4.1.3.2)."""
        return _option(self.association, self.message.affected_sop_class_uid, 0)

    @property
    def combined_datetime(self) -> bool:
        """Combined date-time matching was negotiated (PS3.4 §C.2.2.2.5.4)."""
        return _option(self.association, self.message.affected_sop_class_uid, 1)


@dataclass(slots=True)
class RetrieveRequest:
    """A C-MOVE-RQ or C-GET-RQ for `on_move` / `on_get`; `destination` is the move's."""

    association: BaseAssociation
    context: AcceptedContext
    message: CMoveRQ | CGetRQ
    identifier: Dataset
    model: str
    destination: str | None = None

    @property
    def level(self) -> str | None:
        value = self.identifier.get("QueryRetrieveLevel", None)
        return str(value) if value else None

    @property
    def relational(self) -> bool:
        """Relational retrieve was negotiated (PS3.4 §C.4.2.3.2.1, §C.4.3.3.2.1)."""
        return _option(self.association, self.message.affected_sop_class_uid, 0)


async def _next(generator: AsyncGenerator[Any, None], served: Served) -> tuple[bool, Any]:
    """The generator's next item, or (False, None) when it ends or the request is cancelled."""
    if served.cancelled:
        return False, None
    with anyio.CancelScope() as scope:
        served.scope = scope
        try:
            return True, await generator.__anext__()
        except StopAsyncIteration:
            return False, None
        finally:
            served.scope = None
    return False, None


def _decode_identifier(
    data: bytes | None, context: AcceptedContext
) -> tuple[Dataset | None, str | None]:
    if data is None:
        return None, "the request has no identifier"
    try:
        return decode_received(data, context.transfer_syntax), None
    except Exception as exc:
        return None, f"identifier cannot be decoded: {exc}"[:64]


# Matches a C-FIND handler may produce ahead of the responses sent (backpressure).
FIND_AHEAD = 32


class _Handoff:
    """Items from one producer task to one consumer, at most `limit` waiting.

    Cheaper than a memory object stream: neither side yields to the event loop unless it
    has to wait, so the consumer sends the waiting matches back to back.
    """

    def __init__(self, limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: deque[Any] = deque()
        self._limit = limit
        self._closed = False  # the producer is done
        self._abandoned = False  # the consumer is done
        self.error: Exception | None = None
        self._get_waiter: asyncio.Future[None] | None = None
        self._put_waiter: asyncio.Future[None] | None = None

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, item: Any) -> bool:
        """Hand `item` over; False once the consumer has stopped taking items."""
        while len(self._items) >= self._limit and not self._abandoned:
            self._put_waiter = self._loop.create_future()
            await self._put_waiter
        if self._abandoned:
            return False
        self._items.append(item)
        self._wake(self._get_waiter)
        return True

    def close(self, error: Exception | None = None) -> None:
        self._closed = True
        self.error = error
        self._wake(self._get_waiter)

    def abandon(self) -> None:
        self._abandoned = True
        self._items.clear()
        self._wake(self._put_waiter)

    async def get(self) -> tuple[bool, Any]:
        """(True, item), or (False, None) once the producer is done and nothing is left."""
        while not self._items:
            if self._closed:
                return False, None
            self._get_waiter = self._loop.create_future()
            await self._get_waiter
        item = self._items.popleft()
        self._wake(self._put_waiter)
        return True, item


async def _produce(generator: AsyncGenerator[Any, None], served: Served, out: _Handoff) -> None:
    """Run a handler's generator in a task of its own, so that C-CANCEL can stop it wherever
    it waits (one cancel scope for the whole run, not one per item)."""
    error: Exception | None = None
    with anyio.CancelScope() as scope:
        served.scope = scope
        try:
            if not served.cancelled:
                async for item in generator:
                    if not await out.put(item) or served.cancelled:
                        break
        except Exception as exc:
            error = exc
        finally:
            served.scope = None
            with anyio.CancelScope(shield=True):
                await generator.aclose()
            out.close(error)


async def serve_find(
    association: BaseAssociation, context: AcceptedContext, message: CFindRQ, data: bytes | None
) -> None:
    """Perform a C-FIND with the `on_find` handler (PS3.4 §C.4.1)."""
    sop_class = message.affected_sop_class_uid
    ts = context.transfer_syntax

    async def reply(
        status: int, identifier: Dataset | None = None, comment: str | None = None
    ) -> None:
        payload = encode_dataset(identifier, ts) if identifier is not None else None
        response = CFindRSP(message.message_id, status, sop_class, comment)
        await association.send_message(context.context_id, response, payload)

    handler = association.handlers.get(ON_FIND)
    identifier, problem = _decode_identifier(data, context)
    if handler is None:
        await reply(0xC000, comment="no C-FIND handler")
        return
    if identifier is None:
        await reply(0xA900, comment=problem)
        return
    served = association.cancellable(message.message_id)
    request = FindRequest(association, context, message, identifier, _MODEL_OF.get(sop_class, ""))
    matches = _Handoff(FIND_AHEAD)
    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_produce, handler(request), served, matches)
        try:
            while not served.cancelled:
                more, item = await matches.get()
                if not more:
                    error = matches.error
                    break
                match, pending = item if isinstance(item, tuple) else (item, 0xFF00)
                try:
                    await reply(pending, match)
                except DicomNetError:
                    served.cancel()
                    return  # the association is gone: nothing more can be sent
                except Exception as exc:  # a match that cannot be encoded
                    error = exc
                    served.cancel()  # stop the handler wherever it waits
                    break
        finally:
            matches.abandon()
    status, text = failure(error, "on_find") if error is not None else (0x0000, None)
    if served.cancelled and status == 0x0000:
        status = 0xFE00
    try:
        await reply(status, comment=text)
    except DicomNetError as exc:
        log.debug("could not send the final C-FIND response: %s", exc)


@dataclass
class _Item:
    """One instance to send by a C-STORE sub-operation."""

    source: Dataset | Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str | None  # None: a data set, encoded as negotiated


def _item(value: Any) -> _Item:
    if isinstance(value, Dataset):
        meta = getattr(value, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "") or None if meta else None
        return _Item(value, str(value.SOPClassUID), str(value.SOPInstanceUID), ts)
    if isinstance(value, Part10File):
        return _Item(value.path, value.sop_class_uid, value.sop_instance_uid, value.transfer_syntax)
    if isinstance(value, (str, os.PathLike)):
        info = Part10File.open(value)
        return _Item(info.path, info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax)
    raise TypeError(f"a retrieve handler yielded {type(value).__name__}, not a Dataset or path")


@dataclass
class _Counts:
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why sub-operations failed

    def fail(self, sop_instance_uid: str, reason: str) -> None:
        self.failed += 1
        self.failed_uids.append(sop_instance_uid)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def comment(self) -> str | None:
        """The Error Comment of the final response: why the sub-operations failed, the
        most frequent reason first (the full reasons are in the log)."""
        if not self.reasons:
            return None
        reason, _ = max(self.reasons.items(), key=lambda item: item[1])
        return f"{self.failed} failed: {reason}"[:64]


_Reply = Callable[..., Any]


def _retrieve_reply(
    association: BaseAssociation, context: AcceptedContext, message: CMoveRQ | CGetRQ
) -> _Reply:
    """How to send a C-MOVE / C-GET response with sub-operation counts (PS3.7 §9.3.3.2)."""
    rsp_type = CMoveRSP if isinstance(message, CMoveRQ) else CGetRSP
    ts = context.transfer_syntax

    async def reply(status: int, counts: _Counts | None = None, comment: str | None = None) -> None:
        payload = None
        state = Status(status)
        if counts is not None and counts.failed_uids and not state.is_pending:
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = counts.failed_uids
            payload = encode_dataset(failed, ts)
        response = rsp_type(
            message.message_id,
            status,
            message.affected_sop_class_uid,
            counts.remaining if counts and (state.is_pending or state.is_cancel) else None,
            counts.completed if counts else None,
            counts.failed if counts else None,
            counts.warning if counts else None,
            comment,
        )
        await association.send_message(context.context_id, response, payload)

    return reply


async def _last_reply(
    reply: _Reply, status: int, counts: _Counts, comment: str | None = None
) -> None:
    try:
        await reply(status, counts, comment)
    except DicomNetError as exc:
        log.debug("could not send the final retrieve response: %s", exc)


async def _collect(generator: AsyncGenerator[Any, None], served: Served) -> list[_Item]:
    """Everything a retrieve handler yields (until it ends or the request is cancelled)."""
    items: list[_Item] = []
    try:
        while True:
            more, value = await _next(generator, served)
            if not more:
                return items
            items.append(await anyio.to_thread.run_sync(_item, value))
    finally:
        with anyio.CancelScope(shield=True):
            await generator.aclose()


async def serve_retrieve(
    association: BaseAssociation,
    context: AcceptedContext,
    message: CMoveRQ | CGetRQ,
    data: bytes | None,
) -> None:
    """Perform a C-MOVE or C-GET with the `on_move` / `on_get` handler (PS3.4 §C.4.2, C.4.3)."""
    name = ON_MOVE if isinstance(message, CMoveRQ) else ON_GET
    reply = _retrieve_reply(association, context, message)
    handler = association.handlers.get(name)
    identifier, problem = _decode_identifier(data, context)
    if handler is None:
        await reply(0xC000, comment="no retrieve handler")
        return
    if identifier is None:
        await reply(0xA900, comment=problem)
        return
    destination: tuple[str, int] | None = None
    if isinstance(message, CMoveRQ):
        destination = association.handlers.peer_address(message.move_destination)
        if destination is None:
            text = f"unknown move destination {message.move_destination!r}"[:64]
            await reply(0xA801, _Counts(0), text)
            return
    served = association.cancellable(message.message_id)
    request = RetrieveRequest(
        association,
        context,
        message,
        identifier,
        _MODEL_OF.get(message.affected_sop_class_uid, ""),
        message.move_destination if isinstance(message, CMoveRQ) else None,
    )
    try:
        items = await _collect(handler(request), served)
    except Exception as exc:
        status, text = failure(exc, name)
        await _last_reply(reply, status, _Counts(0), text)
        return
    counts = _Counts(len(items))
    try:
        if served.cancelled:
            status = 0xFE00
        elif isinstance(message, CMoveRQ):
            assert destination is not None
            status = await _move_items(
                association, message, destination, items, counts, served, reply
            )
        else:
            status = await _get_items(association, items, counts, served, reply)
    except DicomNetError as exc:
        if association.is_closed:
            return
        log.warning("retrieve failed: %s", exc)
        status = 0xA702
    await _last_reply(reply, status, counts, counts.comment() if status != 0xFE00 else None)


def _reason(exc: DicomNetError) -> str:
    """A sub-operation's failure in few words, for the Error Comment."""
    if isinstance(exc, ConversionError):
        return exc.reason
    if isinstance(exc, DimseError):
        text = f"C-STORE {exc.status} {exc.status.description}"
        return text + (f": {exc.error_comment}" if exc.error_comment else "")
    return str(exc)


def _final_status(counts: _Counts, cancelled: bool) -> int:
    if cancelled:
        return 0xFE00
    if counts.failed == 0 and counts.warning == 0:
        return 0x0000
    if counts.completed == 0 and counts.warning == 0:
        return 0xA702  # every sub-operation failed
    return 0xB000  # sub-operations complete, one or more failures or warnings


async def _run_sub_operations(
    items: list[_Item],
    counts: _Counts,
    served: Served,
    store: Callable[[_Item], Any],
    reply: Callable[..., Any],
) -> int:
    for item in items:
        if served.cancelled:
            break
        try:
            status: Status = await store(item)
        except (DimseError, NotNegotiatedError) as exc:
            log.warning("sub-operation for %s failed: %s", item.sop_instance_uid, exc)
            counts.fail(item.sop_instance_uid, _reason(exc))
        else:
            if status.is_warning:
                counts.warning += 1
            else:
                counts.completed += 1
        counts.remaining -= 1
        if counts.remaining > 0 and not served.cancelled:
            await reply(0xFF00, counts)
    return _final_status(counts, served.cancelled)


async def _get_items(
    association: BaseAssociation,
    items: list[_Item],
    counts: _Counts,
    served: Served,
    reply: Callable[..., Any],
) -> int:
    if not isinstance(association, StorageUser):  # pragma: no cover - always one
        raise NotNegotiatedError("this association cannot send instances")
    sender = association

    async def store(item: _Item) -> Status:
        return await sender.store(item.source)

    return await _run_sub_operations(items, counts, served, store, reply)


async def _move_items(
    association: BaseAssociation,
    message: CMoveRQ,
    destination: tuple[str, int],
    items: list[_Item],
    counts: _Counts,
    served: Served,
    reply: Callable[..., Any],
) -> int:
    if not items:
        return 0x0000
    connect = association.handlers.connect
    if connect is None:  # pragma: no cover - an AE always sets it
        raise NotNegotiatedError("no way to open an association to the move destination")
    host, port = destination
    try:
        async with connect(
            host,
            port,
            aet=association.local_ae_title,
            aec=message.move_destination,
            contexts=contexts_for_instances((i.sop_class_uid, i.transfer_syntax) for i in items)[
                :128
            ],
            connect_timeout=association.settings.artim_timeout,
            artim_timeout=association.settings.artim_timeout,
            dimse_timeout=association.settings.dimse_timeout,
        ) as sub:

            async def store(item: _Item) -> Status:
                sender: StorageUser = sub
                return await sender.store(
                    item.source,
                    move_originator_ae_title=association.peer_ae_title,
                    move_originator_message_id=message.message_id,
                )

            return await _run_sub_operations(items, counts, served, store, reply)
    except (AssociationAborted, DicomNetError) as exc:
        if association.is_closed:
            raise
        log.warning("C-MOVE to %s (%s:%s) failed: %s", message.move_destination, host, port, exc)
        # The destination could not be reached or went away: what is left fails.
        done = counts.completed + counts.warning + counts.failed
        for item in items[done:]:
            counts.fail(item.sop_instance_uid, f"move destination: {exc}")
        counts.remaining = 0
        return _final_status(counts, served.cancelled)


# --- plugging in -----------------------------------------------------------------------------


class QueryRetrieveUser(StorageUser):
    """What Query/Retrieve offers the SCU (a C-GET's instances come by C-STORE)."""

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
        return find(self, query, model=model, level=level, priority=priority)

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
        return move(
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
        return get(self, query, model=model, level=level, priority=priority)

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
        return retrieve(
            self, query, model=model, level=level, via=via, listener=listener, priority=priority
        )


class QueryRetrieve(ServiceBase):
    """The SCP side: the information models of `models` whose handler is set, and for
    C-GET every storage SOP class with the SCP role offered to the requestor."""

    requests: ClassVar[tuple[type[Any], ...]] = (CFindRQ, CMoveRQ, CGetRQ)

    def contexts(
        self, handlers: Handlers, models: tuple[str, ...]
    ) -> dict[str, PresentationContext]:
        supported: dict[str, PresentationContext] = {}
        for key, table in ((ON_FIND, FIND_MODELS), (ON_MOVE, MOVE_MODELS), (ON_GET, GET_MODELS)):
            if handlers.get(key) is not None:
                for name, uid in table.items():
                    if name in models:
                        supported[uid] = PresentationContext(uid, DEFAULT_TRANSFER_SYNTAXES)
        if handlers.get(ON_GET) is not None:
            # C-GET sends its sub-operations back: the requestor may take the SCP role.
            every = all_transfer_syntaxes()
            for uid in all_storage_sop_classes():
                supported[uid] = PresentationContext(uid, every, scu_role=False, scp_role=True)
        return supported

    async def serve(self, association: BaseAssociation, request: Received) -> None:
        message = request.message
        if isinstance(message, CFindRQ):
            await serve_find(association, request.context, message, request.data)
        else:
            assert isinstance(message, (CMoveRQ, CGetRQ))
            await serve_retrieve(association, request.context, message, request.data)
