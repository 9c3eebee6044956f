"""`AE`: an application entity's identity, supported contexts, handlers and `serve()`."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc

from dicomnet.access import AccessPolicy, load_access
from dicomnet.admission import Admission
from dicomnet.association import AssociationSettings, ExtendedResults, Handlers
from dicomnet.audit import NODE_AUTHENTICATION, AuditHook, AuditLog, security_alert
from dicomnet.client import connect
from dicomnet.errors import Reject
from dicomnet.identity import Authenticator, PasswordFile
from dicomnet.observe import ACCEPTOR, Observer, observe_rejection
from dicomnet.proto.contexts import ContextAnswers, PresentationContext, negotiate_as_acceptor
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.pdu import APPLICATION_CONTEXT_NAME, AAssociateRJ, AAssociateRQ, UserIdentityRQ
from dicomnet.proto.ul import AssociateRequested, ConnectionClosed, UpperLayer
from dicomnet.services import SERVICES, Association, service_table
from dicomnet.services.commitment import CommitmentListener
from dicomnet.services.common import merge_contexts
from dicomnet.services.nservices import (
    N_ACTION,
    N_CREATE,
    N_DELETE,
    N_EVENT_REPORT,
    N_GET,
    N_SET,
    handler_key,
)
from dicomnet.services.qr import ON_FIND, ON_GET, ON_MOVE, RetrieveListener
from dicomnet.services.storage import ON_STORE
from dicomnet.services.verification import ON_ECHO
from dicomnet.storage import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_valid_ae_title,
)
from dicomnet.stream import (
    ACCEPT_FAILURE_LOG_INTERVAL,
    TCP,
    ByteStream,
    Listener,
    NetworkBackend,
    descriptor_budget,
    peer_certificate,
)
from dicomnet.tls import subject_text
from dicomnet.transport import next_ul_event

__all__ = ["AE", "AssociationRequest", "Server", "commitment_listener", "retrieve_listener"]

log = logging.getLogger("dicomnet")


def security_settings(
    *,
    users: str | Path | None = None,
    require_user: bool = False,
    access: str | Path | None = None,
    audit: str | Path | None = None,
) -> dict[str, Any]:
    """The `AE` keyword arguments of who may do what, from files: a users file
    (`dicomnet passwd`) checking user identities, whether one is required, an access
    policy (`dicomnet.access`) and an audit log (JSON lines). Raises `OSError` or
    `ValueError` for a file that cannot be read or used."""
    return {
        "authenticator": PasswordFile(users) if users else None,
        "require_user_identity": require_user,
        "access": load_access(access) if access else None,
        "audit": AuditLog(audit) if audit else None,
    }


F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class AssociationRequest:
    """An A-ASSOCIATE-RQ awaiting the `on_association` handler's verdict."""

    pdu: AAssociateRQ
    peer_host: str
    peer_port: int
    user: str | None = None  # the user the AE's authenticator verified
    peer_certificate: dict[str, Any] | None = None  # TLS: `ssl.SSLSocket.getpeercert()`

    @property
    def peer_certificate_subject(self) -> str | None:
        """The certificate's subject as an RFC 4514 string ("CN=node1,O=Hospital")."""
        return subject_text(self.peer_certificate)

    @property
    def calling_ae_title(self) -> str:
        return self.pdu.calling_ae_title

    @property
    def called_ae_title(self) -> str:
        return self.pdu.called_ae_title

    @property
    def user_identity(self) -> UserIdentityRQ | None:
        return self.pdu.user_information.user_identity_rq

    @property
    def implementation_class_uid(self) -> str | None:
        return self.pdu.user_information.implementation_class_uid

    @property
    def implementation_version_name(self) -> str | None:
        return self.pdu.user_information.implementation_version_name


