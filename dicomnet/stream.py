"""The network under the association shell: a small backend seam and its TCP backend.

`NetworkBackend` is what the shell needs from a network: `connect()` and `listen()`
giving `ByteStream`s, and the monotonic `clock()` its deadlines are read on. The TCP
backend here is the default; `dicomnet.testing.MemoryNetwork` is an in-memory one on a
fake clock, so associations are tested without sockets or sleeps.

The TCP stream is a lean byte stream on asyncio's Protocol API.

Each association reads through one `DicomStream`: data arrives in `data_received`
callbacks and is handed to the single reader without extra event-loop round trips,
with a receive deadline as a plain loop timer (no cancel scope per read). Small writes
made in one turn of the event loop go to the transport together at the end of that turn
(one system call for a burst of C-FIND responses); larger ones go straight through.
`send()` waits only while the transport asks to pause.
TCP_NODELAY is set on every connection (PS3.8 §9.1.1: a message written in two pieces
must not wait for an ACK).

With a `tls` context, connections are TLS (PS3.15 §B.9): the requestor's handshake runs in
`connect()` (under the caller's connect timeout); an accepted connection is handed on only
once its handshake succeeded within `handshake_timeout` (the acceptor's ARTIM), and a
failed one is logged in one line and closed. The plain path is the same code as without
TLS; a TLS connection is the same `DicomStream` over asyncio's TLS transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import anyio

from dicomnet.tls import describe_failure

__all__ = [
    "TCP",
    "ByteStream",
    "DicomStream",
    "Listener",
    "NetworkBackend",
    "TCPBackend",
    "open_connection",
    "peer_certificate",
    "start_server",
]

log = logging.getLogger("dicomnet")


class ByteStream(Protocol):
    """One connection as the shell uses it."""

    remote_address: tuple[str, int]
    local_address: tuple[str, int]
    # Seconds a `send()` may wait for the peer to read before the connection is aborted.
    write_timeout: float | None

    async def receive(self, max_bytes: int = ..., timeout: float | None = None) -> bytes | None:
        """Received bytes; b"" once the peer closed; None when `timeout` seconds passed
        (or sooner: the caller checks its deadlines against its clock)."""
        ...

    async def send(self, data: bytes | bytearray) -> None:
        """Write `data` (raise `anyio.BrokenResourceError` once closed)."""
        ...

    def reschedule(self, timeout: float) -> None:
        """Make a pending `receive()` give up after `timeout` seconds if that is sooner."""
        ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Close at once, dropping unsent data."""
        ...


class Listener(Protocol):
    """A listening endpoint: where it listens, and how it stops."""

    host: str
    port: int

    def close(self) -> None: ...


class NetworkBackend(Protocol):
    """Connections and the clock they run on (the seam under the shell)."""

    def clock(self) -> float:
        """Monotonic seconds: the time every deadline of an association is on."""
        ...

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None = None
    ) -> ByteStream:
        """Connect; with `tls`, also complete the TLS handshake (the server verified)."""
        ...

    async def listen(
        self,
        on_connection: Callable[[ByteStream], Any],
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 30.0,
        on_tls_failure: Callable[[tuple[str, int], str], Any] | None = None,
    ) -> Listener:
        """Listen; `on_connection(stream)` is called (synchronously) for each connection
        (with `tls`: once its handshake succeeded within `handshake_timeout` seconds; a
        failed handshake is told to `on_tls_failure(peer, reason)`)."""
        ...


def peer_certificate(stream: ByteStream) -> dict[str, Any] | None:
    """The peer's verified certificate (`ssl.SSLSocket.getpeercert()`), or None (no TLS,
    or the peer presented none)."""
    certificate = getattr(stream, "peer_certificate", None)
    return certificate if isinstance(certificate, dict) and certificate else None


# Stop reading from the socket when this much received data is waiting to be parsed.
HIGH_WATER = 4 << 20
# How long a requestor's closing TLS connection waits for the peer's close_notify.
TLS_SHUTDOWN_TIMEOUT = 10.0
# Seconds between two log lines saying that accept() fails for want of descriptors.
ACCEPT_FAILURE_LOG_INTERVAL = 10.0
# Writes smaller than this are gathered until the end of the event loop's turn.
COALESCE_LIMIT = 64 << 10


