"""What tests (ours and our users') need: a fake clock, PDU builders, in-memory peers.

`UpperLayerPair` joins a requestor and an acceptor `UpperLayer` (PS3.8 §9.2) back to
back, as if through one TCP connection, on one shared `FakeClock`: sans-IO, no event
loop. `MemoryNetwork` is a network backend for whole associations without sockets:
`ae.serve(..., backend=net)` and `dicomnet.connect(..., backend=net)` meet in memory,
and every deadline (ARTIM, DIMSE, idle) runs on the network's `FakeClock`, which moves
only when the test advances it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from dicomnet.proto.pdu import (
    APPLICATION_CONTEXT_NAME,
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    AsyncOperationsWindow,
    PDataTF,
    PresentationContextAC,
    PresentationContextRQ,
    PresentationDataValue,
    UserInformation,
)
from dicomnet.proto.ul import ConnectionClosed, ULEvent, UpperLayer, _NeedData

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "IMPLICIT_VR_LITTLE_ENDIAN",
    "TEST_IMPLEMENTATION_CLASS_UID",
    "TEST_IMPLEMENTATION_VERSION_NAME",
    "VERIFICATION_SOP_CLASS",
    "Exchange",
    "FakeClock",
    "MemoryNetwork",
    "MemoryStream",
    "UpperLayerPair",
    "build_abort",
    "build_associate_ac",
    "build_associate_rj",
    "build_associate_rq",
    "build_p_data",
    "build_release_rp",
    "build_release_rq",
]

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
# A UUID-derived UID (PS3.5 §B.2): needs no registered root.
TEST_IMPLEMENTATION_CLASS_UID = "2.25.305828488182831875890203105390285383139"
TEST_IMPLEMENTATION_VERSION_NAME = "DICOMNET_TEST"
DEFAULT_MAX_LENGTH = 16384


class FakeClock:
    """A monotonic clock that moves only when told to.

    Pass it where a clock is asked for (`UpperLayerPair`, `MemoryNetwork`). Timers set
    with `call_at` run when `advance` passes their time (in time order)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self._timers: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move time forward by `seconds` (never backwards), run the timers now due, and
        return the new time."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self.now += seconds
        while self._timers and self._timers[0][0] <= self.now:
            _, _, timer = heapq.heappop(self._timers)
            timer.fire()
        return self.now

    def call_at(self, when: float, callback: Callable[[], Any]) -> _Timer:
        """Run `callback` once the clock reaches `when`; `.cancel()` the returned timer
        to drop it."""
        timer = _Timer(callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer


class _Timer:
    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], Any]) -> None:
        self._callback: Callable[[], Any] | None = callback

    def cancel(self) -> None:
        self._callback = None

    def fire(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


# --- PDU builders ----------------------------------------------------------------------------


def build_associate_rq(
    *,
    called_ae_title: str = "ANY-SCP",
    calling_ae_title: str = "DICOMNET",
    contexts: Sequence[PresentationContextRQ] | None = None,
    abstract_syntaxes: Iterable[str] = (VERIFICATION_SOP_CLASS,),
    transfer_syntaxes: Sequence[str] = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN),
    max_length: int | None = DEFAULT_MAX_LENGTH,
    implementation_class_uid: str = TEST_IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = TEST_IMPLEMENTATION_VERSION_NAME,
    async_operations_window: AsyncOperationsWindow | None = None,
    user_information: UserInformation | None = None,
    protocol_version: int = 1,
) -> AAssociateRQ:
    """An A-ASSOCIATE-RQ PDU (PS3.8 §9.3.2).

    Without `contexts`, one presentation context per abstract syntax (IDs 1, 3, 5, ...)
    proposes `transfer_syntaxes`; the default is the Verification SOP Class alone.
    `user_information`, when given, replaces the one built from the other arguments.
    """
    if contexts is None:
        contexts = [
            PresentationContextRQ(2 * index + 1, abstract, tuple(transfer_syntaxes))
            for index, abstract in enumerate(abstract_syntaxes)
        ]
    if user_information is None:
        user_information = UserInformation(
            max_length=max_length,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
            async_operations_window=async_operations_window,
        )
    return AAssociateRQ(
        called_ae_title=called_ae_title,
        calling_ae_title=calling_ae_title,
        presentation_contexts=tuple(contexts),
        user_information=user_information,
        application_context_name=APPLICATION_CONTEXT_NAME,
        protocol_version=protocol_version,
    )