class AE:
    """A DICOM application entity: its title, what it supports, and its handlers.

    As acceptor (`serve()`), it supports Verification always, and what each service
    negotiates for the handlers set: every storage SOP class pydicom knows, in every
    transfer syntax, once `on_store` is set; the query/retrieve models of
    `query_models` for `on_find` / `on_move` / `on_get`; the SOP classes of the DIMSE-N
    handlers. Exactly `contexts`, when given. `max_associations` refuses associations
    past that many with rejected-transient / local-limit-exceeded (PS3.8 Table 9-21), and
    `max_associations_per_ae` those past that many from one calling AE title.
    `max_connections` closes connections past that many at once (default: what the
    file descriptor limit allows, less those open at start and an eighth kept for
    files), so the server never runs out of descriptors for the ones it serves;
    `allowed_calling_ae_titles` refuses others with calling-AE-title-not-recognized.
    `async_operations_window`: (invoked, performed), the most operations this AE
    invokes and performs at once on one association when the requestor proposes a
    window (PS3.7 §D.3.3.3; 0 is unlimited).

    `authenticator` (e.g. `dicomnet.identity.PasswordFile`) verifies the User Identity
    offered (PS3.7 §D.3.3.7); the verified name is `Association.user`. A username and
    passcode it does not verify is rejected, as is any association without a verified
    identity when `require_user_identity` (both rejected-permanent, service-user, no
    reason: 1/1/1); other unverified identities (a username alone, or a token no
    authenticator knows) are left to `on_association`. `access`: which services each
    peer may use (`dicomnet.access`). `audit`: a hook receiving `dicomnet.audit` events.
    `observer`: a `dicomnet.observe.Observer` told of every association and operation,
    served or (`connect`, C-MOVE sub-operations) requested (e.g. `dicomnet.metrics`).

    Limits on each association (seconds; None: none): `idle_timeout`, nothing received or
    sent for that long; `write_timeout`, the peer reads nothing of what we send for that
    long; `message_timeout` and `min_receive_rate`, a message must arrive at that many
    bytes a second at least, after a grace of that many seconds; `max_dataset_size`,
    bytes in one data set. Past any of them the association is aborted; the server
    goes on.

    `peers`: AE title -> (host, port), where C-MOVE sub-operations and storage commitment
    reports go; a `dicomnet.tls.Peer(host, port, tls=context)` there is reached over TLS.
    """

    def __init__(
        self,
        ae_title: str = "DICOMNET",
        *,
        contexts: Sequence[PresentationContext] | None = None,
        max_associations: int | None = None,
        allowed_calling_ae_titles: Iterable[str] | None = None,
        require_called_ae_title: bool = False,
        max_pdu_length: int = 262_144,
        artim_timeout: float = 30.0,
        dimse_timeout: float | None = 60.0,
        idle_timeout: float | None = 60.0,
        write_timeout: float | None = 60.0,
        message_timeout: float | None = 60.0,
        min_receive_rate: int = 4096,
        max_dataset_size: int | None = None,
        max_associations_per_ae: int | None = None,
        max_connections: int | None = None,
        spool_threshold: int = 4 << 20,
        spool_dir: str | Path | None = None,
        fsync: bool = True,
        peers: dict[str, tuple[str, int]] | None = None,
        query_models: Iterable[str] = ("patient", "study", "mwl"),
        async_operations_window: tuple[int, int] = (1, 1),
        authenticator: Authenticator | None = None,
        require_user_identity: bool = False,
        access: AccessPolicy | None = None,
        audit: AuditHook | None = None,
        observer: Observer | None = None,
    ) -> None:
        if not 0 < len(ae_title.strip()) <= 16:
            raise ValueError("an AE title has 1 to 16 characters")
        self.ae_title = ae_title
        self.contexts = list(contexts) if contexts is not None else None
        self.max_associations = max_associations
        self.max_associations_per_ae = max_associations_per_ae
        self.max_connections = max_connections
        self.allowed_calling_ae_titles = (
            {t.strip() for t in allowed_calling_ae_titles}
            if allowed_calling_ae_titles is not None
            else None
        )
        self.require_called_ae_title = require_called_ae_title
        self.settings = AssociationSettings(
            max_pdu_length=max_pdu_length,
            artim_timeout=artim_timeout,
            dimse_timeout=dimse_timeout,
            idle_timeout=idle_timeout,
            write_timeout=write_timeout,
            message_timeout=message_timeout,
            min_receive_rate=min_receive_rate,
            max_dataset_size=max_dataset_size,
            spool_threshold=spool_threshold,
            spool_dir=Path(spool_dir) if spool_dir is not None else None,
            fsync=fsync,
        )
        self.peers = dict(peers or {})
        # The information models accepted for C-FIND/C-MOVE/C-GET when handlers are set.
        self.query_models = tuple(query_models)
        self.async_operations_window = async_operations_window
        # Identity, access control and audit (see `dicomnet.identity`, `access`, `audit`).
        self.authenticator = authenticator
        self.require_user_identity = require_user_identity
        self.access = access
        self.audit = audit
        self.observer = observer
        # SOP Class Extended Negotiation answers (PS3.7 §D.3.3.5): SOP class -> info bytes.
        self.sop_class_extended: dict[str, bytes] = {}
        self.handlers = Handlers()
        self.handlers.peer_address = lambda aet: self.peers.get(aet.strip())
        self.handlers.connect = self._connect_peer
        self._on_association: Callable[[AssociationRequest], Any] | None = None
        self._negotiation_cache: (
            tuple[object, dict[str, PresentationContext], ContextAnswers] | None
        ) = None

    # --- handlers --------------------------------------------------------------------------

    def on_association(self, handler: F) -> F:
        """`async def h(request: AssociationRequest)`; raise `Reject` to refuse.

        It may return bytes: the User Identity server response (PS3.7 §D.3.3.7.2) sent
        when the requestor asked for a positive response.
        """
        self._on_association = handler
        return handler

    def on_echo(self, handler: F) -> F:
        """`async def h(request: EchoRequest) -> status` (default: success)."""
        self.handlers.set(ON_ECHO, handler)
        return handler

    def on_store(self, handler: F) -> F:
        """`async def h(request: StoreRequest) -> status` (or `(status, error_comment)`)."""
        self.handlers.set(ON_STORE, handler)
        return handler

    def on_find(self, handler: F) -> F:
        """`async def h(request: FindRequest)`, an async generator: each yield (a Dataset,
        or `(dataset, pending_status)`) is one pending C-FIND response."""
        self.handlers.set(ON_FIND, handler)
        return handler

    def on_move(self, handler: F) -> F:
        """`async def h(request: RetrieveRequest)`, an async generator yielding the
        instances (Datasets or Part-10 paths) to send to `request.destination`, which
        is resolved with `peers`."""
        self.handlers.set(ON_MOVE, handler)
        return handler

    def on_get(self, handler: F) -> F:
        """`async def h(request: RetrieveRequest)`, an async generator yielding the
        instances to send back over the same association."""
        self.handlers.set(ON_GET, handler)
        return handler

    def _on_n(self, operation: str, sop_classes: tuple[str, ...]) -> Callable[[F], F]:
        if not sop_classes:
            raise TypeError(f"{operation} handlers are registered for one or more SOP classes")

        def register(handler: F) -> F:
            for sop_class in sop_classes:
                self.handlers.set(handler_key(operation, sop_class), handler)
            return handler

        return register

    def on_n_event_report(self, *sop_classes: str) -> Callable[[F], F]:
        """`async def h(request: NRequest)` for N-EVENT-REPORTs of these SOP classes
        (PS3.7 §10.1.1), also on associations we requested (`AE.connect`)."""
        return self._on_n(N_EVENT_REPORT, sop_classes)

    def on_n_get(self, *sop_classes: str) -> Callable[[F], F]:
        """`async def h(request: NRequest) -> (status, attributes)` (PS3.7 §10.1.2);
        `request.attributes` is the Attribute Identifier List."""
        return self._on_n(N_GET, sop_classes)

    def on_n_set(self, *sop_classes: str) -> Callable[[F], F]:
        """`async def h(request: NRequest) -> status` or `(status, attributes)`;
        `request.dataset` is the Modification List (PS3.7 §10.1.3)."""
        return self._on_n(N_SET, sop_classes)

    def on_n_action(self, *sop_classes: str) -> Callable[[F], F]:
        """`async def h(request: NRequest) -> status` or `(status, reply)`;
        `request.action_type`, `request.dataset` (PS3.7 §10.1.4)."""
        return self._on_n(N_ACTION, sop_classes)

    def on_n_create(self, *sop_classes: str) -> Callable[[F], F]:
        """`async def h(request: NRequest) -> status` or `(status, attributes)`;
        `request.sop_instance_uid` is the requestor's or a new one (PS3.7 §10.1.5)."""
        return self._on_n(N_CREATE, sop_classes)

    def on_n_delete(self, *sop_classes: str) -> Callable[[F], F]:
        """`async def h(request: NRequest) -> status` (PS3.7 §10.1.6)."""
        return self._on_n(N_DELETE, sop_classes)

    # --- negotiation -----------------------------------------------------------------------

    def supported_contexts(self) -> dict[str, PresentationContext]:
        """Abstract syntax -> what we accept for it, as acceptor."""
        return dict(self._negotiation()[0])

    def _negotiation(self) -> tuple[dict[str, PresentationContext], ContextAnswers]:
        """The supported contexts and the answers given with them, built again only when
        the contexts, handlers or query models they come from change."""
        key = (
            tuple(self.contexts) if self.contexts is not None else None,
            self.handlers.version,
            self.query_models,
        )
        if self._negotiation_cache is None or self._negotiation_cache[0] != key:
            self._negotiation_cache = (key, self._build_supported_contexts(), ContextAnswers())
        return self._negotiation_cache[1], self._negotiation_cache[2]

    def _build_supported_contexts(self) -> dict[str, PresentationContext]:
        if self.contexts is not None:
            return {ctx.abstract_syntax: ctx for ctx in self.contexts}
        supported: dict[str, PresentationContext] = {}
        for service in SERVICES:
            merge_contexts(supported, service.contexts(self.handlers, self.query_models))
        return supported

    # --- SCU -------------------------------------------------------------------------------

    def connect(self, host: str, port: int, aec: str = "ANY-SCP", **kwargs: Any) -> Any:
        """`dicomnet.connect()` with this AE's title and handlers; over TLS when `aec` is a
        TLS peer of the peer table at this host and port (or with the `tls=` context
        given)."""
        kwargs.setdefault("max_pdu_length", self.settings.max_pdu_length)
        return self._connect_peer(
            host, port, aet=self.ae_title, aec=aec, handlers=self.handlers, **kwargs
        )

    def peer_tls(self, aec: str, host: str, port: int) -> ssl.SSLContext | None:
        """The TLS context the peer table gives `aec` at `host`:`port` (None: plain)."""
        peer = self.peers.get(aec.strip())
        if peer is None or (peer[0], peer[1]) != (host, port):
            return None
        context = getattr(peer, "tls", None)
        return context if isinstance(context, ssl.SSLContext) else None

    def _connect_peer(self, host: str, port: int, **kwargs: Any) -> Any:
        """`dicomnet.connect()`, over TLS to a TLS peer of the table (C-MOVE
        sub-operations and storage commitment reports open their associations here)."""
        kwargs.setdefault("observer", self.observer)
        if kwargs.get("tls") is None:
            kwargs.pop("tls", None)
            context = self.peer_tls(str(kwargs.get("aec", "")), host, port)
            if context is not None:
                kwargs["tls"] = context
        return connect(host, port, **kwargs)

    # --- SCP -------------------------------------------------------------------------------

    @asynccontextmanager
    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 11112,
        *,
        reuse_port: bool = False,
        backend: NetworkBackend = TCP,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[Server]:
        """Listen and serve associations until the block ends (then stop and abort all).

        `reuse_port` sets SO_REUSEPORT, so several processes can serve one port.
        `backend`: the network (default TCP; `dicomnet.testing.MemoryNetwork` in tests).
        `tls`: accept TLS connections only, with this context (`dicomnet.tls.
        server_context()`, PS3.15 §B.9); each handshake must finish within the ARTIM
        timeout, and one that fails is logged in one line and closed.
        """
        server = Server(self, backend)
        async with anyio.create_task_group() as tg:
            server._task_group = tg
            server._listener = await backend.listen(
                server._on_connection,
                host,
                port,
                reuse_port=reuse_port,
                tls=tls,
                handshake_timeout=self.settings.artim_timeout,
                on_tls_failure=server._on_tls_failure,
            )
            server.host, server.port = server._listener.host, server._listener.port
            try:
                yield server
            finally:
                await server.close()


