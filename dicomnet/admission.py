"""Who may associate, as what user, for which services: the acceptor's checks between
the A-ASSOCIATE-RQ and its answer, and their audit events.

`Admission` is made per association request by `Server`: `authenticate()` verifies
the User Identity (PS3.7 §D.3.3.7) with the AE's authenticator, `check_access()` asks
its access policy which services the peer may use, `restrict()` rejects the contexts
of the others (PS3.8 Table 9-18, result 1); each refusal is audited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from dicomnet.access import restrict
from dicomnet.audit import (
    USE_OF_RESTRICTED_FUNCTION,
    USER_AUTHENTICATION,
    AssociationEvent,
    OperationAudit,
    emit,
    security_alert,
)
from dicomnet.identity import USERNAME_AND_PASSCODE, Authenticated, claimed_user
from dicomnet.proto.contexts import Negotiated
from dicomnet.proto.pdu import AAssociateRJ, AAssociateRQ
from dicomnet.tls import subject_text

if TYPE_CHECKING:
    from dicomnet.association import BaseAssociation
    from dicomnet.server import AE

__all__ = ["Admission"]

log = logging.getLogger("dicomnet")

# Rejected-permanent, service-user, no reason given (PS3.8 Table 9-21; PS3.7 §D.3.3.7).
REJECTED = AAssociateRJ(1, 1, 1)


@dataclass
class Admission:
    """One association request on its way through the acceptor's checks."""

    ae: AE
    rq: AAssociateRQ
    peer: tuple[str, int]
    certificate: dict[str, Any] | None = None
    user: str | None = None
    server_response: bytes | None = None  # the User Identity AC to send, if asked for
    allowed: frozenset[str] | None = None  # None: every service
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def participants(self) -> dict[str, Any]:
        """What every audit event of this association names."""
        return {
            "calling_ae": self.rq.calling_ae_title.strip(),
            "called_ae": self.rq.called_ae_title.strip(),
            "peer_host": self.peer[0],
            "peer_port": self.peer[1],
            "user": self.user,
            "certificate_subject": subject_text(self.certificate),
        }

    def _alert(self, alert: str, detail: str, **more: Any) -> None:
        log.warning(
            "security alert from %r (%s:%s): %s",
            self.rq.calling_ae_title.strip(),
            self.peer[0],
            self.peer[1],
            detail,
        )
        participants = self.participants
        security_alert(
            self.ae.audit,
            alert,
            detail,
            peer=self.peer,
            calling_ae=participants["calling_ae"],
            called_ae=participants["called_ae"],
            user=self.user,
            certificate=self.certificate,
            **more,
        )

    async def authenticate(self) -> AAssociateRJ | None:
        """Verify the User Identity offered (PS3.7 §D.3.3.7): a rejection, or None."""
        ae = self.ae
        identity = self.rq.user_information.user_identity_rq
        if identity is None:
            if ae.require_user_identity:
                self._alert(USER_AUTHENTICATION, "no user identity offered")
                return REJECTED
            return None
        verdict: Authenticated | None = None
        if ae.authenticator is not None:
            try:
                with anyio.fail_after(ae.settings.artim_timeout):
                    verdict = await ae.authenticator(identity)
            except Exception:
                log.exception("authenticator failed; identity not verified")
        if verdict is not None:
            self.user, self.server_response = verdict.user, verdict.server_response
            return None
        wrong_password = (
            identity.identity_type == USERNAME_AND_PASSCODE and ae.authenticator is not None
        )
        if ae.require_user_identity or wrong_password:
            claimed = claimed_user(identity)
            who = f" for user {claimed!r}" if claimed is not None else ""
            self._alert(
                USER_AUTHENTICATION,
                f"user identity (type {identity.identity_type}){who} not verified",
            )
            return REJECTED
        return None

    def check_access(self) -> AAssociateRJ | None:
        """The services the access policy allows this peer; none at all: a rejection."""
        policy = self.ae.access
        if policy is None:
            return None
        self.allowed = policy.allowed(self.rq.calling_ae_title, self.peer[0], self.user)
        if not self.allowed:
            self._alert(USE_OF_RESTRICTED_FUNCTION, "no service allowed to this peer")
            return REJECTED
        return None

    def restrict(self, negotiated: Negotiated) -> Negotiated | None:
        """Reject the contexts of services not allowed; None when nothing is left."""
        if self.allowed is None:
            return negotiated
        before = len(negotiated.contexts)
        negotiated, self.refused = restrict(negotiated, self.allowed)
        if self.refused:
            services = sorted({service for _, service in self.refused})
            self._alert(
                USE_OF_RESTRICTED_FUNCTION,
                f"service(s) refused: {', '.join(services)} "
                f"({len(self.refused)} presentation context(s) rejected)",
                service=",".join(services),
            )
        if before and not negotiated.contexts:
            return None
        return negotiated

    # --- association events ----------------------------------------------------------------

    def _event(self, kind: str, outcome: int, **values: Any) -> AssociationEvent:
        identity = self.rq.user_information.user_identity_rq
        claimed = claimed_user(identity)
        return AssociationEvent(
            kind=kind,
            event_id="User Authentication",
            outcome=outcome,
            identity_type=identity.identity_type if identity is not None else None,
            claimed_user=claimed if claimed != self.user else None,
            contexts_proposed=len(self.rq.presentation_contexts),
            **self.participants,
            **values,
        )

    def rejected(self, rejection: AAssociateRJ) -> None:
        if self.ae.audit is None:
            return
        event = self._event(
            "association-rejected",
            4,
            result=rejection.result,
            source=rejection.source,
            reason=rejection.reason,
        )
        emit(self.ae.audit, event)

    def accepted(self, association: BaseAssociation) -> None:
        """Audit the acceptance, and give the association what it needs to audit."""
        association.user = self.user
        if self.ae.audit is None:
            return
        association.audit = OperationAudit(self.ae.audit, self.participants)
        event = self._event("association-accepted", 0, contexts_accepted=len(association.contexts))
        emit(self.ae.audit, event)

    def ended(self, association: BaseAssociation) -> None:
        if self.ae.audit is None:
            return
        released = association.outcome == "released"
        event = self._event(
            "association-released" if released else "association-aborted",
            0 if released else 4,
            detail=None if released else association.outcome,
        )
        emit(self.ae.audit, event)
