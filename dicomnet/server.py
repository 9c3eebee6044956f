"""`AE`: an application entity's identity, supported contexts, handlers and `serve()`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc

from dicomnet.association import Association, AssociationSettings, ExtendedResults, Handlers
from dicomnet.client import connect
from dicomnet.errors import Reject
from dicomnet.proto.contexts import (
    DEFAULT_TRANSFER_SYNTAXES,
    VERIFICATION,
    ContextAnswers,
    PresentationContext,
    all_storage_sop_classes,
    all_transfer_syntaxes,
    negotiate_as_acceptor,
)
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.pdu import APPLICATION_CONTEXT_NAME, AAssociateRJ, AAssociateRQ
from dicomnet.proto.ul import AssociateRequested, ConnectionClosed, UpperLayer
from dicomnet.qr import FIND_MODELS, GET_MODELS, MOVE_MODELS
from dicomnet.service import AssociationRequest
from dicomnet.storage import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnet.stream import DicomStream, start_server
from dicomnet.transport import next_ul_event

__all__ = ["AE", "Server"]

log = logging.getLogger("dicomnet")

F = TypeVar("F", bound=Callable[..., Any])


class AE:
    """A DICOM application entity: its title, what it supports, and its handlers.

    As acceptor (`serve()`), it supports Verification always and every storage SOP
    class pydicom knows, in every transfer syntax, once an `on_store` handler is set
    (or exactly `contexts` when given). `max_associations` refuses associations past
    that many with rejected-transient / local-limit-exceeded (PS3.8 Table 9-21);
    `allowed_calling_ae_titles` refuses others with calling-AE-title-not-recognized.
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
        idle_timeout: float | None = 600.0,
        spool_threshold: int = 4 << 20,
        spool_dir: str | Path | None = None,
        fsync: bool = True,
        peers: dict[str, tuple[str, int]] | None = None,
        query_models: Iterable[str] = ("patient", "study", "mwl"),
    ) -> None:
        if not 0 < len(ae_title.strip()) <= 16:
            raise ValueError("an AE title has 1 to 16 characters")
        self.ae_title = ae_title
        self.contexts = list(contexts) if contexts is not None else None
        self.max_associations = max_associations
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
            spool_threshold=spool_threshold,
            spool_dir=Path(spool_dir) if spool_dir is not None else None,
            fsync=fsync,
        )
        self.peers = dict(peers or {})
        # The information models accepted for C-FIND/C-MOVE/C-GET when handlers are set.
        self.query_models = tuple(query_models)
        # SOP Class Extended Negotiation answers (PS3.7 §D.3.3.5): SOP class -> info bytes.
        self.sop_class_extended: dict[str, bytes] = {}
        self.handlers = Handlers(move_destination=self.peers.get)
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
        self.handlers.on_echo = handler
        return handler

    def on_store(self, handler: F) -> F:
        """`async def h(request: StoreRequest) -> status` (or `(status, error_comment)`)."""
        self.handlers.on_store = handler
        return handler

    def on_find(self, handler: F) -> F:
        """`async def h(request: FindRequest)`, an async generator: each yield (a Dataset,
        or `(dataset, pending_status)`) is one pending C-FIND response."""
        self.handlers.on_find = handler
        return handler

    def on_move(self, handler: F) -> F:
        """`async def h(request: RetrieveRequest)`, an async generator yielding the
        instances (Datasets or Part-10 paths) to send to `request.destination`, which
        is resolved with `peers` (or `handlers.move_destination`)."""
        self.handlers.on_move = handler
        return handler

    def on_get(self, handler: F) -> F:
        """`async def h(request: RetrieveRequest)`, an async generator yielding the
        instances to send back over the same association."""
        self.handlers.on_get = handler
        return handler

    # --- negotiation -----------------------------------------------------------------------

    def supported_contexts(self) -> dict[str, PresentationContext]:
        """Abstract syntax -> what we accept for it, as acceptor."""
        return dict(self._negotiation()[0])

    def _negotiation(self) -> tuple[dict[str, PresentationContext], ContextAnswers]:
        """The supported contexts and the answers given with them, built again only when
        the contexts, handlers or query models they come from change."""
        handlers = self.handlers
        key = (
            tuple(self.contexts) if self.contexts is not None else None,
            handlers.on_store is not None,
            handlers.on_find is not None,
            handlers.on_move is not None,
            handlers.on_get is not None,
            self.query_models,
        )
        if self._negotiation_cache is None or self._negotiation_cache[0] != key:
            self._negotiation_cache = (key, self._build_supported_contexts(), ContextAnswers())
        return self._negotiation_cache[1], self._negotiation_cache[2]

    def _build_supported_contexts(self) -> dict[str, PresentationContext]:
        if self.contexts is not None:
            return {ctx.abstract_syntax: ctx for ctx in self.contexts}
        every = all_transfer_syntaxes()
        handlers = self.handlers
        supported = {VERIFICATION: PresentationContext(VERIFICATION, every)}
        models: list[str] = []
        for handler, table in (
            (handlers.on_find, FIND_MODELS),
            (handlers.on_move, MOVE_MODELS),
            (handlers.on_get, GET_MODELS),
        ):
            if handler is not None:
                models += [uid for name, uid in table.items() if name in self.query_models]
        for uid in models:
            supported[uid] = PresentationContext(uid, DEFAULT_TRANSFER_SYNTAXES)
        if handlers.on_store is not None or handlers.on_get is not None:
            # C-GET sends its sub-operations back: the requestor may take the SCP role.
            scu, scp = handlers.on_store is not None, handlers.on_get is not None
            for uid in all_storage_sop_classes():
                supported[uid] = PresentationContext(uid, every, scu_role=scu, scp_role=scp)
        return supported

    # --- SCU -------------------------------------------------------------------------------

    def connect(self, host: str, port: int, aec: str = "ANY-SCP", **kwargs: Any) -> Any:
        """`dicomnet.connect()` with this AE's title and handlers."""
        kwargs.setdefault("max_pdu_length", self.settings.max_pdu_length)
        return connect(host, port, aet=self.ae_title, aec=aec, handlers=self.handlers, **kwargs)

    # --- SCP -------------------------------------------------------------------------------

    @asynccontextmanager
    async def serve(
        self, host: str = "127.0.0.1", port: int = 11112, *, reuse_port: bool = False
    ) -> AsyncIterator[Server]:
        """Listen and serve associations until the block ends (then stop and abort all).

        `reuse_port` sets SO_REUSEPORT, so several processes can serve one port.
        """
        server = Server(self)
        async with anyio.create_task_group() as tg:
            server._task_group = tg
            server._listener = await start_server(
                server._on_connection, host, port, reuse_port=reuse_port
            )
            sockname = server._listener.sockets[0].getsockname()
            server.host, server.port = str(sockname[0]), int(sockname[1])
            try:
                yield server
            finally:
                await server.close()


