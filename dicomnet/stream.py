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
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

import anyio

__all__ = [
    "TCP",
    "ByteStream",
    "DicomStream",
    "Listener",
    "NetworkBackend",
    "TCPBackend",
    "open_connection",
    "start_server",
]


class ByteStream(Protocol):
    """One connection as the shell uses it."""

    remote_address: tuple[str, int]
    local_address: tuple[str, int]

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

    async def connect(self, host: str, port: int) -> ByteStream: ...

    async def listen(
        self,
        on_connection: Callable[[ByteStream], Any],
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
    ) -> Listener:
        """Listen; `on_connection(stream)` is called (synchronously) for each connection."""
        ...


# Stop reading from the socket when this much received data is waiting to be parsed.
HIGH_WATER = 4 << 20
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
        # The reader sees b"" and the connection's owner closes it.
        return True

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
            await waiter
        if self._closed and self._error is not None:
            raise anyio.BrokenResourceError(str(self._error))

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


async def open_connection(host: str, port: int) -> DicomStream:
    """Connect over TCP (IPv4 or IPv6, as `host` resolves)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(DicomStream, host, port)
    return protocol


async def start_server(
    on_connection: Callable[[DicomStream], Any],
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    backlog: int = 1024,
) -> asyncio.Server:
    """Listen; `on_connection(stream)` is called (synchronously) for each new connection."""
    loop = asyncio.get_running_loop()

    def factory() -> DicomStream:
        stream = DicomStream()
        stream.connected.add_done_callback(lambda _: on_connection(stream))
        return stream

    return await loop.create_server(
        factory, host, port, reuse_port=reuse_port or None, backlog=backlog
    )


class _TCPListener:
    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        sockname = server.sockets[0].getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        self._server.close()


class TCPBackend:
    """TCP over asyncio (or uvloop), on `time.monotonic`."""

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    async def connect(self, host: str, port: int) -> ByteStream:
        return await open_connection(host, port)

    async def listen(
        self,
        on_connection: Callable[[ByteStream], Any],
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
    ) -> Listener:
        return _TCPListener(await start_server(on_connection, host, port, reuse_port=reuse_port))


TCP = TCPBackend()