class DicomStream(asyncio.Protocol):
    """One TCP connection: `receive()`, `send()`, `aclose()`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused_reading = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pending: list[bytes | bytearray] = []
        self._pending_size = 0
        self._flush_scheduled = False
        self.connected = self._loop.create_future()
        self.remote_address: tuple[str, int] = ("", 0)
        self.local_address: tuple[str, int] = ("", 0)
        self.peer_certificate: dict[str, Any] | None = None
        # Seconds a `send()` may wait for the peer to read before the connection is
        # aborted (None: no limit); the association sets it.
        self.write_timeout: float | None = None

    # --- protocol callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.remote_address = (str(peer[0]), int(peer[1]))
        self.local_address = (str(local[0]), int(local[1]))
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused_reading and self._transport:
            self._paused_reading = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep the transport open for writing: a peer that half-closed after its last PDU
        # still gets the answer to it (an A-ASSOCIATE-AC/RJ, an A-ABORT, an A-RELEASE-RP).
        # The reader sees b"" and the connection's owner closes it. (Over TLS the transport
        # closes anyway: TLS has no half-close, and asyncio warns when asked to keep it.)
        transport = self._transport
        return transport is not None and transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending.clear()
        self._disarm()
        self._eof = True
        self._closed = True
        if exc is not None:
            self._error = exc
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    @property
    def error(self) -> BaseException | None:
        """Why the connection was lost, if it was lost to an error (e.g. a TLS alert)."""
        return self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- reading ---------------------------------------------------------------------------

    async def receive(self, max_bytes: int = 1 << 18, timeout: float | None = None) -> bytes | None:
        """Received bytes; b"" once the peer closed; None when `timeout` seconds passed
        (or a little sooner: see `_arm`)."""
        if not self._chunks and not self._eof:
            waiter = self._loop.create_future()
            self._waiter = waiter
            if timeout is not None:
                self._arm(self._loop.time() + max(0.0, timeout))
            else:
                self._disarm()
            try:
                await waiter
            finally:
                self._waiter = None
            if not self._chunks and not self._eof:
                return None  # the deadline passed (or an earlier one did)
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        if self._paused_reading and self._buffered < HIGH_WATER // 2 and self._transport:
            self._paused_reading = False
            self._transport.resume_reading()
        return chunk

    def _arm(self, when: float) -> None:
        """Wake the reader by `when`. The timer outlives the `receive()` that set it: a
        reader that keeps receiving keeps one timer (its deadline, the idle timeout, moves
        on with each read) instead of starting and stopping one per read. So a timer
        may fire before the reader's current deadline: `receive()` then returns None
        early and the reader, which checks its deadlines against its clock, waits again."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._time_out)

    def _time_out(self) -> None:
        self._timer = None
        self._wake()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def reschedule(self, timeout: float) -> None:
        """Make a pending `receive()` give up after `timeout` seconds if that is sooner."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        self._arm(self._loop.time() + max(0.0, timeout))

    # --- writing ---------------------------------------------------------------------------

    async def send(self, data: bytes | bytearray) -> None:
        """Write `data`; wait while the transport's buffer is over its high-water mark."""
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            raise anyio.BrokenResourceError("the connection is closed")
        if len(data) < COALESCE_LIMIT:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= COALESCE_LIMIT:
                self.flush()
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._scheduled_flush)
        else:
            self.flush()
            transport.write(data)
        while self._write_paused and not self._closed:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            if self.write_timeout is None:
                await waiter
                continue
            timer = self._loop.call_later(self.write_timeout, self._write_timed_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
        if self._closed and self._error is not None:
            raise anyio.BrokenResourceError(str(self._error))

    def _write_timed_out(self, waiter: asyncio.Future[None]) -> None:
        """The peer read nothing for `write_timeout` seconds: drop the connection."""
        if waiter.done() or self._closed:
            return
        self._error = TimeoutError(f"the peer read nothing for {self.write_timeout:g} s")
        self.abort()

    def flush(self) -> None:
        """Hand the gathered small writes to the transport now."""
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        self._pending_size = 0
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    # --- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        self.flush()
        self._disarm()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._closed = True
        self._eof = True
        self._wake()

    async def aclose(self) -> None:
        self.close()

    def abort(self) -> None:
        """Close at once, dropping unsent data (the peer sees a reset)."""
        self._pending.clear()
        if self._transport is not None:
            self._transport.abort()
        self.close()


async def open_connection(host: str, port: int, tls: ssl.SSLContext | None = None) -> DicomStream:
    """Connect over TCP (IPv4 or IPv6, as `host` resolves); with `tls`, over TLS (the
    server's certificate verified as `tls` says; `host` is sent as SNI and, if the context
    checks host names, matched)."""
    loop = asyncio.get_running_loop()
    if tls is None:
        _, protocol = await loop.create_connection(DicomStream, host, port)
        return protocol
    transport, protocol = await loop.create_connection(
        DicomStream, host, port, ssl=tls, ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT
    )
    protocol.peer_certificate = transport.get_extra_info("peercert") or None
    return protocol


class _TLSAcceptedStream(DicomStream):
    """An accepted connection that becomes a `DicomStream` once its TLS handshake is done.

    Reading is paused as soon as the TCP connection is made, and `loop.start_tls` runs the
    handshake under `timeout` (the closing TLS shutdown waits no longer either). uvloop
    starts reading right after `connection_made` whatever the protocol asked, so bytes of
    the ClientHello may arrive first: they are kept and handed to the TLS protocol before
    anything else it reads."""

    def __init__(
        self,
        context: ssl.SSLContext,
        timeout: float,
        pending: set[Any],
        on_failure: Callable[[tuple[str, int], str], Any] | None = None,
    ) -> None:
        super().__init__()
        self._tls = context
        self._on_failure = on_failure
        self._handshake_timeout = timeout
        self._handshakes = pending
        self._raw: asyncio.Transport | None = None
        self._early: list[bytes] | None = []  # None once the TLS protocol reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw is not None:  # pragma: no cover - start_tls does not call it again
            return
        raw = cast(asyncio.Transport, transport)
        raw.pause_reading()
        self._raw = raw
        peer = raw.get_extra_info("peername") or ("", 0)
        self.remote_address = (str(peer[0]), int(peer[1]))
        task = self._loop.create_task(self._handshake(raw))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def data_received(self, data: bytes) -> None:
        if self._early is None:
            super().data_received(data)
            return
        self._early.append(data)  # before the handshake started (uvloop)
        if self._raw is not None and self._raw.is_reading():
            self._raw.pause_reading()

    def eof_received(self) -> bool:
        if self._early is None:
            return super().eof_received()
        return False

    @staticmethod
    def _hand_over(raw: asyncio.Transport, early: bytes) -> None:
        """Give what was read before the TLS protocol took over to it, first."""
        protocol = raw.get_protocol()
        view = memoryview(early)
        while view:
            buffer = protocol.get_buffer(len(view))  # type: ignore[attr-defined]
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)  # type: ignore[attr-defined]
            view = view[size:]

    async def _handshake(self, raw: asyncio.Transport) -> None:
        early = b"".join(self._early or ())
        self._early = None
        if early:  # runs after start_tls set its protocol, before it starts reading
            self._loop.call_soon(self._hand_over, raw, early)
        try:
            transport = await self._loop.start_tls(
                raw,
                self,
                self._tls,
                server_side=True,
                ssl_handshake_timeout=self._handshake_timeout,
                ssl_shutdown_timeout=self._handshake_timeout,  # ARTIM, as Sta13 waits
            )
        except asyncio.CancelledError:
            raw.abort()
            raise
        except Exception as exc:
            host, port = self.remote_address
            reason = describe_failure(exc, server=True, timeout=self._handshake_timeout)
            log.warning("TLS handshake with %s:%s failed: %s", host, port, reason)
            raw.abort()
            if self._on_failure is not None:
                self._on_failure(self.remote_address, reason)
            return
        if transport is None or transport.is_closing():
            raw.abort()
            return
        self.peer_certificate = transport.get_extra_info("peercert") or None
        if log.isEnabledFor(logging.DEBUG):
            ssl_object = transport.get_extra_info("ssl_object")
            host, port = self.remote_address
            log.debug(
                "TLS with %s:%s: %s, %s",
                host,
                port,
                ssl_object.version() if ssl_object else "?",
                ssl_object.cipher()[0] if ssl_object else "?",
            )
        super().connection_made(transport)


