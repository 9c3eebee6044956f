"""DIMSE-N (PS3.7 §10): N-EVENT-REPORT, N-GET, N-SET, N-ACTION, N-CREATE, N-DELETE.

SCU: `assoc.n_get(...)` and the others return an `NResponse`; a failure status raises
`DimseError` carrying it (`.response`). SCP: handlers are registered per operation and
SOP class (`AE.on_n_action(sop_class, ...)`, several classes per handler allowed) and
get an `NRequest`; they return a status, or a status and a reply data set. A request
with no handler gets 0x0122 (SOP class not supported) when nothing handles its SOP
class, else 0x0211 (unrecognized operation) (PS3.7 Annex C); a handler that raises
answers 0x0110 (processing failure, or the `DimseError`'s own status) with an Error
Comment, and the association goes on. N-EVENT-REPORTs reach the association
requestor's handlers too (`connect(handlers=...)`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from dicomnet.association import BaseAssociation, Handlers, Received
from dicomnet.errors import DimseError, NotNegotiatedError
from dicomnet.performing import ServiceBase
from dicomnet.proto.contexts import (
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    AcceptedContext,
    PresentationContext,
)
from dicomnet.proto.dimse import (
    DimseMessage,
    NActionRQ,
    NCreateRQ,
    NDeleteRQ,
    NEventReportRQ,
    NGetRQ,
    NSetRQ,
    response_to,
)
from dicomnet.services.common import comment
from dicomnet.status import Status
from dicomnet.storage import decode_dataset, decode_received, encode_dataset

__all__ = [
    "N_ACTION",
    "N_CREATE",
    "N_DELETE",
    "N_EVENT_REPORT",
    "N_GET",
    "N_SET",
    "NRequest",
    "NResponse",
    "NServiceUser",
    "NServices",
    "handler_key",
]

log = logging.getLogger("dicomnet")

N_EVENT_REPORT = "N-EVENT-REPORT"
N_GET = "N-GET"
N_SET = "N-SET"
N_ACTION = "N-ACTION"
N_CREATE = "N-CREATE"
N_DELETE = "N-DELETE"
_OPERATION: dict[type[Any], str] = {
    NEventReportRQ: N_EVENT_REPORT,
    NGetRQ: N_GET,
    NSetRQ: N_SET,
    NActionRQ: N_ACTION,
    NCreateRQ: N_CREATE,
    NDeleteRQ: N_DELETE,
}
NRequestMessage = NEventReportRQ | NGetRQ | NSetRQ | NActionRQ | NCreateRQ | NDeleteRQ


def handler_key(operation: str, sop_class_uid: str) -> tuple[str, str]:
    """The key of the `operation` handler of a SOP class in `Handlers`."""
    return (operation, sop_class_uid)


@dataclass(frozen=True, slots=True)
class NResponse:
    """A DIMSE-N response (PS3.7 §10.1): status, reply data set, the SOP instance it
    concerns (for N-CREATE: the one created, the SCP's if we sent none)."""

    status: Status
    dataset: Dataset | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    error_comment: str | None = None
    event_type: int | None = None
    action_type: int | None = None
    attribute_identifiers: tuple[int, ...] | None = None


@dataclass(slots=True)
class NRequest:
    """A DIMSE-N request for its handler. `sop_instance_uid` is always set (generated
    for an N-CREATE that brought none); `dataset` is the decoded data set, if any."""

    association: BaseAssociation
    context: AcceptedContext
    message: NRequestMessage
    sop_class_uid: str
    sop_instance_uid: str
    dataset: Dataset | None = None
    status: int = 0x0000  # the response status, for requests taken by a diversion
    _responded: asyncio.Event | None = field(default=None, repr=False)

    async def responded(self) -> None:
        """Wait until the response to this request was sent (or could not be): what
        the handler starts that must follow it, such as a storage commitment report
        on the same association (PS3.4 §J.3.3), waits for this."""
        await self._responded_event().wait()

    def _responded_event(self) -> asyncio.Event:
        if self._responded is None:
            self._responded = asyncio.Event()
        return self._responded

    @property
    def operation(self) -> str:
        """ "N-GET", "N-SET", "N-ACTION", "N-CREATE", "N-DELETE" or "N-EVENT-REPORT"."""
        return _OPERATION[type(self.message)]

    @property
    def action_type(self) -> int | None:
        return self.message.action_type_id if isinstance(self.message, NActionRQ) else None

    @property
    def event_type(self) -> int | None:
        return self.message.event_type_id if isinstance(self.message, NEventReportRQ) else None

    @property
    def attributes(self) -> tuple[int, ...] | None:
        """N-GET's Attribute Identifier List (None or empty: all attributes)."""
        if isinstance(self.message, NGetRQ):
            return self.message.attribute_identifier_list
        return None


def _tags(attributes: Iterable[int | str | tuple[int, int]] | None) -> tuple[int, ...] | None:
    if attributes is None:
        return None
    return tuple(int(Tag(a)) for a in attributes)


class NServiceUser(BaseAssociation):
    """What DIMSE-N offers the SCU (PS3.7 §10.1; the fields as Tables 10.1-1 to 10.1-6)."""

    async def n_get(
        self,
        sop_class: str,
        instance: str,
        attributes: Iterable[int | str | tuple[int, int]] | None = None,
    ) -> NResponse:
        """N-GET: the attributes (tags or keywords; None: all) of an instance."""
        tags = _tags(attributes)
        return await self._n_request(
            sop_class, lambda mid: NGetRQ(mid, sop_class, instance, tags or None), None, instance
        )

    async def n_set(self, sop_class: str, instance: str, modifications: Dataset) -> NResponse:
        """N-SET: change attributes of an instance (the Modification List)."""
        return await self._n_request(
            sop_class, lambda mid: NSetRQ(mid, sop_class, instance), modifications, instance
        )

    async def n_action(
        self,
        sop_class: str,
        instance: str,
        action_type: int,
        information: Dataset | None = None,
    ) -> NResponse:
        """N-ACTION: have the SCP perform `action_type` on an instance."""
        return await self._n_request(
            sop_class,
            lambda mid: NActionRQ(mid, sop_class, instance, action_type),
            information,
            instance,
        )

    async def n_create(
        self, sop_class: str, attributes: Dataset | None = None, instance: str | None = None
    ) -> NResponse:
        """N-CREATE: make an instance (without `instance`, the SCP assigns its UID)."""
        return await self._n_request(
            sop_class, lambda mid: NCreateRQ(mid, sop_class, instance), attributes, instance
        )

    async def n_delete(self, sop_class: str, instance: str) -> NResponse:
        """N-DELETE: remove an instance."""
        return await self._n_request(
            sop_class, lambda mid: NDeleteRQ(mid, sop_class, instance), None, instance
        )

    async def n_event_report(
        self,
        sop_class: str,
        instance: str,
        event_type: int,
        information: Dataset | None = None,
    ) -> NResponse:
        """N-EVENT-REPORT: report `event_type` of an instance (we invoke it as the SOP
        class's SCP, e.g. a storage commitment result)."""
        return await self._n_request(
            sop_class,
            lambda mid: NEventReportRQ(mid, sop_class, instance, event_type),
            information,
            instance,
            as_scp=True,
        )

    def _n_context(self, sop_class: str, as_scp: bool) -> AcceptedContext:
        context = self.context_for(sop_class, scp=as_scp)
        if context is None and as_scp:
            # A peer that did not answer role selection: the report goes on the context
            # of the class anyway, as most peers expect.
            context = next(
                (c for c in self.contexts.values() if c.abstract_syntax == sop_class), None
            )
        if context is None:
            raise NotNegotiatedError(f"SOP class {sop_class} was not accepted in this role")
        return context

    async def _n_request(
        self,
        sop_class: str,
        make: Callable[[int], DimseMessage],
        dataset: Dataset | None,
        instance: str | None,
        *,
        as_scp: bool = False,
    ) -> NResponse:
        context = self._n_context(sop_class, as_scp)
        ts = context.transfer_syntax
        data = encode_dataset(dataset, ts) if dataset is not None else None
        cid = context.context_id
        message, payload = await self.send_request(
            context, make, lambda msg: self.send_message(cid, msg, data)
        )
        response = _n_response(message, payload, ts, sop_class, instance)
        if response.status.is_failure or response.status.is_cancel:
            raise DimseError(response.status, response.error_comment, response=response)
        return response


def _n_response(
    message: DimseMessage,
    payload: bytes | None,
    transfer_syntax: str,
    sop_class: str,
    instance: str | None,
) -> NResponse:
    dataset = None
    if payload:
        try:
            dataset = decode_dataset(payload, transfer_syntax)
        except Exception as exc:
            log.warning("the reply data set of %s cannot be decoded: %s", message, exc)
    return NResponse(
        Status(getattr(message, "status", 0)),
        dataset,
        getattr(message, "affected_sop_class_uid", None) or sop_class,
        getattr(message, "affected_sop_instance_uid", None) or instance,
        getattr(message, "error_comment", None),
        getattr(message, "event_type_id", None),
        getattr(message, "action_type_id", None),
        getattr(message, "attribute_identifier_list", None),
    )


def _result(value: Any) -> tuple[int, Dataset | None]:
    """A handler's result as (status, reply data set)."""
    if value is None:
        return 0x0000, None
    if isinstance(value, Dataset):
        return 0x0000, value
    if isinstance(value, tuple):
        status, dataset = value
        return int(status), dataset
    return int(value), None


class NServices(ServiceBase):
    """The SCP side of DIMSE-N: each request to the handler of its operation and SOP
    class. A class with an N-EVENT-REPORT handler lets the requestor take the SCP role
    (PS3.7 §D.3.3.4): how a storage commitment report comes on a new association."""

    requests: ClassVar[tuple[type[Any], ...]] = tuple(_OPERATION)
    # Not inline: a handler may itself wait for the peer.

    def contexts(
        self, handlers: Handlers, models: tuple[str, ...]
    ) -> dict[str, PresentationContext]:
        reports: set[str] = set()
        performs: set[str] = set()
        for key in handlers.keys():
            if isinstance(key, tuple) and len(key) == 2 and key[0] in _OPERATION.values():
                (reports if key[0] == N_EVENT_REPORT else performs).add(key[1])
        return {
            uid: PresentationContext(
                uid,
                UNCOMPRESSED_TRANSFER_SYNTAXES,
                scu_role=True if uid in performs else None,
                scp_role=True if uid in reports else None,
            )
            for uid in sorted(reports | performs)
        }

    async def serve(self, association: BaseAssociation, request: Received) -> None:
        message = request.message
        assert isinstance(message, NRequestMessage)
        sop_class, instance = _addressed(message)
        nrequest = NRequest(association, request.context, message, sop_class, instance)
        try:
            outcome = await self._perform(nrequest, request)
            await _respond(association, request, outcome, sop_class, instance)
        finally:
            nrequest._responded_event().set()

    async def _perform(self, request: NRequest, received: Received) -> _Outcome:
        association, message = request.association, request.message
        operation, sop_class = request.operation, request.sop_class_uid
        if sop_class != received.context.abstract_syntax:
            return _Outcome(0x0122, text="SOP class not accepted on this presentation context")
        if received.data is not None:
            try:
                request.dataset = decode_received(received.data, received.context.transfer_syntax)
            except Exception as exc:
                return _Outcome(0x0110, text=f"data set cannot be decoded: {exc}")
        if await association.diverted(message, request):
            return _Outcome(request.status)
        handler = association.handlers.get(handler_key(operation, sop_class))
        if handler is None:
            return _unhandled(association.handlers, operation, sop_class)
        try:
            status, reply = _result(await handler(request))
        except DimseError as exc:
            log.info("%s handler refused: %s", operation, exc)
            return _Outcome(int(exc.status), None, exc.error_comment, exc.attributes, exc.error_id)
        except Exception as exc:
            log.exception("%s handler for %s failed", operation, sop_class)
            return _Outcome(0x0110, text=comment(exc))
        return _Outcome(status, reply)


def _addressed(message: NRequestMessage) -> tuple[str, str]:
    """The SOP class and instance a request addresses (an N-CREATE without an instance
    UID gets a new one, PS3.7 §10.1.5.1.3)."""
    if isinstance(message, (NCreateRQ, NEventReportRQ)):
        instance = message.affected_sop_instance_uid or generate_uid(prefix=None)
        return message.affected_sop_class_uid, instance
    return message.requested_sop_class_uid, message.requested_sop_instance_uid


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What a request is answered: status, reply data set and the status's fields."""

    status: int
    reply: Dataset | None = None
    text: str | None = None
    attributes: tuple[int, ...] = ()
    error_id: int | None = None


def _unhandled(handlers: Handlers, operation: str, sop_class: str) -> _Outcome:
    if any(handlers.get(handler_key(op, sop_class)) for op in _OPERATION.values()):
        return _Outcome(0x0211, text=f"{operation} is not supported for this SOP class")
    return _Outcome(0x0122, text="SOP class not supported")


async def _respond(
    association: BaseAssociation,
    received: Received,
    outcome: _Outcome,
    sop_class: str,
    instance: str,
) -> None:
    message = received.message
    response = response_to(
        message,
        outcome.status,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=instance,
        error_comment=outcome.text,
        error_id=outcome.error_id,
        attribute_identifier_list=outcome.attributes or None,
        event_type_id=getattr(message, "event_type_id", None),
        action_type_id=getattr(message, "action_type_id", None),
    )
    data = None
    if outcome.reply is not None:
        data = encode_dataset(outcome.reply, received.context.transfer_syntax)
    await association.send_message(received.context.context_id, response, data)
