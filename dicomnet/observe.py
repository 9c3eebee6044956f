"""Observers: what an application learns of associations and operations as they happen.

An `Observer` is given to `AE(observer=...)` or `connect(observer=...)` (default None:
nothing is observed, at the cost of a None check). Its methods are called on the event
loop, each with a record of what happened; subclass it and override those you need
(`dicomnet.metrics.PrometheusObserver` is one). A method that raises is logged, never
fatal; one that blocks holds up the event loop, so an observer only counts.

- `association_opened(a)`: an association was established (as requestor or acceptor);
- `association_closed(a)`: it ended (`a.outcome` released or aborted, `a.duration`), or
  a request was rejected (outcome rejected, `a.rejection`; no `association_opened`);
- `operation_started(op)`: a request went out (role SCU) or arrived in full (role SCP);
- `operation_finished(op)`: its final response came or went (`op.status`; None when the
  association ended first), with the data set bytes in and out and `op.duration`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ObservedAssociation",
    "ObservedOperation",
    "Observer",
    "Tracker",
    "command_name",
    "observe_rejection",
]

log = logging.getLogger("dicomnet")

REQUESTOR, ACCEPTOR = "requestor", "acceptor"
SCU, SCP = "SCU", "SCP"
RELEASED, ABORTED, REJECTED = "released", "aborted", "rejected"


@dataclass(slots=True, eq=False)
class ObservedAssociation:
    """An association: our `role` (requestor / acceptor), AE titles, the peer's address;
    once closed, `outcome` (released / aborted / rejected), `duration` in seconds and,
    when rejected, `rejection` (result, source, reason: PS3.8 Table 9-21)."""

    role: str
    local_ae_title: str
    peer_ae_title: str
    peer_host: str
    peer_port: int
    opened: float  # the association's clock when it opened (monotonic seconds)
    outcome: str = "open"
    duration: float = 0.0
    rejection: tuple[int, int, int] | None = None


@dataclass(slots=True, eq=False)
class ObservedOperation:
    """One DIMSE operation: its `command` (C-STORE, N-ACTION...), our `role` (SCU: we
    invoked it; SCP: we performed it), Message ID and SOP class; once finished, the final
    `status` (None: no final response), the bytes of the data sets received
    (`bytes_in`) and sent (`bytes_out`) with it, and `duration` in seconds."""

    association: ObservedAssociation
    command: str
    role: str
    message_id: int
    sop_class_uid: str
    started: float
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    duration: float = 0.0


class Observer:
    """What is told of associations and operations; every method does nothing here."""

    def association_opened(self, association: ObservedAssociation) -> None:
        """An association was established."""

    def association_closed(self, association: ObservedAssociation) -> None:
        """An association ended, or a request for one was rejected."""

    def operation_started(self, operation: ObservedOperation) -> None:
        """An operation began: its request was sent, or received in full."""

    def operation_finished(self, operation: ObservedOperation) -> None:
        """An operation ended: its final response was received or sent, or it never will."""


_NAMES: dict[type[Any], str] = {}


def command_name(message: object) -> str:
    """The DIMSE command of a message: `CStoreRQ` -> 'C-STORE', `NActionRSP` -> 'N-ACTION'."""
    kind = type(message)
    name = _NAMES.get(kind)
    if name is None:
        name = kind.__name__.removesuffix("RQ").removesuffix("RSP")
        if len(name) > 1 and name[1].isupper():
            name = f"{name[0]}-{name[1:].upper()}"
        _NAMES[kind] = name
    return name


def _call(method: Any, record: Any) -> None:
    try:
        method(record)
    except Exception:
        log.exception("observer %s failed", getattr(method, "__name__", method))


def observe_rejection(
    observer: Observer,
    role: str,
    local_ae_title: str,
    peer_ae_title: str,
    peer: tuple[str, int],
    rejection: tuple[int, int, int],
    duration: float,
) -> None:
    """Tell `observer` of an association request rejected (`association_closed` alone)."""
    association = ObservedAssociation(
        role,
        local_ae_title.strip(),
        peer_ae_title.strip(),
        str(peer[0]),
        int(peer[1]),
        0.0,
        REJECTED,
        duration,
        rejection,
    )
    _call(observer.association_closed, association)


class Tracker:
    """The observed side of one association: made by the association when it has an
    observer, called by its reader, invoker and performer at each event."""

    __slots__ = ("_clock", "_observer", "_opened", "_performing", "association")

    def __init__(
        self,
        observer: Observer,
        association: ObservedAssociation,
        clock: Any,
    ) -> None:
        self._observer = observer
        self._clock = clock
        self.association = association
        self._performing: dict[int, ObservedOperation] = {}  # Message ID -> operation
        self._opened = False

    @classmethod
    def of(
        cls,
        observer: Observer,
        is_requestor: bool,
        request: Any,
        peer: tuple[str, int],
        clock: Any,
    ) -> Tracker:
        """The tracker of an association negotiated with `request` (its A-ASSOCIATE-RQ)."""
        local, remote = request.calling_ae_title, request.called_ae_title
        if not is_requestor:
            local, remote = remote, local
        role = REQUESTOR if is_requestor else ACCEPTOR
        association = ObservedAssociation(
            role, local.strip(), remote.strip(), str(peer[0]), int(peer[1]), clock()
        )
        return cls(observer, association, clock)

    def opened(self) -> None:
        """The association is established (told once)."""
        if self._opened:
            return
        self._opened = True
        self.association.opened = self._clock()
        _call(self._observer.association_opened, self.association)

    def closed(self, aborted: bool) -> None:
        association = self.association
        if association.outcome != "open":
            return
        association.outcome = ABORTED if aborted else RELEASED
        association.duration = self._clock() - association.opened
        for operation in list(self._performing.values()):
            self.finish(operation)
        self._performing.clear()
        _call(self._observer.association_closed, association)

    def start(self, message: Any, role: str, sop_class_uid: str, nbytes: int) -> ObservedOperation:
        """An operation begins: `message` its request, `nbytes` its data set's bytes."""
        operation = ObservedOperation(
            self.association,
            command_name(message),
            role,
            getattr(message, "message_id", 0),
            sop_class_uid,
            self._clock(),
        )
        if role == SCU:
            operation.bytes_out = nbytes
        else:
            operation.bytes_in = nbytes
            self._performing[operation.message_id] = operation
        _call(self._observer.operation_started, operation)
        return operation

    def finish(self, operation: ObservedOperation, status: int | None = None) -> None:
        """The operation ended (with `status`, or the one its final response had)."""
        if status is not None:
            operation.status = status
        operation.duration = self._clock() - operation.started
        _call(self._observer.operation_finished, operation)

    def responded(self, message: Any, nbytes: int) -> None:
        """We sent a response: its bytes and, when final, its status, go to the operation."""
        operation = self._performing.get(getattr(message, "message_id_being_responded_to", -1))
        if operation is None:
            return
        operation.bytes_out += nbytes
        status = getattr(message, "status", None)
        if status is not None and status not in (0xFF00, 0xFF01):
            operation.status = status

    def performed(self, message_id: int) -> None:
        """The request `message_id` was performed (answered or not)."""
        operation = self._performing.pop(message_id, None)
        if operation is not None:
            self.finish(operation)
