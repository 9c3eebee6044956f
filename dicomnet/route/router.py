"""`dicomnet route` assembled: an AE whose C-STOREs go through the intake into the
queue, and a forwarder per destination sending through a pool of associations."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread

from dicomnet.observe import Observer
from dicomnet.route.config import ConfigError, Destination, RouteConfig
from dicomnet.route.forwarder import Forwarder, Sender
from dicomnet.route.intake import Intake
from dicomnet.route.queue import Entry, Queue, RouteQueue
from dicomnet.server import AE, Server, security_settings
from dicomnet.stream import TCP, NetworkBackend

__all__ = ["Router", "node_name", "open_queue"]

log = logging.getLogger("dicomnet")

SenderFactory = Callable[[Destination], AbstractAsyncContextManager[Sender]]


def node_name(config: RouteConfig) -> str | None:
    """This node's name among those sharing a queue (None: the queue is not shared)."""
    if config.database is None:
        return None
    return config.node or f"{socket.gethostname()}-{config.port}"


def open_queue(config: RouteConfig, *, running: bool = True) -> RouteQueue:
    """The queue of `config`: its folder, or its folder and database (shared with other
    route nodes). `running`: for the router itself (not to look at the queue from
    outside: then what is being written is left alone)."""
    names = [d.name for d in config.destinations]
    if config.database is None:
        return Queue(
            config.queue, names, fsync=config.fsync, max_queued=config.max_queued, recover=running
        )
    from dicomnet.route.shared_queue import SharedQueue

    node = node_name(config)
    assert node is not None
    try:
        return SharedQueue(
            config.queue,
            config.database,
            node,
            names,
            lease=config.lease,
            fsync=config.fsync,
            max_queued=config.max_queued,
            recover=running,
        )
    except (OSError, RuntimeError) as exc:  # the database not there, or psycopg missing
        raise ConfigError(f"queue: {exc}") from None


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
        self.queue = open_queue(config)
        self.node = node_name(config)
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

    async def _renewing(self, every: float) -> None:
        """Renew the leases of the copies this node holds in a shared queue."""
        while True:
            await anyio.sleep(every)
            await anyio.to_thread.run_sync(self.queue.renew)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Server]:
        """Listen and forward until the block ends; the queue stays for the next start."""
        async with AsyncExitStack() as stack:
            for destination in self.config.destinations:
                sender = await stack.enter_async_context(self.senders(destination))
                self.forwarders[destination.name] = Forwarder(
                    self.queue, destination, sender, dedicated=self._dedicated(destination)
                )
            stack.callback(self.queue.close)  # a shared queue's copies let go at once
            async with anyio.create_task_group() as tg:
                if self.queue.lease is not None:
                    tg.start_soon(self._renewing, self.queue.lease / 3)
                for forwarder in self.forwarders.values():
                    tg.start_soon(forwarder.run)
                async with self.ae.serve(
                    self.config.host, self.config.port, backend=self.backend, tls=self.tls
                ) as server:
                    yield server
                tg.cancel_scope.cancel()