def build_associate_ac(
    request: AAssociateRQ | None = None,
    *,
    results: Mapping[int, int] | None = None,
    contexts: Sequence[PresentationContextAC] | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    implementation_class_uid: str = TEST_IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str | None = TEST_IMPLEMENTATION_VERSION_NAME,
    user_information: UserInformation | None = None,
) -> AAssociateAC:
    """An A-ASSOCIATE-AC PDU (PS3.8 §9.3.3) answering `request` (default: `build_associate_rq()`).

    The AE titles are echoed from the request (PS3.8 Table 9-17). Each proposed context is
    accepted with its first transfer syntax unless `results` maps its ID to a non-zero
    result (PS3.8 Table 9-18); `contexts`, when given, is used as is.
    """
    if request is None:
        request = build_associate_rq()
    if contexts is None:
        results = results or {}
        built = []
        for proposed in request.presentation_contexts:
            result = results.get(proposed.context_id, 0)
            syntax = proposed.transfer_syntaxes[0] if result == 0 else ""
            built.append(PresentationContextAC(proposed.context_id, result, syntax))
        contexts = built
    if user_information is None:
        user_information = UserInformation(
            max_length=max_length,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
        )
    return AAssociateAC(
        called_ae_title=request.called_ae_title,
        calling_ae_title=request.calling_ae_title,
        presentation_contexts=tuple(contexts),
        user_information=user_information,
        application_context_name=request.application_context_name,
        protocol_version=1,
    )


def build_associate_rj(result: int = 1, source: int = 1, reason: int = 1) -> AAssociateRJ:
    """An A-ASSOCIATE-RJ PDU (PS3.8 §9.3.4, Table 9-21); default: permanent, by the user."""
    return AAssociateRJ(result, source, reason)


def build_p_data(
    data: bytes = b"",
    context_id: int = 1,
    *,
    is_command: bool = True,
    is_last: bool = True,
) -> PDataTF:
    """A P-DATA-TF PDU with one presentation data value (PS3.8 §9.3.5, Annex E.2)."""
    return PDataTF((PresentationDataValue(context_id, is_command, is_last, data),))


def build_release_rq() -> AReleaseRQ:
    """An A-RELEASE-RQ PDU (PS3.8 §9.3.6)."""
    return AReleaseRQ()


def build_release_rp() -> AReleaseRP:
    """An A-RELEASE-RP PDU (PS3.8 §9.3.7)."""
    return AReleaseRP()


def build_abort(source: int = 0, reason: int = 0) -> AAbort:
    """An A-ABORT PDU (PS3.8 §9.3.8, Table 9-26); default: by the service-user."""
    return AAbort(source, reason)


# --- an in-memory peer pair ------------------------------------------------------------------


@dataclass
class Exchange:
    """What one `UpperLayerPair.pump()` moved: the events each side saw, the bytes each sent."""

    requestor: list[ULEvent] = field(default_factory=list)
    acceptor: list[ULEvent] = field(default_factory=list)
    to_acceptor: bytes = b""
    to_requestor: bytes = b""

    def extend(self, other: Exchange) -> None:
        self.requestor += other.requestor
        self.acceptor += other.acceptor
        self.to_acceptor += other.to_acceptor
        self.to_requestor += other.to_requestor


