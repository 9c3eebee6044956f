"""Audit events: what an acceptor did and for whom, after the events of PS3.15 A.5.3.

An audit hook is any callable taking one event (`AE(audit=hook)`); `AuditLog` is one
that appends each event to a file as one JSON object a line, flushed line by line.
Every event carries the PS3.15 A.5.3 event it stands for (`event_id`), its Event
Action Code (`action`: C create, R read, U update, D delete, E execute), its Event
Outcome Indicator (`outcome`: 0 success, 4 minor failure, 8 serious failure, 12 major
failure), the time (UTC), and the association's participants: calling / called AE
title, peer address, verified user, peer certificate subject. Passwords and tokens are
never part of an event.

| kind | PS3.15 A.5.3 event |
|---|---|
| association-accepted / -rejected / -released / -aborted | User Authentication (Login / Logout) |
| operation: store | DICOM Instances Transferred (C) |
| operation: find, worklist | Query (E) |
| operation: move, get | DICOM Instances Transferred (R) |
| operation: commitment, n-services | DICOM Instances Accessed |
| operation: mpps | Procedure Record |
| operation: echo | Application Activity (E) |
| security-alert | Security Alert (Node Authentication, Use of Restricted Function, ...) |
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dicomnet.observe import command_name
from dicomnet.status import Status
from dicomnet.tls import subject_text

__all__ = [
    "NODE_AUTHENTICATION",
    "USER_AUTHENTICATION",
    "USE_OF_RESTRICTED_FUNCTION",
    "AssociationEvent",
    "AuditEvent",
    "AuditHook",
    "AuditLog",
    "OperationAudit",
    "OperationEvent",
    "SecurityAlert",
    "emit",
    "operation_event",
    "outcome_of",
    "security_alert",
]

log = logging.getLogger("dicomnet")

SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

# Security Alert event type codes (PS3.16 CID 403 / DCM codes used by PS3.15 A.5.3.11).
NODE_AUTHENTICATION = "Node Authentication"  # (110126, DCM): e.g. a TLS failure
USER_AUTHENTICATION = "User Authentication"  # a bad or missing user identity
USE_OF_RESTRICTED_FUNCTION = "Use of Restricted Function"  # (110132, DCM): refused service


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """What every event has: its kind, its PS3.15 event, action, outcome, time and the
    association's participants."""

    kind: str
    event_id: str
    action: str = "E"
    outcome: int = SUCCESS
    time: datetime = field(default_factory=_now)
    calling_ae: str | None = None
    called_ae: str | None = None
    peer_host: str | None = None
    peer_port: int | None = None
    user: str | None = None
    certificate_subject: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object (time as UTC ISO-8601; None fields left out)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["time"] = self.time.astimezone(timezone.utc).isoformat(timespec="microseconds")
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class AssociationEvent(AuditEvent):
    """Association accepted, rejected (with result / source / reason, PS3.8 Table 9-21),
    released or aborted; `identity_type` the User Identity type offered (PS3.7
    §D.3.3.7.1), `claimed_user` the name it claimed when not verified."""

    result: int | None = None
    source: int | None = None
    reason: int | None = None
    identity_type: int | None = None
    claimed_user: str | None = None
    contexts_accepted: int | None = None
    contexts_proposed: int | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationEvent(AuditEvent):
    """One DIMSE operation performed: the service, SOP class, SOP instance (C-STORE and
    DIMSE-N), the query keys (C-FIND / C-MOVE / C-GET identifier: keyword -> value),
    the move destination, the final status, and for C-MOVE / C-GET the sub-operations
    completed, failed and with a warning."""

    service: str
    command: str
    message_id: int
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    query: Mapping[str, str] | None = None
    move_destination: str | None = None
    status: int | None = None
    error_comment: str | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityAlert(AuditEvent):
    """A security alert (PS3.15 A.5.3.11): `alert` the event type (bad identity,
    refused service, TLS failure), `detail` what happened."""

    alert: str
    detail: str = ""
    sop_class_uid: str | None = None
    service: str | None = None


AuditHook = Callable[[AuditEvent], object]


def emit(hook: AuditHook | None, event: AuditEvent) -> None:
    """Give `event` to `hook`; an audit hook that fails is logged, never fatal."""
    if hook is None:
        return
    try:
        hook(event)
    except Exception:
        log.exception("audit hook failed on a %s event", event.kind)


def outcome_of(status: int | None) -> int:
    """The Event Outcome Indicator of a final DIMSE status (PS3.7 Annex C): success 0,
    warning or cancel 4, failure 8, no response at all 12."""
    if status is None:
        return MAJOR_FAILURE
    category = Status(status)
    if category.is_success:
        return SUCCESS
    if category.is_warning or category.is_cancel:
        return MINOR_FAILURE
    return SERIOUS_FAILURE


# service -> (PS3.15 A.5.3 event, Event Action Code)
_EVENTS = {
    "echo": ("Application Activity", "E"),
    "store": ("DICOM Instances Transferred", "C"),
    "find": ("Query", "E"),
    "worklist": ("Query", "E"),
    "move": ("DICOM Instances Transferred", "R"),
    "get": ("DICOM Instances Transferred", "R"),
    "commitment": ("DICOM Instances Accessed", "E"),
    "mpps": ("Procedure Record", "U"),
    "n-services": ("DICOM Instances Accessed", "E"),
}


