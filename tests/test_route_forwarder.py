"""The forwarder of `route` (dicomnet.route.forwarder) with a sender that fails on cue."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from dicomnet.errors import ConnectionFailed, DimseError, NotNegotiatedError
from dicomnet.route.config import Destination
from dicomnet.route.forwarder import Forwarder
from dicomnet.route.queue import Queue
from dicomnet.status import Status

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ScriptedSender:
    """Answers each file's sends with the next of its script (an exception or success)."""

    def __init__(self, script: dict[bytes, list[Exception | None]]) -> None:
        self.script = script
        self.sent: list[bytes] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def store(self, dataset_or_path: str | os.PathLike[str]) -> Status:
        content = Path(dataset_or_path).read_bytes()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await anyio.sleep(0.01)
        self.in_flight -= 1
        steps = self.script.get(content, [])
        outcome = steps.pop(0) if steps else None
        if outcome is not None:
            raise outcome
        self.sent.append(content)
        return Status(0)


def destination(**kwargs: object) -> Destination:
    values: dict[str, object] = {"name": "archive", "aet": "A", "host": "127.0.0.1", "port": 1}
    values.update(attempts=3, backoff=0.02, max_backoff=0.05)
    values.update(kwargs)
    return Destination(**values)  # type: ignore[arg-type]


def queued(queue: Queue, *contents: bytes) -> list[object]:
    entries = []
    for content in contents:
        path = queue.temp_path()
        path.write_bytes(content)
        entries += queue.put({"archive": path})
    return entries


async def run_until(forwarder: Forwarder, done: object, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(forwarder.run)
            while not done():  # type: ignore[operator]
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()


@pytest.mark.timeout(30)
async def test_sends_what_was_queued_before_and_after_it_started(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"], fsync=False)
    queued(queue, b"old-1", b"old-2")
    sender = ScriptedSender({})
    forwarder = Forwarder(queue, destination(associations=2, window=2), sender)
    forwarder.add(queued(queue, *(b"new-%d" % n for n in range(10))))  # type: ignore[arg-type]
    await run_until(forwarder, lambda: forwarder.sent == 12)
    assert sorted(sender.sent) == sorted([b"old-1", b"old-2", *(b"new-%d" % n for n in range(10))])
    assert queue.pending("archive") == []
    assert 1 < sender.most_in_flight <= 4  # associations x window


@pytest.mark.timeout(30)
async def test_a_passing_failure_is_retried_and_a_lasting_one_is_a_dead_letter(
    tmp_path: Path,
) -> None:
    queue = Queue(tmp_path, ["archive"], fsync=False)
    busy = DimseError(0xA700, "disk full")
    sender = ScriptedSender(
        {
            b"flaky": [busy],
            b"bad": [DimseError(0xA900, "not this class")],
            b"unsendable": [NotNegotiatedError("no context")],
            b"full": [busy] * 5,
        }
    )
    forwarder = Forwarder(queue, destination(), sender, jitter=lambda: 1.0)
    forwarder.add(queued(queue, b"flaky", b"bad", b"unsendable", b"full", b"fine"))  # type: ignore[arg-type]
    await run_until(forwarder, lambda: forwarder.sent + forwarder.dead == 5)
    assert sorted(sender.sent) == [b"fine", b"flaky"]
    dead = sorted(p.read_bytes() for p in (tmp_path / "archive" / "dead").glob("*.dcm"))
    assert dead == [b"bad", b"full", b"unsendable"]
    reasons = sorted(p.read_text() for p in (tmp_path / "archive" / "dead").glob("*.reason"))
    assert any("after 1 attempt(s)" in r and "not this class" in r for r in reasons)
    assert any("after 3 attempt(s)" in r and "disk full" in r for r in reasons)
    assert forwarder.retried == 1 + 2  # flaky once, full twice before its third attempt


@pytest.mark.timeout(30)
async def test_a_destination_down_pauses_the_queue_and_charges_no_copy(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"], fsync=False)
    refused = ConnectionFailed("refused")
    # Each copy is refused several times: more than `attempts`, yet none is given up.
    sender = ScriptedSender({bytes([n]): [refused] * 4 for n in range(6)})
    forwarder = Forwarder(queue, destination(window=3), sender, jitter=lambda: 0.0)
    forwarder.add(queued(queue, *(bytes([n]) for n in range(6))))  # type: ignore[arg-type]
    await run_until(forwarder, lambda: forwarder.sent == 6)
    assert forwarder.dead == 0 and sorted(sender.sent) == [bytes([n]) for n in range(6)]
    assert not queue.pending("archive")
    assert not list((tmp_path / "archive" / "dead").iterdir())


@pytest.mark.timeout(30)
async def test_dead_letters_put_back_are_taken_by_a_running_forwarder(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"], fsync=False)
    sender = ScriptedSender({b"later": [DimseError(0xC000, "cannot understand")]})
    forwarder = Forwarder(queue, destination(), sender)
    forwarder.add(queued(queue, b"later"))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(forwarder.run, 0.05)
            while forwarder.dead == 0:
                await anyio.sleep(0.01)
            # `route retry`, from another process: a queue opened without recovering.
            assert Queue(tmp_path, recover=False).retry_dead("archive") == 1
            while forwarder.sent == 0:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert sender.sent == [b"later"]
    assert queue.pending("archive") == []


@pytest.mark.timeout(30)
async def test_a_long_queue_waits_on_disk_not_in_memory(tmp_path: Path) -> None:
    queue = Queue(tmp_path, ["archive"], fsync=False)
    contents = [b"copy-%03d" % n for n in range(40)]
    queued(queue, *contents[:25])  # before the start: only 6 are taken in memory
    sender = ScriptedSender({})
    forwarder = Forwarder(queue, destination(associations=2), sender, memory_limit=6)
    most_in_memory = 0

    async def watch() -> None:
        nonlocal most_in_memory
        while True:
            most_in_memory = max(most_in_memory, len(forwarder._known))
            await anyio.sleep(0.001)

    assert len(forwarder._known) == 6
    forwarder.add(queued(queue, *contents[25:]))  # type: ignore[arg-type]
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tg.start_soon(forwarder.run)
            while forwarder.sent < 40:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert sorted(sender.sent) == contents  # each once
    assert most_in_memory <= 6 and queue.pending("archive") == []


@pytest.mark.timeout(30)
async def test_copies_left_on_disk_are_read_in_as_others_go_to_the_dead_letters(
    tmp_path: Path,
) -> None:
    """Room in memory freed by dead letters, not only by deliveries, brings in what waited
    in the folder, without waiting for the periodic rescan."""
    queue = Queue(tmp_path, ["archive"], fsync=False)
    contents = [b"bad-%d" % n for n in range(6)]
    queued(queue, *contents)
    sender = ScriptedSender({c: [DimseError(0xA900, "not this class")] for c in contents})
    forwarder = Forwarder(queue, destination(), sender, memory_limit=2)
    await run_until(forwarder, lambda: forwarder.dead == 6)
    assert queue.pending("archive") == [] and len(queue.status()) == 1
    assert queue.status()["archive"].dead == 6
