"""dicomnet: an asyncio-native DICOM networking framework (PS3.7 DIMSE, PS3.8 Upper Layer)."""

from dicomnet._version import __version__
from dicomnet.association import Handlers
from dicomnet.client import connect, default_contexts, retrieve_contexts
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
from dicomnet.status import Status, StatusCategory
from dicomnet.tls import Peer
from dicomnet.transcode import ConversionError

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