def query_keys(data: bytes | None, transfer_syntax: str) -> dict[str, str] | None:
    """A C-FIND / C-MOVE / C-GET identifier as keyword -> value (sequences by size)."""
    if not data:
        return None
    from dicomnet.storage import decode_dataset

    try:
        dataset = decode_dataset(data, transfer_syntax)
        keys: dict[str, str] = {}
        for element in dataset:
            name = element.keyword or str(element.tag)
            if element.VR == "SQ":
                keys[name] = f"[{len(element.value)} item(s)]"
            else:
                keys[name] = "" if element.value is None else str(element.value)
        return keys
    except Exception as exc:  # a bad identifier is answered by the service: noted here
        return {"error": f"identifier not decodable: {type(exc).__name__}"}


def operation_event(
    participants: Mapping[str, Any],
    request: Any,
    data: bytes | None,
    abstract_syntax: str,
    transfer_syntax: str,
    response: Any | None,
) -> OperationEvent:
    """The event of one operation performed: `request` its command, `data` its data set
    (the identifier of a query, read for its keys), `response` the final response (None
    when none could be sent)."""
    from dicomnet.access import service_of

    service = service_of(abstract_syntax)
    event_id, action = _EVENTS[service]
    status = getattr(response, "status", None) if response is not None else None
    query = None
    if service in ("find", "worklist", "move", "get"):
        query = query_keys(data, transfer_syntax)
    if service == "mpps" and type(request).__name__ == "NCreateRQ":
        action = "C"
    instance = getattr(request, "affected_sop_instance_uid", None) or getattr(
        request, "requested_sop_instance_uid", None
    )
    if instance is None and response is not None:
        instance = getattr(response, "affected_sop_instance_uid", None)
    sop_class = getattr(request, "affected_sop_class_uid", None) or getattr(
        request, "requested_sop_class_uid", None
    )
    return OperationEvent(
        kind="operation",
        event_id=event_id,
        action=action,
        outcome=outcome_of(status),
        service=service,
        command=command_name(request),
        message_id=getattr(request, "message_id", 0),
        sop_class_uid=sop_class,
        sop_instance_uid=instance,
        query=query,
        move_destination=getattr(request, "move_destination", None),
        status=status,
        error_comment=getattr(response, "error_comment", None),
        completed=getattr(response, "completed", None),
        failed=getattr(response, "failed", None),
        warning=getattr(response, "warning", None),
        **participants,
    )


def security_alert(
    hook: AuditHook | None,
    alert: str,
    detail: str,
    *,
    peer: tuple[str, int] | None = None,
    calling_ae: str | None = None,
    called_ae: str | None = None,
    user: str | None = None,
    certificate: Mapping[str, Any] | None = None,
    outcome: int = MINOR_FAILURE,
    **more: Any,
) -> None:
    """Record a security alert (e.g. from a failed TLS handshake: `NODE_AUTHENTICATION`)."""
    emit(
        hook,
        SecurityAlert(
            kind="security-alert",
            event_id="Security Alert",
            outcome=outcome,
            alert=alert,
            detail=detail,
            peer_host=peer[0] if peer else None,
            peer_port=peer[1] if peer else None,
            calling_ae=calling_ae,
            called_ae=called_ae,
            user=user,
            certificate_subject=subject_text(dict(certificate) if certificate else None),
            **more,
        ),
    )


class OperationAudit:
    """The operations of one association, each recorded when its final response is sent
    (or when it ends without one): what an acceptor with an audit hook holds."""

    def __init__(self, hook: AuditHook, participants: Mapping[str, Any]) -> None:
        self.hook = hook
        self.participants = participants
        self._performing: dict[int, Any] = {}  # Message ID -> the request (`Received`)

    def performing(self, message_id: int, request: Any) -> None:
        """A request is performed: its event waits for its final response."""
        self._performing[message_id] = request

    def responded(self, message: Any) -> None:
        """A response was sent: a final one records its request's event."""
        message_id = getattr(message, "message_id_being_responded_to", None)
        status = getattr(message, "status", None)
        if message_id is None or status is None or status in (0xFF00, 0xFF01):
            return
        request = self._performing.pop(message_id, None)
        if request is not None:
            self._record(request, message)

    def performed(self, message_id: int) -> None:
        """The request was performed: record it if no final response was sent."""
        request = self._performing.pop(message_id, None)
        if request is not None:
            self._record(request, None)

    def _record(self, request: Any, response: Any | None) -> None:
        context = request.context
        event = operation_event(
            self.participants,
            request.message,
            request.data,
            context.abstract_syntax,
            context.transfer_syntax,
            response,
        )
        emit(self.hook, event)


class AuditLog:
    """An audit hook appending JSON lines to `path` (created 0600), one flush a line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, event: AuditEvent) -> None:
        line = json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":"), default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __repr__(self) -> str:
        return f"<AuditLog {str(self.path)!r}>"