class UpperLayerPair:
    """A requestor and an acceptor `UpperLayer` joined back to back on one `FakeClock`.

    Bytes a side produces are delivered to the other by `pump()`. When a side closes the
    transport (it emits `ConnectionClosed`, PS3.8 AE-4, AR-3, AA-2 .. AA-5), the bytes it
    already wrote are still delivered, then the other side gets the transport connection
    closed indication (Evt17), as it would from TCP; set `propagate_close=False` to leave
    that to the test.
    """

    def __init__(
        self,
        *,
        clock: FakeClock | None = None,
        requestor_max_pdu_length: int = DEFAULT_MAX_LENGTH,
        acceptor_max_pdu_length: int = DEFAULT_MAX_LENGTH,
        artim_timeout: float = 30.0,
        idle_timeout: float | None = None,
        propagate_close: bool = True,
    ) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.requestor = UpperLayer(
            is_requestor=True,
            max_pdu_length=requestor_max_pdu_length,
            artim_timeout=artim_timeout,
            idle_timeout=idle_timeout,
        )
        self.acceptor = UpperLayer(
            is_requestor=False,
            max_pdu_length=acceptor_max_pdu_length,
            artim_timeout=artim_timeout,
            idle_timeout=idle_timeout,
        )
        self.propagate_close = propagate_close
        self.connected = False
        self._to_acceptor = bytearray()
        self._to_requestor = bytearray()

    def send_to_acceptor(self, data: bytes) -> None:
        """Queue bytes as if the requestor wrote them (delivered by the next `pump()`)."""
        self._to_acceptor += data

    def send_to_requestor(self, data: bytes) -> None:
        """Queue bytes as if the acceptor wrote them (delivered by the next `pump()`)."""
        self._to_requestor += data

    def from_requestor(self, data: bytes) -> Exchange:
        """Deliver what a requestor primitive returned, e.g. `pair.from_requestor(
        pair.requestor.release())`, and `pump()`."""
        self._to_acceptor += data
        return self.pump()

    def from_acceptor(self, data: bytes) -> Exchange:
        """Deliver what an acceptor primitive returned and `pump()`."""
        self._to_requestor += data
        return self.pump()

    def connect(self, request: AAssociateRQ | None = None) -> Exchange:
        """A-ASSOCIATE request (Evt1), then the transport connection opens on both sides
        (Evt2 for the requestor, Evt5 for the acceptor), then `pump()`."""
        self.requestor.request_association(request if request is not None else build_associate_rq())
        self.acceptor.connection_made(self.clock())
        self._to_acceptor += self.requestor.connection_made(self.clock())
        self.connected = True
        return self.pump()

    def associate(
        self, request: AAssociateRQ | None = None, response: AAssociateAC | None = None
    ) -> Exchange:
        """Open and accept an association: afterwards both sides are in Sta6."""
        if request is None:
            request = build_associate_rq()
        exchange = self.connect(request)
        self._to_requestor += self.acceptor.accept(
            response if response is not None else build_associate_ac(request)
        )
        exchange.extend(self.pump())
        return exchange

    def advance(self, seconds: float) -> Exchange:
        """Move the shared clock forward, run each side's due timers (ARTIM, PS3.8 §9.1.5;
        the request, release and idle timeouts), then `pump()`."""
        self.clock.advance(seconds)
        for machine in (self.requestor, self.acceptor):
            for _ in range(10):  # a timer may start another (AA-1 restarts ARTIM)
                deadline = machine.get_timer()
                if deadline is None or deadline > self.clock():
                    break
                machine.handle_timer(self.clock())
        return self.pump()

    def pump(self, max_rounds: int = 1000) -> Exchange:
        """Deliver queued bytes both ways and collect events until nothing moves.

        Raises `RuntimeError` if that takes more than `max_rounds` rounds (it never should).
        """
        exchange = Exchange()
        for _ in range(max_rounds):
            moved = False
            self._to_acceptor += self.requestor.data_to_send()
            self._to_requestor += self.acceptor.data_to_send()
            if self._to_acceptor:
                data = bytes(self._to_acceptor)
                self._to_acceptor.clear()
                exchange.to_acceptor += data
                self.acceptor.receive_data(data, self.clock())
                moved = True
            if self._to_requestor:
                data = bytes(self._to_requestor)
                self._to_requestor.clear()
                exchange.to_requestor += data
                self.requestor.receive_data(data, self.clock())
                moved = True
            closed_by_requestor = self._drain(self.requestor, exchange.requestor)
            closed_by_acceptor = self._drain(self.acceptor, exchange.acceptor)
            if closed_by_requestor or closed_by_acceptor:
                moved = True
                self._close(closer_is_requestor=closed_by_requestor, exchange=exchange)
            if not moved:
                return exchange
        raise RuntimeError(f"UpperLayerPair did not settle in {max_rounds} rounds")

    def _drain(self, machine: UpperLayer, events: list[ULEvent]) -> bool:
        closed = False
        for _ in range(100_000):
            event = machine.next_event()
            if isinstance(event, _NeedData):
                return closed
            events.append(event)
            if isinstance(event, ConnectionClosed):
                closed = True
        raise RuntimeError("UpperLayer produced events without end")  # pragma: no cover

    def _close(self, *, closer_is_requestor: bool, exchange: Exchange) -> None:
        if not self.connected or not self.propagate_close:
            return
        self.connected = False
        # TCP delivers what the closing side wrote before it closed, then end-of-stream.
        if closer_is_requestor:
            self._to_acceptor += self.requestor.data_to_send()
            self._to_requestor.clear()
            pending, peer, events = self._to_acceptor, self.acceptor, exchange.acceptor
            exchange.to_acceptor += bytes(pending)
        else:
            self._to_requestor += self.acceptor.data_to_send()
            self._to_acceptor.clear()
            pending, peer, events = self._to_requestor, self.requestor, exchange.requestor
            exchange.to_requestor += bytes(pending)
        if pending:
            peer.receive_data(bytes(pending), self.clock())
            pending.clear()
        self._drain(peer, events)
        peer.receive_data(b"", self.clock())
        self._drain(peer, events)


