"""`connect()`: open an association as requestor (SCU) and release it on exit."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio

from dicomnet.association import AssociationSettings, ExtendedResults, Handlers
from dicomnet.errors import (
    ARTIMTimeout,
    AssociationAborted,
    AssociationRejected,
    ConnectionFailed,
    ConnectTimeout,
    DicomNetError,
    ProtocolError,
    TLSError,
)
from dicomnet.identity import UserIdentity
from dicomnet.observe import REQUESTOR, Observer, observe_rejection
from dicomnet.proto.contexts import (
    COMMON_STORAGE_SOP_CLASSES,
    COMPRESSED_IMAGE_SOP_CLASSES,
    MODALITY_PERFORMED_PROCEDURE_STEP,
    MODALITY_WORKLIST_FIND,
    QUERY_RETRIEVE,
    STORAGE_COMMITMENT_PUSH,
    VERIFICATION,
    PresentationContext,
    accepted_as_requestor,
    all_storage_sop_classes,
    build_requestor_contexts,
    receiving_contexts,
)
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.pdu import (
    AAssociateRQ,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityRQ,
    UserInformation,
)
from dicomnet.proto.ul import Aborted, AssociateAccepted, AssociateRejected, UpperLayer
from dicomnet.services import Association, service_table
from dicomnet.storage import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnet.stream import TCP, ByteStream, NetworkBackend
from dicomnet.tls import describe_failure
from dicomnet.transport import next_ul_event

__all__ = ["connect", "default_contexts", "open_association"]

log = logging.getLogger("dicomnet")


def default_contexts() -> list[PresentationContext]:
    """Verification, Patient/Study Root Q/R, Modality Worklist, Storage Commitment, MPPS
    and the common storage classes.

    The storage classes ask for both roles (PS3.7 §D.3.3.4), so that the same
    association can send instances and receive those of a C-GET.
    """
    services = (
        VERIFICATION,
        *QUERY_RETRIEVE,
        MODALITY_WORKLIST_FIND,
        STORAGE_COMMITMENT_PUSH,
        MODALITY_PERFORMED_PROCEDURE_STEP,
    )
    contexts = [PresentationContext(uid) for uid in services]
    contexts += [
        PresentationContext(uid, scu_role=True, scp_role=True) for uid in COMMON_STORAGE_SOP_CLASSES
    ]
    return contexts[:128]


def retrieve_contexts(
    model: str = "study", transfer_syntax: str | None = None
) -> list[PresentationContext]:
    """What to propose for `Association.get` / `retrieve(via="get")` with the Patient or
    Study Root model: the C-GET context, and storage contexts with the SCP role in which
    the instances arrive as stored, compressed or not (`receiving_contexts`).

    With `transfer_syntax`, each storage class once, in that syntax alone: for a peer
    that sends every instance of a class on the first context accepted for it (DCMTK's
    dcmqrscp), a C-GET again with these gets the instances stored in that syntax."""
    from dicomnet.services.qr import GET_MODELS

    if transfer_syntax is None:
        storage = receiving_contexts(127)
    else:
        classes = dict.fromkeys(
            (*COMPRESSED_IMAGE_SOP_CLASSES, *COMMON_STORAGE_SOP_CLASSES, *all_storage_sop_classes())
        )
        storage = [
            PresentationContext(uid, (transfer_syntax,), scu_role=False, scp_role=True)
            for uid in list(classes)[:127]
        ]
    return [PresentationContext(GET_MODELS[model]), *storage]


async def open_association(
    host: str,
    port: int,
    *,
    aet: str = "DICOMNET",
    aec: str = "ANY-SCP",
    contexts: Sequence[PresentationContext] | None = None,
    settings: AssociationSettings | None = None,
    connect_timeout: float = 30.0,
    user_identity: UserIdentity | UserIdentityRQ | None = None,
    async_operations_window: tuple[int, int] = (1, 1),
    sop_class_extended: Sequence[SOPClassExtendedNegotiation] = (),
    sop_class_common_extended: Sequence[SOPClassCommonExtendedNegotiation] = (),
    handlers: Handlers | None = None,
    backend: NetworkBackend = TCP,
    tls: ssl.SSLContext | None = None,
    observer: Observer | None = None,
) -> Association:
    """Connect and negotiate; the caller runs `Association.run()` in a task group."""
    settings = settings or AssociationSettings()
    proposed, roles = build_requestor_contexts(
        list(contexts) if contexts is not None else default_contexts()
    )
    if isinstance(user_identity, UserIdentity):
        user_identity = user_identity.to_pdu()
    extended = ExtendedResults(
        AsyncOperationsWindowNegotiation(*async_operations_window),
        UserIdentityNegotiation(user_identity),
        SOPClassExtendedNegotiations(tuple(sop_class_extended), tuple(sop_class_common_extended)),
    )
    user_information = UserInformation(
        max_length=settings.max_pdu_length,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        role_selections=roles,
    )
    for extension in extended:
        user_information = extension.offer(user_information)
    request = AAssociateRQ(
        called_ae_title=aec,
        calling_ae_title=aet,
        presentation_contexts=proposed,
        user_information=user_information,
    )
    stream = await _connect(backend, host, port, connect_timeout, tls)
    ul = UpperLayer(
        is_requestor=True,
        max_pdu_length=settings.max_pdu_length,
        artim_timeout=settings.artim_timeout,
        idle_timeout=settings.idle_timeout,
    )
    clock = backend.clock
    started = clock()
    ul.request_association(request)
    try:
        try:
            await stream.send(ul.connection_made(clock()))
        except anyio.BrokenResourceError:
            raise AssociationAborted(
                f"the connection to {host}:{port} closed before the association request"
            ) from None
        while True:
            event = await next_ul_event(stream, ul, clock)
            if isinstance(event, AssociateAccepted):
                break
            if isinstance(event, AssociateRejected):
                rj = event.response
                if observer is not None:
                    address = stream.remote_address
                    observe_rejection(
                        observer,
                        REQUESTOR,
                        aet,
                        aec,
                        (str(address[0]), int(address[1])),
                        (rj.result, rj.source, rj.reason),
                        clock() - started,
                    )
                raise AssociationRejected(rj.result, rj.source, rj.reason)
            if isinstance(event, Aborted):
                if event.local and "A-ASSOCIATE-RQ" in event.error:
                    raise ARTIMTimeout(event.error)
                if event.local:
                    raise ProtocolError(event.error or "invalid answer to A-ASSOCIATE-RQ")
                if not event.error:  # an A-ABORT PDU (AA-3), not a lost connection (AA-4)
                    raise AssociationAborted(
                        "association request aborted by the peer", event.source, event.reason
                    )
            # Anything else before acceptance means the connection went away.
            raise _closed_early(stream, host, port, tls)
    except BaseException:
        stream.close()
        raise
    response = event.response
    accepted = accepted_as_requestor(proposed, response, roles)
    for extension in extended:
        extension.finalise(request.user_information, response.user_information)
    log.debug(
        "association %s -> %s accepted: %d of %d contexts",
        aet,
        aec,
        len(accepted),
        len(proposed),
    )
    address = stream.remote_address
    return Association(
        stream,
        ul,
        request=request,
        response=response,
        contexts=accepted,
        peer_max_pdu_length=response.user_information.max_length or 0,
        settings=settings,
        services=service_table(),
        clock=clock,
        handlers=handlers,
        peer_address=(str(address[0]), int(address[1])),
        extended=extended,
        observer=observer,
    )


def _closed_early(
    stream: ByteStream, host: str, port: int, tls: ssl.SSLContext | None
) -> DicomNetError:
    """The error for a connection lost before the A-ASSOCIATE-RQ was answered."""
    if tls is None:
        return AssociationAborted(
            f"the connection to {host}:{port} closed before the association was answered "
            "(does the peer expect TLS, or is it at its limit of connections?)"
        )
    error = getattr(stream, "error", None)
    if isinstance(error, ssl.SSLError):  # TLS 1.3: a client certificate refused after
        return TLSError(f"TLS connection to {host}:{port} failed: {describe_failure(error)}")
    return TLSError(
        f"the TLS connection to {host}:{port} closed before the association was answered "
        "(does the peer accept our certificate, or require one: --tls-cert/--tls-key?)"
    )


async def _connect(
    backend: NetworkBackend,
    host: str,
    port: int,
    timeout: float,
    tls: ssl.SSLContext | None,
) -> ByteStream:
    """The connection (and, with `tls`, its TLS handshake) within `timeout` seconds."""
    try:
        with anyio.fail_after(timeout):
            if tls is None:
                return await backend.connect(host, port)
            return await backend.connect(host, port, tls=tls)
    except TimeoutError:
        what = " (TCP connection and TLS handshake: is the peer using TLS?)" if tls else ""
        raise ConnectTimeout(
            f"could not connect to {host}:{port} within {timeout:g} s{what}"
        ) from None
    except OSError as exc:
        if tls is not None and isinstance(
            exc, (ssl.SSLError, ConnectionResetError, ConnectionAbortedError)
        ):
            raise TLSError(
                f"TLS handshake with {host}:{port} failed: {describe_failure(exc)}"
            ) from exc
        raise ConnectionFailed(
            f"could not connect to {host}:{port}: {exc.strerror or exc}"
        ) from exc


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    aet: str = "DICOMNET",
    aec: str = "ANY-SCP",
    contexts: Sequence[PresentationContext] | None = None,
    max_pdu_length: int = 262_144,
    connect_timeout: float = 30.0,
    artim_timeout: float = 30.0,
    dimse_timeout: float | None = 60.0,
    idle_timeout: float | None = None,
    write_timeout: float | None = 60.0,
    user_identity: UserIdentity | UserIdentityRQ | None = None,
    async_operations_window: tuple[int, int] = (1, 1),
    sop_class_extended: Sequence[SOPClassExtendedNegotiation] = (),
    sop_class_common_extended: Sequence[SOPClassCommonExtendedNegotiation] = (),
    handlers: Handlers | None = None,
    backend: NetworkBackend = TCP,
    tls: ssl.SSLContext | None = None,
    observer: Observer | None = None,
) -> AsyncIterator[Association]:
    """Open an association; release it when the block ends, abort it if the block raises.

    `contexts`: what to propose (default: `default_contexts()`). Timeouts in seconds:
    TCP connect, ARTIM (association and release requests), DIMSE response, idle, and
    how long a send may wait for the peer to read (then the association is aborted).
    Extended negotiation (PS3.7 Annex D.3.3): `user_identity` (a `UserIdentity`, e.g.
    `UserIdentity.password(name, password)`), `async_operations_window` (invoked,
    performed), `sop_class_extended`, `sop_class_common_extended`; the outcome is on
    `Association.extended` (the identity's server response: `user_identity_response`).
    `handlers` (an AE's `ae.handlers`) answer what the peer sends us on this
    association, e.g. N-EVENT-REPORTs.
    `backend`: the network (default TCP; `dicomnet.testing.MemoryNetwork` in tests).
    `tls`: connect over TLS with this context (`dicomnet.tls.client_context()`, PS3.15
    §B.9); the handshake is part of the connect timeout, and its failure raises
    `TLSError` saying why.
    `observer`: a `dicomnet.observe.Observer` told of the association and its operations.
    """
    settings = AssociationSettings(
        max_pdu_length=max_pdu_length,
        artim_timeout=artim_timeout,
        dimse_timeout=dimse_timeout,
        idle_timeout=idle_timeout,
        write_timeout=write_timeout,
    )
    association = await open_association(
        host,
        port,
        aet=aet,
        aec=aec,
        contexts=contexts,
        settings=settings,
        connect_timeout=connect_timeout,
        user_identity=user_identity,
        async_operations_window=async_operations_window,
        sop_class_extended=sop_class_extended,
        sop_class_common_extended=sop_class_common_extended,
        handlers=handlers,
        backend=backend,
        tls=tls,
        observer=observer,
    )
    error: BaseException | None = None
    if association.tracker is not None:
        association.tracker.opened()  # now, not when the reader task starts
    async with anyio.create_task_group() as tg:
        tg.start_soon(association.run)
        try:
            yield association
        except BaseException as exc:
            error = exc
        with anyio.CancelScope(shield=True):
            if error is None:
                await association.release()
            else:
                await association.abort()
            await association.wait_closed()
    if error is not None:
        raise error
