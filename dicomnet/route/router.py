"""`dicomnet route` assembled: an AE whose C-STOREs go through the intake into the
queue, and a forwarder per destination sending through a pool of associations."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio

from dicomnet.observe import Observer
from dicomnet.route.config import ConfigError, Destination, RouteConfig
from dicomnet.route.forwarder import Forwarder, Sender
from dicomnet.route.intake import Intake
from dicomnet.route.queue import Entry, Queue
from dicomnet.server import AE, Server, security_settings
from dicomnet.stream import TCP, NetworkBackend

__all__ = ["Router"]

log = logging.getLogger("dicomnet")

SenderFactory = Callable[[Destination], AbstractAsyncContextManager[Sender]]


def _security(config: RouteConfig) -> dict[str, Any]:
    """Who may send: the AE's authenticator, access policy and audit log."""
    try:
        return security_settings(
            users=config.users,
            require_user=config.require_user,
            access=config.access,
            audit=config.audit,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"listen: {exc}") from None


class Router:
    """The router of `config`; `serve()` runs it. `senders(destination)` makes what sends
    to a destination (default: a `dicomnet.Pool` as the destination says). `observer` is
    told of the associations and operations of both sides (`dicomnet.observe`)."""

    def __init__(
        self,
        config: RouteConfig,
        *,
        senders: SenderFactory | None = None,
        tls: ssl.SSLContext | None = None,
        client_tls: Callable[[Destination], ssl.SSLContext | None] | None = None,
        backend: NetworkBackend = TCP,
        observer: Observer | None = None,
    ) -> None:
        self.config = config
        self.observer = observer
        self.tls = tls
        self.client_tls = client_tls
        self.backend = backend
        self._given_senders = senders
        self.senders = senders or self._pool
        names = [d.name for d in config.destinations]
        self.queue = Queue(config.queue, names, fsync=config.fsync, max_queued=config.max_queued)
        self.forwarders: dict[str, Forwarder] = {}
        self.ae = AE(
            config.aet,
            require_called_ae_title=True,
            allowed_calling_ae_titles=config.allow,
            fsync=config.fsync,
            observer=observer,
            **_security(config),
        )
        self.intake = Intake(
            config.rules, self.queue, self._hand_over, refuse_unrouted=config.unrouted == "refuse"
        )
        self.ae.on_store(self.intake.on_store)

    def _hand_over(self, entries: list[Entry]) -> None:
        for forwarder in self.forwarders.values():
            forwarder.add(entries)

    def _pool(
        self, destination: Destination, single: bool = False
    ) -> AbstractAsyncContextManager[Sender]:
        from dicomnet.pool import Pool

        return Pool(
            destination.host,
            destination.port,
            aet=self.config.aet,
            aec=destination.aet,
            tls=self.client_tls(destination) if self.client_tls else None,
            max_associations=1 if single else destination.associations,
            window=destination.window,
            observer=self.observer,
            backend=self.backend,
        )

    def _dedicated(
        self, destination: Destination
    ) -> Callable[[], AbstractAsyncContextManager[Sender]] | None:
        """What makes the association of one series / study (`association_per`)."""
        if destination.association_per is None:
            return None
        given = self._given_senders
        if given is None:
            return lambda: self._pool(destination, single=True)
        return lambda: given(destination)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Server]:
        """Listen and forward until the block ends; the queue stays for the next start."""
        async with AsyncExitStack() as stack:
            for destination in self.config.destinations:
                sender = await stack.enter_async_context(self.senders(destination))
                self.forwarders[destination.name] = Forwarder(
                    self.queue, destination, sender, dedicated=self._dedicated(destination)
                )
            async with anyio.create_task_group() as tg:
                for forwarder in self.forwarders.values():
                    tg.start_soon(forwarder.run)
                async with self.ae.serve(
                    self.config.host, self.config.port, backend=self.backend, tls=self.tls
                ) as server:
                    yield server
                tg.cancel_scope.cancel()