# --- an in-memory network --------------------------------------------------------------------


class MemoryStream:
    """One end of an in-memory connection (a `dicomnet.stream.ByteStream`)."""

    def __init__(self, clock: FakeClock, local: tuple[str, int], remote: tuple[str, int]) -> None:
        self._clock = clock
        self.local_address = local
        self.remote_address = remote
        self.peer: MemoryStream | None = None
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: _Timer | None = None
        self.sent = 0  # bytes written, for tests
        self.write_timeout: float | None = None  # writes never wait here

    def _feed(self, data: bytes) -> None:
        if not self._eof:
            self._chunks.append(data)
            self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self, max_bytes: int = 1 << 18, timeout: float | None = None) -> bytes | None:
        if not self._chunks and not self._eof:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            if timeout is not None:
                self.reschedule(timeout)
            try:
                await waiter
            finally:
                self._waiter = None
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            if not self._chunks and not self._eof:
                return None
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    def reschedule(self, timeout: float) -> None:
        if self._waiter is None or self._waiter.done():
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if timeout <= 0:  # already due: as a loop timer would, wake on the next turn
            asyncio.get_running_loop().call_soon(self._wake)
            return
        self._timer = self._clock.call_at(self._clock.now + timeout, self._wake)

    async def send(self, data: bytes | bytearray) -> None:
        if self._closed or self.peer is None:
            raise anyio.BrokenResourceError("the connection is closed")
        self.sent += len(data)
        self.peer._feed(bytes(data))
        await asyncio.sleep(0)  # as a socket write would, let the loop run

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._eof = True
            self._wake()
            if self.peer is not None:
                self.peer._feed_eof()

    def abort(self) -> None:
        self.close()


class _MemoryListener:
    def __init__(self, network: MemoryNetwork, host: str, port: int) -> None:
        self._network = network
        self.host, self.port = host, port

    def close(self) -> None:
        self._network._listeners.pop((self.host, self.port), None)


def _no_tls(tls: Any) -> None:
    if tls is not None:
        raise NotImplementedError(
            "MemoryNetwork has no TLS: test TLS over the TCP backend (loopback)"
        )


class MemoryNetwork:
    """A network backend in memory, on a `FakeClock`: pass it as `backend=` to
    `AE.serve()` and `dicomnet.connect()`. A connection to an address nobody listens on
    is refused; `streams` holds every connection's two ends, for inspection."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.fake_clock = clock if clock is not None else FakeClock()
        self._listeners: dict[tuple[str, int], Callable[[Any], Any]] = {}
        self._ports = itertools.count(40000)
        self.streams: list[tuple[MemoryStream, MemoryStream]] = []

    def clock(self) -> float:
        return self.fake_clock.now

    async def connect(self, host: str, port: int, *, tls: Any = None) -> MemoryStream:
        _no_tls(tls)
        on_connection = self._listeners.get((host, port))
        if on_connection is None:
            raise ConnectionRefusedError(111, f"nothing listens on {host}:{port}")
        local = ("memory-client", next(self._ports))
        ours = MemoryStream(self.fake_clock, local, (host, port))
        theirs = MemoryStream(self.fake_clock, (host, port), local)
        ours.peer, theirs.peer = theirs, ours
        self.streams.append((ours, theirs))
        on_connection(theirs)
        await asyncio.sleep(0)
        return ours

    async def listen(
        self,
        on_connection: Callable[[Any], Any],
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        tls: Any = None,
        handshake_timeout: float = 30.0,
        on_tls_failure: Any = None,
    ) -> _MemoryListener:
        _no_tls(tls)
        if port == 0:
            port = next(self._ports)
        if (host, port) in self._listeners:
            raise OSError(98, f"{host}:{port} is in use")
        self._listeners[(host, port)] = on_connection
        return _MemoryListener(self, host, port)
