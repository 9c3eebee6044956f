"""Extended negotiation items (PS3.7 Annex D.3.3), each through one small interface.

An item is offered by the requestor (`offer`), answered by the acceptor (`answer`) and
read back by the requestor (`finalise`). Adding an item means adding a class here,
not touching the Upper Layer or the association code. SCP/SCU Role Selection is
negotiated with the presentation contexts it qualifies (`dicomnet.proto.contexts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from dicomnet.proto.pdu import (
    AsyncOperationsWindow,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)

__all__ = [
    "AsyncOperationsWindowNegotiation",
    "ExtendedNegotiation",
    "SOPClassExtendedNegotiations",
    "UserIdentityNegotiation",
]


class ExtendedNegotiation(Protocol):
    """One user-information item's negotiation, both sides."""

    def offer(self, request: UserInformation) -> UserInformation:
        """Requestor: add the item to the A-ASSOCIATE-RQ user information."""
        ...

    def answer(self, request: UserInformation, response: UserInformation) -> UserInformation:
        """Acceptor: add the answer to the A-ASSOCIATE-AC user information."""
        ...

    def finalise(self, request: UserInformation, response: UserInformation) -> None:
        """Requestor: read the acceptor's answer."""
        ...


def _limit(theirs: int, ours: int) -> int:
    """The smaller of two window sizes where 0 means unlimited."""
    if theirs == 0:
        return ours
    if ours == 0:
        return theirs
    return min(theirs, ours)


@dataclass
class AsyncOperationsWindowNegotiation:
    """Asynchronous Operations Window (PS3.7 §D.3.3.3).

    `max_invoked` / `max_performed` are this side's limits (0: unlimited). The item is
    sent only when it is not (1, 1): some peers drop associations that carry it.
    After negotiation `invoked` is how many requests we may have outstanding and
    `performed` how many of the peer's we must be ready to run at once.
    """

    max_invoked: int = 1
    max_performed: int = 1
    invoked: int = 1
    performed: int = 1

    def offer(self, request: UserInformation) -> UserInformation:
        if (self.max_invoked, self.max_performed) == (1, 1):
            return request
        window = AsyncOperationsWindow(self.max_invoked, self.max_performed)
        return replace(request, async_operations_window=window)

    def answer(self, request: UserInformation, response: UserInformation) -> UserInformation:
        proposed = request.async_operations_window
        if proposed is None:
            self.invoked = self.performed = 1
            return response
        # The acceptor invokes no more than the requestor performs, and vice versa.
        self.invoked = _limit(proposed.max_performed, self.max_invoked)
        self.performed = _limit(proposed.max_invoked, self.max_performed)
        if (self.invoked, self.performed) == (1, 1):
            return response
        window = AsyncOperationsWindow(self.invoked, self.performed)
        return replace(response, async_operations_window=window)

    def finalise(self, request: UserInformation, response: UserInformation) -> None:
        window = response.async_operations_window
        if window is None or request.async_operations_window is None:
            self.invoked = self.performed = 1
            return
        self.invoked = _limit(window.max_performed, self.max_invoked)
        self.performed = _limit(window.max_invoked, self.max_performed)


@dataclass
class UserIdentityNegotiation:
    """User Identity (PS3.7 §D.3.3.7).

    Requestor: `identity` is offered; after negotiation `server_response` holds the
    acceptor's answer (None when it sent none). Acceptor: `server_response` is what to
    answer when a positive response was requested (PS3.7 §D.3.3.7.2: empty for types 1
    and 2, a Kerberos ticket, SAML or JWT response for 3 to 5), None to send no answer:
    an identity nobody verified is not confirmed.
    """

    identity: UserIdentityRQ | None = None
    server_response: bytes | None = None

    def offer(self, request: UserInformation) -> UserInformation:
        if self.identity is None:
            return request
        return replace(request, user_identity_rq=self.identity)

    def answer(self, request: UserInformation, response: UserInformation) -> UserInformation:
        identity = request.user_identity_rq
        if identity is None or not identity.positive_response_requested:
            return response
        if self.server_response is None:
            return response
        return replace(response, user_identity_ac=UserIdentityAC(self.server_response))

    def finalise(self, request: UserInformation, response: UserInformation) -> None:
        answer = response.user_identity_ac
        self.server_response = answer.server_response if answer is not None else None


def _agreed(asked: bytes, supported: bytes) -> bytes:
    """The answer to a service-class application information request: for the flag
    bytes of the Query/Retrieve classes (PS3.4 §C.5.1.1.2, §C.5.2.1.2, ...), each byte
    what both support, no longer than what was asked."""
    return bytes(min(a, b) for a, b in zip(asked, supported, strict=False))


@dataclass
class SOPClassExtendedNegotiations:
    """SOP Class Extended and Common Extended Negotiation (PS3.7 §D.3.3.5, §D.3.3.6).

    Requestor: `offered` / `common` are sent; `accepted` then holds what the acceptor
    answered, by SOP class. Acceptor: `supported` maps a SOP class to the service-class
    application information we support; each byte of the answer is the smaller of the
    requested and the supported one (the option flags of PS3.4 Annex C: 0 or 1), and
    items for other classes are left out of the answer, which is how an acceptor
    declines them. `common` receives the requestor's
    common extended items.
    """

    offered: tuple[SOPClassExtendedNegotiation, ...] = ()
    common: tuple[SOPClassCommonExtendedNegotiation, ...] = ()
    supported: dict[str, bytes] = field(default_factory=dict)
    accepted: dict[str, bytes] = field(default_factory=dict)

    def offer(self, request: UserInformation) -> UserInformation:
        return replace(
            request, sop_class_extended=self.offered, sop_class_common_extended=self.common
        )

    def answer(self, request: UserInformation, response: UserInformation) -> UserInformation:
        self.common = request.sop_class_common_extended
        answers = tuple(
            SOPClassExtendedNegotiation(
                item.sop_class_uid,
                _agreed(item.service_class_application_information, self.supported[uid]),
            )
            for item in request.sop_class_extended
            if (uid := item.sop_class_uid) in self.supported
        )
        self.accepted = {a.sop_class_uid: a.service_class_application_information for a in answers}
        return replace(response, sop_class_extended=answers) if answers else response

    def finalise(self, request: UserInformation, response: UserInformation) -> None:
        offered = {item.sop_class_uid for item in request.sop_class_extended}
        self.accepted = {
            item.sop_class_uid: item.service_class_application_information
            for item in response.sop_class_extended
            if item.sop_class_uid in offered
        }