def descriptor_budget() -> int | None:
    """How many connections a server starting now may hold open: the soft limit on open
    file descriptors, less those open already, less an eighth of the limit (at least 16)
    for what serving opens besides connections (spool files, C-MOVE sub-operation
    associations); None where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc
        in_use = 32
    return max(1, soft - in_use - max(16, soft // 8))


_ACCEPT_FAILED = "socket.accept() out of system resource"
_quiet_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _quiet_accept_failures(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's accept() failures for want of descriptors once in a while, not once
    per attempt (it retries every second, and logs each of up to `backlog` attempts a
    time: hundreds of thousands of tracebacks in a minute)."""
    if loop in _quiet_loops:
        return
    _quiet_loops.add(loop)
    previous = loop.get_exception_handler()
    last = [-ACCEPT_FAILURE_LOG_INTERVAL]

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_FAILED:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - last[0] >= ACCEPT_FAILURE_LOG_INTERVAL:
            last[0] = now
            log.warning(
                "cannot accept connections: %s; retrying every second (logged again in "
                "%g s if it lasts)",
                context.get("exception"),
                ACCEPT_FAILURE_LOG_INTERVAL,
            )

    loop.set_exception_handler(handler)


async def start_server(
    on_connection: Callable[[DicomStream], Any],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    backlog: int = 1024,
    tls: ssl.SSLContext | None = None,
    handshake_timeout: float = 30.0,
    handshakes: set[Any] | None = None,
    on_tls_failure: Callable[[tuple[str, int], str], Any] | None = None,
) -> asyncio.Server:
    """Listen; `on_connection(stream)` is called (synchronously) for each new connection
    (with `tls`, once its handshake succeeded; the tasks of those under way are kept in
    `handshakes`, to be cancelled when the server stops; a failed one is also told to
    `on_tls_failure(peer, reason)`)."""
    loop = asyncio.get_running_loop()
    _quiet_accept_failures(loop)
    pending: set[Any] = handshakes if handshakes is not None else set()

    def factory() -> DicomStream:
        if tls is None:
            stream = DicomStream()
        else:
            stream = _TLSAcceptedStream(tls, handshake_timeout, pending, on_tls_failure)
        stream.connected.add_done_callback(lambda _: on_connection(stream))
        return stream

    return await loop.create_server(
        factory, host, port, reuse_port=reuse_port or None, backlog=backlog
    )


class _TCPListener:
    def __init__(self, server: asyncio.Server, handshakes: set[Any]) -> None:
        self._server = server
        self._handshakes = handshakes
        sockname = server.sockets[0].getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        self._server.close()
        for task in list(self._handshakes):  # TLS handshakes still under way
            task.cancel()


class TCPBackend:
    """TCP over asyncio (or uvloop), on `time.monotonic`; TLS with a context."""

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    async def connect(
        self, host: str, port: int, *, tls: ssl.SSLContext | None = None
    ) -> ByteStream:
        return await open_connection(host, port, tls)

    async def listen(
        self,
        on_connection: Callable[[ByteStream], Any],
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 30.0,
        on_tls_failure: Callable[[tuple[str, int], str], Any] | None = None,
    ) -> Listener:
        handshakes: set[Any] = set()
        server = await start_server(
            on_connection,
            host,
            port,
            reuse_port=reuse_port,
            tls=tls,
            handshake_timeout=handshake_timeout,
            handshakes=handshakes,
            on_tls_failure=on_tls_failure,
        )
        return _TCPListener(server, handshakes)


TCP = TCPBackend()