class Server:
    """A listening AE: `host`, `port`, `close()`, `wait_closed()`, `associations`."""

    def __init__(self, ae: AE) -> None:
        self.ae = ae
        self._listener: asyncio.Server | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = asyncio.Event()
        self._reserved = 0
        self.associations: set[Association] = set()
        self.host = ""
        self.port = 0
        self.clock: Callable[[], float] = time.monotonic

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

    def _on_connection(self, stream: DicomStream) -> None:
        if self._closed.is_set() or self._task_group is None:
            stream.abort()
            return
        self._task_group.start_soon(self._handle_connection, stream)

    def _verdict(self, rq: AAssociateRQ) -> AAssociateRJ | None:
        ae = self.ae
        if rq.application_context_name != APPLICATION_CONTEXT_NAME:
            return AAssociateRJ(1, 1, 2)
        if ae.max_associations is not None and self._reserved >= ae.max_associations:
            return AAssociateRJ(2, 3, 2)  # transient, presentation, local limit exceeded
        if (
            ae.allowed_calling_ae_titles is not None
            and rq.calling_ae_title not in ae.allowed_calling_ae_titles
        ):
            return AAssociateRJ(1, 1, 3)  # permanent, user, calling AE title not recognized
        if ae.require_called_ae_title and rq.called_ae_title != ae.ae_title.strip():
            return AAssociateRJ(1, 1, 7)  # permanent, user, called AE title not recognized
        return None

    async def _handle_connection(self, stream: DicomStream) -> None:
        ae = self.ae
        settings = ae.settings
        peer = stream.remote_address
        ul = UpperLayer(
            is_requestor=False,
            max_pdu_length=settings.max_pdu_length,
            artim_timeout=settings.artim_timeout,
            idle_timeout=settings.idle_timeout,
            clock=self.clock,
        )
        reserved = False
        identity_response: bytes | None = None
        try:
            ul.connection_made()
            event = await next_ul_event(stream, ul, self.clock)
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
            rejection = self._verdict(rq)
            if rejection is None:
                self._reserved += 1
                reserved = True
                if ae._on_association is not None:
                    try:
                        with anyio.fail_after(settings.artim_timeout):
                            verdict = await ae._on_association(
                                AssociationRequest(rq, peer[0], peer[1])
                            )
                        if isinstance(verdict, bytes):
                            identity_response = verdict
                    except Reject as refusal:
                        rejection = AAssociateRJ(refusal.result, refusal.source, refusal.reason)
                    except Exception:
                        log.exception("on_association handler failed; rejecting")
                        rejection = AAssociateRJ(2, 1, 1)
            if rejection is not None:
                log.info(
                    "rejected association from %r (%s:%s): result %d source %d reason %d",
                    rq.calling_ae_title,
                    peer[0],
                    peer[1],
                    rejection.result,
                    rejection.source,
                    rejection.reason,
                )
                await stream.send(ul.reject(rejection))
                # Sta13: wait (ARTIM) for the peer to close the connection.
                while not isinstance(await next_ul_event(stream, ul, self.clock), ConnectionClosed):
                    pass
                return
            extended = ExtendedResults(
                AsyncOperationsWindowNegotiation(1, 1),
                UserIdentityNegotiation(server_response=identity_response),
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
            await stream.send(ul.accept(negotiated.response))
            association = Association(
                stream,
                ul,
                request=rq,
                response=negotiated.response,
                contexts=negotiated.contexts,
                peer_max_pdu_length=negotiated.peer_max_pdu_length,
                settings=settings,
                handlers=ae.handlers,
                peer_address=peer,
                clock=self.clock,
                extended=extended,
            )
            self.associations.add(association)
            log.info(
                "association from %r (%s:%s) accepted with %d of %d presentation contexts",
                rq.calling_ae_title,
                peer[0],
                peer[1],
                len(negotiated.contexts),
                len(rq.presentation_contexts),
            )
            try:
                await association.run()
            finally:
                self.associations.discard(association)
                log.info(
                    "association from %r (%s:%s) ended: %s",
                    rq.calling_ae_title,
                    peer[0],
                    peer[1],
                    association.outcome,
                )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("connection from %s:%s lost: %s", peer[0], peer[1], exc)
        except Exception:
            log.exception("association from %s:%s failed", peer[0], peer[1])
        finally:
            if reserved:
                self._reserved -= 1
            stream.close()
