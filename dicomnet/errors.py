"""The exception hierarchy: everything dicomnet raises derives from `DicomNetError`."""

from __future__ import annotations

import builtins
from typing import Any

__all__ = [
    "ARTIMTimeout",
    "AssociationAborted",
    "AssociationRejected",
    "ConnectTimeout",
    "ConnectionFailed",
    "DicomNetError",
    "DicomTimeoutError",
    "DimseError",
    "DimseTimeout",
    "IdleTimeout",
    "InvalidStateError",
    "NotNegotiatedError",
    "ProtocolError",
    "Reject",
    "TLSError",
]


class DicomNetError(Exception):
    """Root of every error dicomnet raises."""


class ProtocolError(DicomNetError):
    """The peer sent something the standard does not allow (the association is aborted)."""


class InvalidStateError(DicomNetError):
    """A local request that the Upper Layer state machine does not allow in its current state."""


class AssociationRejected(DicomNetError):
    """The peer answered A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (PS3.8 Table 9-21)."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        from dicomnet.proto.pdu import describe_rejection

        self.result = result
        self.source = source
        self.reason = reason
        text = describe_rejection(result, source, reason)
        if source == 1 and reason in _REJECTION_HINTS:
            text += f" ({_REJECTION_HINTS[reason]})"
        super().__init__(text)


# What to check after a rejection by the service user (PS3.8 Table 9-21).
_REJECTION_HINTS = {
    3: "the peer does not accept our calling AE title: check aet / --aet",
    7: "the peer has another AE title than the one called: check aec / --aec",
}


class AssociationAborted(DicomNetError):
    """The association ended by A-ABORT or A-P-ABORT, or the connection was lost."""

    def __init__(self, message: str, source: int | None = None, reason: int | None = None) -> None:
        self.source = source
        self.reason = reason
        super().__init__(message)


class DimseError(DicomNetError):
    """A DIMSE response with a failure (or otherwise unexpected) status."""

    def __init__(
        self,
        status: int,
        error_comment: str | None = None,
        message: str = "",
        *,
        response: Any = None,
        attributes: tuple[int, ...] = (),
        error_id: int | None = None,
    ) -> None:
        from dicomnet.status import Status

        self.status = Status(status)
        self.error_comment = error_comment
        self.response = response  # the response received (an `NResponse` for DIMSE-N)
        # Raised by a DIMSE-N handler: the Attribute Identifier List and Error ID of the
        # failure response (PS3.7 Annex C: e.g. 0x0106, 0x0120, 0x0121).
        self.attributes = attributes
        self.error_id = error_id
        text = message or f"DIMSE operation failed with status {self.status!r}"
        if error_comment:
            text += f": {error_comment}"
        super().__init__(text)


class ConnectionFailed(DicomNetError, ConnectionError):
    """The TCP connection to the peer could not be opened (refused, unreachable)."""


class TLSError(ConnectionFailed):
    """The TLS connection to the peer failed: its certificate is not trusted or expired, it
    refused ours, no protocol version or suite in common, or it does not speak TLS."""


class InvalidDatasetError(DicomNetError, ValueError):
    """A file or data set that is not DICOM, or lacks what the operation needs (a SOP
    Class and Instance UID to store it under, a Transfer Syntax UID in its file meta)."""


class NotNegotiatedError(DicomNetError):
    """No accepted presentation context fits what is about to be sent."""


class DicomTimeoutError(DicomNetError, builtins.TimeoutError):
    """Base of dicomnet's timeouts (also a builtin `TimeoutError`)."""


class ConnectTimeout(DicomTimeoutError):
    """The TCP connection could not be opened in time."""


class ARTIMTimeout(DicomTimeoutError):
    """The association request, response or release was not answered in time (PS3.8 §9.1.5)."""


class DimseTimeout(DicomTimeoutError):
    """A DIMSE response did not arrive in time."""


class IdleTimeout(DicomTimeoutError):
    """Nothing arrived on the association for longer than the idle (network) timeout."""


class Reject(DicomNetError):
    """Raised by an `on_association` handler to refuse with A-ASSOCIATE-RJ (PS3.8 Table 9-21).

    `result` 1 = rejected-permanent, 2 = rejected-transient; `source` 1 = service-user,
    2 = service-provider (ACSE), 3 = service-provider (presentation); `reason` as in the table.
    """

    def __init__(self, result: int = 1, source: int = 1, reason: int = 1) -> None:
        from dicomnet.proto.pdu import describe_rejection

        self.result = result
        self.source = source
        self.reason = reason
        super().__init__(describe_rejection(result, source, reason))
