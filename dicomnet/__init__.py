"""dicomnet: an asyncio-native DICOM networking framework (PS3.7 DIMSE, PS3.8 Upper Layer)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dicomnet._version import __version__
from dicomnet.errors import (
    ARTIMTimeout,
    AssociationAborted,
    AssociationRejected,
    ConnectionFailed,
    ConnectTimeout,
    DicomNetError,
    DicomTimeoutError,
    DimseError,
    DimseTimeout,
    IdleTimeout,
    InvalidDatasetError,
    InvalidStateError,
    NotNegotiatedError,
    ProtocolError,
    Reject,
    TLSError,
)
from dicomnet.status import Status, StatusCategory

if TYPE_CHECKING:
    from dicomnet.association import Handlers
    from dicomnet.client import connect, default_contexts, retrieve_contexts
    from dicomnet.identity import UserIdentity
    from dicomnet.observe import ObservedAssociation, ObservedOperation, Observer
    from dicomnet.pool import Pool, PoolStats
    from dicomnet.proto.contexts import AcceptedContext, PresentationContext
    from dicomnet.server import (
        AE,
        AssociationRequest,
        Server,
        commitment_listener,
        retrieve_listener,
    )
    from dicomnet.services import Association
    from dicomnet.services.commitment import (
        STORAGE_COMMITMENT,
        CommitmentListener,
        CommitmentResult,
        CommitmentSCP,
    )
    from dicomnet.services.nservices import NRequest, NResponse
    from dicomnet.services.qr import (
        FindRequest,
        Responses,
        RetrieveListener,
        RetrieveProgress,
        RetrieveRequest,
    )
    from dicomnet.services.storage import StoreRequest
    from dicomnet.services.verification import EchoRequest
    from dicomnet.tls import Peer
    from dicomnet.transcode import ConversionError

# The rest of the API is imported when first used (PEP 562): `import dicomnet` stays light,
# and a process that needs one part (the indexer of `serve`, a command) loads only that.
_WHERE = {
    "Handlers": "dicomnet.association",
    "connect": "dicomnet.client",
    "default_contexts": "dicomnet.client",
    "retrieve_contexts": "dicomnet.client",
    "UserIdentity": "dicomnet.identity",
    "ObservedAssociation": "dicomnet.observe",
    "ObservedOperation": "dicomnet.observe",
    "Observer": "dicomnet.observe",
    "Pool": "dicomnet.pool",
    "PoolStats": "dicomnet.pool",
    "AcceptedContext": "dicomnet.proto.contexts",
    "PresentationContext": "dicomnet.proto.contexts",
    "AE": "dicomnet.server",
    "AssociationRequest": "dicomnet.server",
    "Server": "dicomnet.server",
    "commitment_listener": "dicomnet.server",
    "retrieve_listener": "dicomnet.server",
    "Association": "dicomnet.services",
    "STORAGE_COMMITMENT": "dicomnet.services.commitment",
    "CommitmentListener": "dicomnet.services.commitment",
    "CommitmentResult": "dicomnet.services.commitment",
    "CommitmentSCP": "dicomnet.services.commitment",
    "NRequest": "dicomnet.services.nservices",
    "NResponse": "dicomnet.services.nservices",
    "FindRequest": "dicomnet.services.qr",
    "Responses": "dicomnet.services.qr",
    "RetrieveListener": "dicomnet.services.qr",
    "RetrieveProgress": "dicomnet.services.qr",
    "RetrieveRequest": "dicomnet.services.qr",
    "StoreRequest": "dicomnet.services.storage",
    "EchoRequest": "dicomnet.services.verification",
    "Peer": "dicomnet.tls",
    "ConversionError": "dicomnet.transcode",
}

__all__ = [
    "AE",
    "STORAGE_COMMITMENT",
    "ARTIMTimeout",
    "AcceptedContext",
    "Association",
    "AssociationAborted",
    "AssociationRejected",
    "AssociationRequest",
    "CommitmentListener",
    "CommitmentResult",
    "CommitmentSCP",
    "ConnectTimeout",
    "ConnectionFailed",
    "ConversionError",
    "DicomNetError",
    "DicomTimeoutError",
    "DimseError",
    "DimseTimeout",
    "EchoRequest",
    "FindRequest",
    "Handlers",
    "IdleTimeout",
    "InvalidDatasetError",
    "InvalidStateError",
    "NRequest",
    "NResponse",
    "NotNegotiatedError",
    "ObservedAssociation",
    "ObservedOperation",
    "Observer",
    "Peer",
    "Pool",
    "PoolStats",
    "PresentationContext",
    "ProtocolError",
    "Reject",
    "Responses",
    "RetrieveListener",
    "RetrieveProgress",
    "RetrieveRequest",
    "Server",
    "Status",
    "StatusCategory",
    "StoreRequest",
    "TLSError",
    "UserIdentity",
    "__version__",
    "commitment_listener",
    "connect",
    "default_contexts",
    "retrieve_contexts",
    "retrieve_listener",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        try:  # a submodule (`dicomnet.storage`), as after an eager import of the package
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule is there, but something it imports is not
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
