"""The Verification service (PS3.4 Annex A, PS3.7 §9.1.5): C-ECHO, both roles."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from dicomnet.association import BaseAssociation, Handlers, Received
from dicomnet.errors import NotNegotiatedError
from dicomnet.performing import ServiceBase
from dicomnet.proto.contexts import (
    VERIFICATION,
    AcceptedContext,
    PresentationContext,
    all_transfer_syntaxes,
)
from dicomnet.proto.dimse import CEchoRQ, CEchoRSP
from dicomnet.services.common import check, comment, status_of
from dicomnet.status import Status

__all__ = ["ON_ECHO", "EchoRequest", "Verification", "VerificationUser"]

log = logging.getLogger("dicomnet")

ON_ECHO = "on_echo"  # the handler's key in `Handlers`


@dataclass(slots=True)
class EchoRequest:
    """A C-ECHO-RQ (PS3.7 §9.1.5)."""

    association: BaseAssociation
    context: AcceptedContext
    message: CEchoRQ


class VerificationUser(BaseAssociation):
    """What the Verification service offers the SCU."""

    async def echo(self) -> Status:
        """C-ECHO (PS3.7 §9.1.5). Returns the status; a failure raises `DimseError`."""
        context = self.context_for(VERIFICATION)
        if context is None:
            raise NotNegotiatedError("Verification SOP Class (1.2.840.10008.1.1) not accepted")
        cid = context.context_id
        response, _ = await self.send_request(
            context, lambda mid: CEchoRQ(mid), lambda msg: self.send_message(cid, msg)
        )
        return check(response)


class Verification(ServiceBase):
    """The SCP side: every AE answers C-ECHO (success, or what `on_echo` returns)."""

    requests: ClassVar[tuple[type[Any], ...]] = (CEchoRQ,)
    inline: ClassVar[bool] = True

    def contexts(
        self, handlers: Handlers, models: tuple[str, ...]
    ) -> dict[str, PresentationContext]:
        return {VERIFICATION: PresentationContext(VERIFICATION, all_transfer_syntaxes())}

    async def serve(self, association: BaseAssociation, request: Received) -> None:
        message = request.message
        assert isinstance(message, CEchoRQ)
        status, text = 0x0000, None
        handler = association.handlers.get(ON_ECHO)
        if handler is not None:
            try:
                status, text = status_of(
                    await handler(EchoRequest(association, request.context, message))
                )
            except Exception as exc:
                log.exception("on_echo handler failed")
                status, text = 0xC000, comment(exc)
        response = CEchoRSP(message.message_id, status, message.affected_sop_class_uid, text)
        await association.send_message(request.context.context_id, response)
