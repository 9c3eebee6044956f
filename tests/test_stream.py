"""DicomStream: small writes of one event-loop turn are gathered, in order, and never lost."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from dicomnet.stream import COALESCE_LIMIT, DicomStream, open_connection

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Sink:
    """A plain asyncio server that records every read until the peer closes."""

    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.done = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(1 << 20):
                self.reads.append(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.done.set()

    @property
    def received(self) -> bytes:
        return b"".join(self.reads)

    async def __aenter__(self) -> tuple[Sink, int]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self, self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def connect(port: int) -> DicomStream:
    return await open_connection("127.0.0.1", port)


async def test_small_writes_of_one_turn_go_out_together_in_order() -> None:
    async with Sink() as (sink, port):
        stream = await connect(port)
        pieces = [bytes([i]) * 10 for i in range(100)]
        for piece in pieces:
            await stream.send(piece)
        await asyncio.sleep(0.2)
        # One write for the whole burst: the peer saw it in one read.
        assert sink.reads == [b"".join(pieces)]
        stream.close()
        await asyncio.wait_for(sink.done.wait(), 10)
        assert sink.received == b"".join(pieces)


async def test_large_writes_keep_their_place_among_small_ones() -> None:
    async with Sink() as (sink, port):
        stream = await connect(port)
        big = b"B" * (COALESCE_LIMIT * 3)
        sent = [b"a" * 7, b"b" * 9, big, b"c" * 5, b"d" * (COALESCE_LIMIT - 1), b"e"]
        for piece in sent:
            await stream.send(piece)
        stream.close()
        await asyncio.wait_for(sink.done.wait(), 10)
        assert sink.received == b"".join(sent)


async def test_close_right_after_send_delivers_everything() -> None:
    async with Sink() as (sink, port):
        stream = await connect(port)
        await stream.send(b"A-RELEASE-RP")
        stream.close()  # in the same turn: the gathered write must go first
        await asyncio.wait_for(sink.done.wait(), 10)
        assert sink.received == b"A-RELEASE-RP"


async def test_abort_drops_what_was_not_written_yet() -> None:
    async with Sink() as (sink, port):
        stream = await connect(port)
        await stream.send(b"never sent")
        stream.abort()
        await asyncio.wait_for(sink.done.wait(), 10)
        assert sink.received == b""


async def test_sending_on_a_closed_stream_is_an_error() -> None:
    async with Sink() as (sink, port):
        stream = await connect(port)
        stream.close()
        with pytest.raises(anyio.BrokenResourceError):
            await stream.send(b"x")
        await asyncio.wait_for(sink.done.wait(), 10)


class Talker:
    """A plain asyncio server that writes to the one connection it accepts on demand."""

    def __init__(self) -> None:
        self.connected = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        await reader.read()  # until the stream closes
        writer.close()

    def say(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def __aenter__(self) -> tuple[Talker, DicomStream]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        stream = await connect(self.server.sockets[0].getsockname()[1])
        await asyncio.wait_for(self.connected.wait(), 10)
        self.stream = stream
        return self, stream

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.stream.close()
        self.server.close()
        await self.server.wait_closed()


async def test_one_receive_timer_serves_a_reader_that_keeps_reading() -> None:
    """Each read moves the reader's idle deadline on; the timer that wakes it stays the
    same one instead of being started and stopped for every read."""
    async with Talker() as (talker, stream):
        timers = []  # the timers themselves: an id could be reused once one is freed
        for i in range(5):
            talker.say(bytes([i]))
            assert await stream.receive(timeout=60.0 + i) == bytes([i])
            timers.append(stream._timer)
        assert timers[0] is not None and all(timer is timers[0] for timer in timers)
        # A sooner deadline than the armed timer's gets a timer of its own.
        start = asyncio.get_running_loop().time()
        assert await stream.receive(timeout=0.05) is None
        assert asyncio.get_running_loop().time() - start < 10
        # Without a deadline, no timer wakes the reader.
        asyncio.get_running_loop().call_later(0.2, talker.say, b"late")
        assert await stream.receive(timeout=None) == b"late"
        assert stream._timer is None
    assert stream._timer is None  # closing stops it


async def test_a_receive_woken_early_says_none_and_the_next_one_waits() -> None:
    """A timer armed for an earlier deadline may wake a later receive early: it returns
    None (the reader checks its own deadlines) and data still arrives afterwards."""
    async with Talker() as (talker, stream):
        stream._arm(asyncio.get_running_loop().time() + 0.05)  # an earlier reader's deadline
        assert await stream.receive(timeout=60.0) is None
        talker.say(b"data")
        assert await stream.receive(timeout=60.0) == b"data"