class Server:
    """A listening AE: `host`, `port`, `close()`, `wait_closed()`, `associations`."""

    def __init__(self, ae: AE, backend: NetworkBackend = TCP) -> None:
        self.ae = ae
        self.backend = backend
        self._listener: Listener | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = asyncio.Event()
        self._reserved = 0
        self._reserved_by_ae: Counter[str] = Counter()  # calling AE title -> associations
        self._open = 0  # connections being served
        self._max_open = ae.max_connections if ae.max_connections else descriptor_budget()
        self._refusing = False  # since the last log line, connections are refused
        self._refusal_logged = -ACCEPT_FAILURE_LOG_INTERVAL
        self.associations: set[Association] = set()
        self.host = ""
        self.port = 0

    async def close(self) -> None:
        """Stop listening and end every association (A-ABORT)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with anyio.CancelScope(shield=True):
            if self._listener is not None:
                self._listener.close()
            for association in list(self.associations):
                await association.abort()
        if self._task_group is not None:
            self._task_group.cancel_scope.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _on_tls_failure(self, peer: tuple[str, int], reason: str) -> None:
        security_alert(
            self.ae.audit, NODE_AUTHENTICATION, f"TLS handshake failed: {reason}", peer=peer
        )

    def _on_connection(self, stream: ByteStream) -> None:
        if self._closed.is_set() or self._task_group is None:
            stream.abort()
            return
        if self._max_open is not None and self._open >= self._max_open:
            # Out of descriptors soon: closed at once, so those held stay usable.
            stream.abort()
            now = self.backend.clock()
            if not self._refusing and now >= self._refusal_logged + ACCEPT_FAILURE_LOG_INTERVAL:
                self._refusing = True
                self._refusal_logged = now
                log.warning(
                    "%d connections open, the most the file descriptor limit allows "
                    "(ulimit -n): new ones are closed until some end",
                    self._open,
                )
            return
        self._open += 1
        self._task_group.start_soon(self._handle_connection, stream)

    def _connection_ended(self) -> None:
        self._open -= 1
        if self._refusing and self._max_open is not None and self._open <= self._max_open * 0.9:
            self._refusing = False
            log.warning("%d connections open: accepting new ones again", self._open)

    def _verdict(self, rq: AAssociateRQ) -> AAssociateRJ | None:
        ae = self.ae
        if rq.application_context_name != APPLICATION_CONTEXT_NAME:
            return AAssociateRJ(1, 1, 2)
        if not is_valid_ae_title(rq.calling_ae_title):  # a backslash, a control character
            return AAssociateRJ(1, 1, 3)  # permanent, user, calling AE title not recognized
        if ae.max_associations is not None and self._reserved >= ae.max_associations:
            return AAssociateRJ(2, 3, 2)  # transient, presentation, local limit exceeded
        per_ae = ae.max_associations_per_ae
        if per_ae is not None and self._reserved_by_ae[rq.calling_ae_title] >= per_ae:
            return AAssociateRJ(2, 3, 2)
        if (
            ae.allowed_calling_ae_titles is not None
            and rq.calling_ae_title not in ae.allowed_calling_ae_titles
        ):
            return AAssociateRJ(1, 1, 3)  # permanent, user, calling AE title not recognized
        if ae.require_called_ae_title and rq.called_ae_title != ae.ae_title.strip():
            log.warning(
                "association from %r: called AE title %r is not ours, %r (is the peer "
                "configured to call another AE?)",
                rq.calling_ae_title,
                rq.called_ae_title,
                ae.ae_title.strip(),
            )
            return AAssociateRJ(1, 1, 7)  # permanent, user, called AE title not recognized
        return None

    async def _admit(self, admission: Admission) -> AAssociateRJ | None:
        """The AE's identity and access checks, then the `on_association` handler's
        verdict; the User Identity server response to send goes on `admission`."""
        ae = self.ae
        rejection = await admission.authenticate() or admission.check_access()
        if rejection is not None or ae._on_association is None:
            return rejection
        rq, peer = admission.rq, admission.peer
        request = AssociationRequest(
            rq, peer[0], peer[1], user=admission.user, peer_certificate=admission.certificate
        )
        try:
            with anyio.fail_after(ae.settings.artim_timeout):
                verdict = await ae._on_association(request)
        except Reject as refusal:
            return AAssociateRJ(refusal.result, refusal.source, refusal.reason)
        except Exception:
            log.exception("on_association handler failed; rejecting")
            return AAssociateRJ(2, 1, 1)
        if isinstance(verdict, bytes):
            admission.server_response = verdict
        return None

    async def _reject(
        self,
        stream: ByteStream,
        ul: UpperLayer,
        admission: Admission,
        rejection: AAssociateRJ,
        started: float,
    ) -> None:
        peer, rq = admission.peer, admission.rq
        admission.rejected(rejection)
        if self.ae.observer is not None:
            observe_rejection(
                self.ae.observer,
                ACCEPTOR,
                rq.called_ae_title,
                rq.calling_ae_title,
                peer,
                (rejection.result, rejection.source, rejection.reason),
                self.backend.clock() - started,
            )
        log.info(
            "rejected association from %r (%s:%s): result %d source %d reason %d",
            rq.calling_ae_title,
            peer[0],
            peer[1],
            rejection.result,
            rejection.source,
            rejection.reason,
        )
        clock = self.backend.clock
        await stream.send(ul.reject(rejection, clock()))
        # Sta13: wait (ARTIM) for the peer to close the connection.
        while not isinstance(await next_ul_event(stream, ul, clock), ConnectionClosed):
            pass

    def _accept(
        self, stream: ByteStream, ul: UpperLayer, admission: Admission
    ) -> tuple[Association, bytes] | None:
        """Negotiate the association (PS3.8 §9.3.3, PS3.7 Annex D.3.3): the association
        and the A-ASSOCIATE-AC to send; None when access control left no context."""
        ae = self.ae
        rq = admission.rq
        settings = ae.settings
        extended = ExtendedResults(
            AsyncOperationsWindowNegotiation(*ae.async_operations_window),
            UserIdentityNegotiation(server_response=admission.server_response),
            SOPClassExtendedNegotiations(supported=dict(ae.sop_class_extended)),
        )
        supported, answers = ae._negotiation()
        negotiated = negotiate_as_acceptor(
            rq,
            supported,
            answers=answers,
            max_pdu_length=settings.max_pdu_length,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            extensions=tuple(extended),
        )
        restricted = admission.restrict(negotiated)
        if restricted is None:
            return None
        negotiated = restricted
        association = Association(
            stream,
            ul,
            request=rq,
            response=negotiated.response,
            contexts=negotiated.contexts,
            peer_max_pdu_length=negotiated.peer_max_pdu_length,
            settings=settings,
            services=_SERVICE_TABLE,
            clock=self.backend.clock,
            handlers=ae.handlers,
            peer_address=stream.remote_address,
            extended=extended,
            observer=ae.observer,
        )
        return association, ul.accept(negotiated.response)

    async def _handle_connection(self, stream: ByteStream) -> None:
        settings = self.ae.settings
        peer = stream.remote_address
        clock = self.backend.clock
        ul = UpperLayer(
            is_requestor=False,
            max_pdu_length=settings.max_pdu_length,
            artim_timeout=settings.artim_timeout,
            idle_timeout=settings.idle_timeout,
        )
        reserved = False
        started = clock()
        try:
            ul.connection_made(started)
            event = await next_ul_event(stream, ul, clock)
            if not isinstance(event, AssociateRequested):
                return
            rq = event.request
            log.debug(
                "association request from %s:%s %r -> %r",
                peer[0],
                peer[1],
                rq.calling_ae_title,
                rq.called_ae_title,
            )
            admission = Admission(
                self.ae, rq, (str(peer[0]), int(peer[1])), peer_certificate(stream)
            )
            rejection = self._verdict(rq)
            if rejection is None:
                self._reserved += 1
                self._reserved_by_ae[rq.calling_ae_title] += 1
                reserved = True
                rejection = await self._admit(admission)
            accepted = self._accept(stream, ul, admission) if rejection is None else None
            if accepted is None:
                rejection = rejection or AAssociateRJ(1, 1, 1)
                await self._reject(stream, ul, admission, rejection, started)
                return
            association, accept = accepted
            admission.accepted(association)
            await stream.send(accept)
            await self._run(association, len(rq.presentation_contexts), admission)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("connection from %s:%s lost: %s", peer[0], peer[1], exc)
        except Exception:
            log.exception("association from %s:%s failed", peer[0], peer[1])
        finally:
            if reserved:
                self._reserved -= 1
                self._release_ae(rq.calling_ae_title)
            stream.close()
            self._connection_ended()

    def _release_ae(self, calling_ae_title: str) -> None:
        left = self._reserved_by_ae[calling_ae_title] - 1
        if left > 0:
            self._reserved_by_ae[calling_ae_title] = left
        else:
            del self._reserved_by_ae[calling_ae_title]

    async def _run(self, association: Association, proposed: int, admission: Admission) -> None:
        peer = association.peer_address
        self.associations.add(association)
        log.info(
            "association from %r (%s:%s) accepted with %d of %d presentation contexts",
            association.peer_ae_title,
            peer[0],
            peer[1],
            len(association.contexts),
            proposed,
        )
        try:
            await association.run()
        finally:
            self.associations.discard(association)
            admission.ended(association)
            log.info(
                "association from %r (%s:%s) ended: %s",
                association.peer_ae_title,
                peer[0],
                peer[1],
                association.outcome,
            )


_SERVICE_TABLE = service_table()


class _Listener(Protocol):
    ae_title: str
    host: str
    port: int

    def install(self, handlers: Handlers) -> None: ...


L = TypeVar("L", bound=_Listener)


@asynccontextmanager
async def _serving(
    listener: L, host: str, port: int, backend: NetworkBackend, tls: ssl.SSLContext | None
) -> AsyncIterator[L]:
    """An AE of the listener's title, answering with it, served until the block ends."""
    ae = AE(listener.ae_title)
    listener.install(ae.handlers)
    async with ae.serve(host, port, backend=backend, tls=tls) as server:
        listener.host, listener.port = server.host, server.port
        yield listener


def retrieve_listener(
    ae_title: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backend: NetworkBackend = TCP,
    tls: ssl.SSLContext | None = None,
) -> AbstractAsyncContextManager[RetrieveListener]:
    """Serve a storage SCP under `ae_title` for `Association.retrieve(..., listener=)`.

    The peer must know `ae_title` as a move destination at this host and port (as a TLS
    peer when `tls`, a `dicomnet.tls.server_context()`, is given).
    """
    return _serving(RetrieveListener(ae_title), host, port, backend, tls)


def commitment_listener(
    ae_title: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    backend: NetworkBackend = TCP,
    tls: ssl.SSLContext | None = None,
) -> AbstractAsyncContextManager[CommitmentListener]:
    """Serve `ae_title` for the storage commitment reports an SCP sends on associations
    of its own (PS3.4 §J.3.3): pass it to `Association.request_commitment(listener=)`.
    The SCP must know `ae_title` at this host and port (over TLS with `tls`)."""
    return _serving(CommitmentListener(ae_title), host, port, backend, tls)
