"""The DIMSE operations of one association, by Message ID (PS3.7 §9.1, §10.1, §D.3.3.3).

Sans-IO, as h2 keeps its stream states: the shell asks before it sends a request,
tells what it sent and received, and acts on the verdicts; time is an argument.

Invoked by this side: a request is reserved (Message ID allocated, one slot of the
asynchronous operations window taken), sent (the DIMSE timeout runs), answered by
pending responses (each restarts the timeout) and one final response; or cancelled
(C-CANCEL sent, or the caller left), after which what still comes is dropped until the
final response frees the slot. Performed by this side: the peer's requests by their
Message ID, so that a C-CANCEL reaches the one it names and the window is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dicomnet.errors import InvalidStateError

__all__ = ["Invoked", "InvokedState", "Operations", "Verdict"]

_MAX_ID = 0xFFFF


class InvokedState(Enum):
    RESERVED = "reserved"  # Message ID allocated, request not sent yet
    SENT = "sent"  # waiting for the first response
    PENDING = "pending"  # pending responses arrived
    CANCELLED = "cancelled"  # C-CANCEL sent or the caller gone: waiting for the final


class Verdict(Enum):
    """What to do with a received response."""

    DELIVER = "deliver"  # a pending response for the caller
    FINAL = "final"  # the final response for the caller: the operation is over
    DROP = "drop"  # a pending response nobody waits for any more
    DROP_FINAL = "drop final"  # the final response nobody waits for: over
    UNKNOWN = "unknown"  # no operation of ours has this Message ID


@dataclass(slots=True)
class Invoked:
    """A request this side invoked."""

    message_id: int
    state: InvokedState = InvokedState.RESERVED
    deadline: float | None = None


class Operations:
    """Requests invoked and performed on one association.

    `max_invoked` / `max_performed`: the negotiated asynchronous operations window
    (PS3.7 §D.3.3.3; 0: unlimited). `dimse_timeout`: seconds to wait for each response
    (None: forever).
    """

    def __init__(
        self, *, max_invoked: int = 1, max_performed: int = 1, dimse_timeout: float | None = None
    ) -> None:
        self.max_invoked = max_invoked
        self.max_performed = max_performed
        self.dimse_timeout = dimse_timeout
        self.invoked: dict[int, Invoked] = {}
        self.performing: set[int] = set()
        self._next_id = 1

    # --- invoked by this side -------------------------------------------------------------

    @property
    def can_invoke(self) -> bool:
        """A request may be reserved now (the window has room)."""
        count, window = len(self.invoked), self.max_invoked
        return (window == 0 or count < window) and count < _MAX_ID

    def invoke(self) -> int:
        """Reserve a Message ID (1..65535, unique among the outstanding) for a request."""
        if not self.can_invoke:
            raise InvalidStateError("the asynchronous operations window is full")
        while True:
            candidate = self._next_id
            self._next_id = candidate % _MAX_ID + 1
            if candidate not in self.invoked:
                self.invoked[candidate] = Invoked(candidate)
                return candidate

    def sent(self, message_id: int, now: float) -> None:
        """The request went out at `now`: the DIMSE timeout runs."""
        operation = self.invoked[message_id]
        if operation.state is InvokedState.RESERVED:
            operation.state = InvokedState.SENT
        self._restart(operation, now)

    def response(self, message_id: int, final: bool, now: float) -> Verdict:
        """A response to `message_id` arrived at `now` (perhaps before the shell could
        say that the request went out: its answer is proof enough)."""
        operation = self.invoked.get(message_id)
        if operation is None:
            return Verdict.UNKNOWN
        cancelled = operation.state is InvokedState.CANCELLED
        if final:
            del self.invoked[message_id]
            return Verdict.DROP_FINAL if cancelled else Verdict.FINAL
        self._restart(operation, now)
        if cancelled:
            return Verdict.DROP
        operation.state = InvokedState.PENDING
        return Verdict.DELIVER

    def cancel(self, message_id: int) -> bool:
        """The caller wants no more responses. True: send C-CANCEL-RQ now (PS3.7
        §9.3.2.3); the operation ends at its final response. A request never sent ends
        at once."""
        operation = self.invoked.get(message_id)
        if operation is None or operation.state is InvokedState.CANCELLED:
            return False
        if operation.state is InvokedState.RESERVED:
            del self.invoked[message_id]
            return False
        operation.state = InvokedState.CANCELLED
        return True

    def abandon(self, message_id: int) -> None:
        """As `cancel`, for services without C-CANCEL: what comes is dropped."""
        self.cancel(message_id)

    def is_outstanding(self, message_id: int) -> bool:
        return message_id in self.invoked

    def get_timer(self) -> float | None:
        """The earliest response deadline, if any."""
        earliest = None
        for operation in self.invoked.values():
            deadline = operation.deadline
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def expired(self, now: float) -> list[int]:
        """The operations whose response is overdue at `now`; they are over."""
        late = [
            mid
            for mid, op in self.invoked.items()
            if op.deadline is not None and now >= op.deadline
        ]
        for message_id in late:
            del self.invoked[message_id]
        return late

    def close(self) -> list[int]:
        """The association ended: every outstanding operation is over."""
        ended = list(self.invoked)
        self.invoked.clear()
        self.performing.clear()
        return ended

    def _restart(self, operation: Invoked, now: float) -> None:
        if self.dimse_timeout is not None:
            operation.deadline = now + self.dimse_timeout

    # --- performed by this side -----------------------------------------------------------

    @property
    def can_perform(self) -> bool:
        """Another of the peer's requests may start now (the window has room)."""
        window = self.max_performed
        return window == 0 or len(self.performing) < window

    def perform(self, message_id: int) -> bool:
        """The peer's request `message_id` starts. False when a request of that Message
        ID is still being performed (a duplicate invocation, PS3.7 Annex C 0x0210)."""
        if message_id in self.performing:
            return False
        self.performing.add(message_id)
        return True

    def cancel_requested(self, message_id: int) -> bool:
        """A C-CANCEL-RQ names `message_id`: True if that request is being performed."""
        return message_id in self.performing

    def performed(self, message_id: int) -> None:
        """The peer's request `message_id` was answered (its final response sent)."""
        self.performing.discard(message_id)
